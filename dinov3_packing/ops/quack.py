"""The MLP's GEMMs with the GELU in their epilogues, from quack-kernels (CuTe-DSL, warp-specialized Hopper GEMMs).

quack-kernels is a dependency of flash-attn-4, so the `dinov3-packing[hopper]` extra brings it. Its SM90 GEMMs run
the epilogue of one tile while the tensor cores work on the next (ping-pong warp groups), where this package's
Triton kernel (`ops/triton/linear_gelu.py`) runs its epilogue between two tiles' main loops. Four ops, each one
call for `torch.compile`:

- `dinov3_packing::quack_linear_gelu(x, weight, bias) -> (y, pre)`: ``pre = x @ weight.T + bias`` and ``y =
  gelu(pre)`` (exact erf GELU) from one GEMM (`quack.gemm_interface.gemm_act`, activation ``"gelu_erf"``).
- `dinov3_packing::quack_gelu_grad(grad_out, weight, pre, bias_grad, postact) -> (grad_pre, y, grad_bias)`:
  ``grad_pre = (grad_out @ weight) * gelu'(pre)`` from one GEMM, with, when ``postact``, ``y = gelu(pre)``
  recomputed in the same epilogue (for a training op that did not keep the GELU output: one ``[tokens, 4D]``
  activation less per block, `parallel.recompute`'s "gelu" policy), and, when ``bias_grad``, ``grad_pre``'s sum
  over tokens (the up-projection's bias gradient). With `FUSED_BIAS_GRAD` (the default) the bias gradient comes
  from the same GEMM: its epilogue sums each tile's fp32 ``grad_pre`` over the tile's rows (quack's
  `RowVecReduce`) and the tiles' partial sums are added after it (`_dgelu_mod`), where quack's own `gemm_dact`
  leaves a separate pass over the ``[tokens, 4D]`` gradient (4.4 ms of the H100's ViT-L mixed-64 training step,
  2026-12-07).
- `dinov3_packing::quack_linear_gelu_dgelu(x, weight, bias) -> (y, deriv)` and `dinov3_packing::quack_dgelu_grad(
  grad_out, weight, deriv, bias_grad) -> (grad_pre, grad_bias)`: "quack-dgelu"'s pair, the forward storing
  ``gelu'(pre)`` where the first stores ``pre``, the backward multiplying by it (no erf in its epilogue) and summing
  the bias gradient there; on the H100 4.9 ms less GPU time per ViT-L mixed-64 step than the first pair
  (seventeenth session).

All fall back to the torch ops (CPU, other dtypes, quack missing) with the same outputs (up to rounding: the
fallback sums the rounded ``grad_pre`` for the bias gradient, the fused epilogue the unrounded one), so the ops,
their fakes and the training op that uses them are tested without a GPU. quack's GELU evaluates erf with a fast
polynomial (Abramowitz-Stegun 7.1.26 with approximate reciprocal and exp2: ~5e-7 absolute in fp32), far below
the bf16 rounding of its outputs; `benchmarks/fa4_gpu_check.py --parts mlp-fwd,mlp-grad` times the ops
against the Triton kernels and measures their errors against fp32.

quack is imported at the first GPU call only. Its epilogue cache keys recognise installed packages by a
``site-packages`` (or ``dist-packages``) directory in their path: installed elsewhere (``pip install --target
DIR`` with a DIR not so named), building its GELU epilogue fails inside quack (quack 0.6.5).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_DTYPES = (torch.float16, torch.bfloat16)

TILES: dict[str, dict] = {
    "act": dict(tile_m=128, tile_n=128, pingpong=True, cluster_m=2, cluster_n=1),
    "dact": dict(tile_m=128, tile_n=128, pingpong=True, cluster_m=2, cluster_n=1),
    "act-dgelu": dict(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1),
    "dact-dgelu": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1),
}
"""The SM90 tiles the ops run the forward GEMM ("act") and the backward GEMM ("dact") with: the fastest of the nine
tiles of quack's config space the `quack-tiles` part of `benchmarks/fa4_gpu_check.py` tried for ViT-L's MLP at
mixed-64's 60,038 tokens on an H100 (2026-12-07): 128 x 128 ping-pong with a 2 x 1 cluster for both, 0.816 ms
(forward) and 1.081 ms (backward, bias gradient in the epilogue), against 0.838 and 1.124 ms for the tiles before
(256 x 128 cooperative 1 x 2, 128 x 256 cooperative 2 x 1) and 0.916 / 1.357 ms for quack's default (twelfth
session). The backward's tile was chosen with the epilogue that also stores the GELU output; the training op's
default launch (the forward kept that output, sixteenth session) leaves it out and was not swept again. Never
``tuned=True``, whose autotuner keys on the token count and would sweep its configs again for every pack size.
"act-dgelu" and "dact-dgelu": the same GEMMs with the stored-derivative epilogues (`quack_linear_gelu_dgelu`,
`quack_dgelu_grad`, the default "quack-dgelu"), the fastest of the same nine tiles on the H100 (2026-12-07,
seventeenth session, `--parts quack-tiles --quack-tile-kinds dact-dgelu,act-dgelu`): 128 x 256 cooperative with a
2 x 1 cluster for the forward, 0.875 ms against 0.905 at the 128 x 128 ping-pong tile, and 128 x 192 ping-pong with
a 2 x 1 cluster for the backward, 0.737 ms against 0.795 (the backward with the erf took 1.081)."""

FUSED_BIAS_GRAD = True
"""Whether `quack_gelu_grad` sums the bias gradient in its GEMM's epilogue (True) or, as quack's `gemm_dact` leaves
it, in a separate pass over ``grad_pre`` (False; for benchmarks that compare the two). Read at every call."""

CONFIGS: dict[str, object | None] = {kind: None for kind in TILES}
"""Overrides for benchmarks that compare tiles: a `quack.gemm_config.GemmConfig` (`gemm_config`), "default" for
quack's own default tile (``tuned=False``), or None for `TILES`."""


@functools.cache
def gemm_config(tile_m: int, tile_n: int, pingpong: bool, cluster_m: int, cluster_n: int):
    """A quack `GemmConfig` for SM90 (``is_dynamic_persistent=False``; the backward's launches ask for quack's dynamic
    tile scheduler themselves, as `gemm_dact` does by default). Cached, so the objects are kept: quack's epilogue
    mods key their launch cache by the config object's identity (`EpiMod.__call__`, quack 0.6.5), so a config made
    anew for each call would miss that cache, and one whose id a freed config had could hit another tile's entry.
    (Keyword and positional calls of the same tile are two cache entries: two kept objects, which is harmless.)"""
    from quack.gemm_config import GemmConfig

    return GemmConfig(
        tile_m=tile_m,
        tile_n=tile_n,
        pingpong=pingpong,
        cluster_m=cluster_m,
        cluster_n=cluster_n,
        is_dynamic_persistent=False,
        device_capacity=9,
    )


def _choice(kind: str) -> dict:
    """quack's keyword arguments that pick the tile of `kind` (a key of `TILES`)."""
    override = CONFIGS[kind]
    if override == "default":
        return {"tuned": False}
    return {"config": gemm_config(**TILES[kind]) if override is None else override}


@functools.cache
def quack_missing() -> str | None:
    """Why quack's GEMMs cannot be used in this environment (None: they can): not installed, or installed outside a
    ``site-packages`` / ``dist-packages`` directory, where quack 0.6.5 fails to build its GELU epilogues (it
    recognises installed code by that directory name; see the module docstring)."""
    try:
        import quack.gemm_interface
    except Exception as e:  # not installed, or a build without its CUDA libraries
        return f"needs quack-kernels, which cannot be imported ({type(e).__name__}: {e})"
    import cutlass
    import quack

    for module in (quack, cutlass):
        where = os.path.realpath(module.__file__)
        if f"{os.sep}site-packages{os.sep}" not in where and f"{os.sep}dist-packages{os.sep}" not in where:
            return (
                f"{module.__name__} is installed at {os.path.dirname(where)}, outside a site-packages directory, "
                "where quack-kernels 0.6.5 cannot build its GELU epilogues"
            )
    return None


def quack_gemms_available(device: torch.device) -> bool:
    """Whether quack's GEMMs can run on `device`: a CUDA device of compute capability 9.x (Hopper, where they were
    measured against the Triton kernels) with quack-kernels usable (`quack_missing`)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and quack_missing() is None


def _runs_quack(*tensors: torch.Tensor) -> bool:
    """Whether these tensors take quack's kernels: CUDA, one fp16/bf16 dtype, 2-D with unit inner stride and
    16-byte aligned rows (TMA), on a device `quack_gemms_available` accepts."""
    first = tensors[0]
    if not first.is_cuda or first.dtype not in _DTYPES:
        return False
    for t in tensors:
        if t.device != first.device or t.dtype != first.dtype or t.dim() != 2:
            return False
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return quack_gemms_available(first.device)


def _bias_matches(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """No bias, or one on x's device in x's dtype (what quack's epilogue reads as a row operand)."""
    return bias is None or (bias.device == x.device and bias.dtype == x.dtype)


@torch.library.custom_op("dinov3_packing::quack_linear_gelu", mutates_args=())
def _quack_linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(pre), pre)`` with ``pre = x @ weight.T + bias`` for 2-D ``x [M, K]``, ``weight [N, K]``."""
    if _runs_quack(x, weight) and _bias_matches(x, bias):
        from quack.gemm_interface import gemm_act

        pre, y = gemm_act(x, weight.t(), bias=bias, activation="gelu_erf", store_preact=True, **_choice("act"))
        return y, pre
    pre = F.linear(x, weight, bias)
    return F.gelu(pre), pre


def _linear_fake(x, weight, bias):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, torch.empty_like(y)


_quack_linear_gelu.register_fake(_linear_fake)


@torch.library.custom_op("dinov3_packing::quack_linear_gelu_dgelu", mutates_args=())
def _quack_linear_gelu_dgelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(pre), gelu'(pre))`` with ``pre = x @ weight.T + bias`` for 2-D ``x [M, K]``, ``weight [N, K]``: the
    exact GELU and its derivative, both from the fp32 accumulator plus bias and rounded once to x's dtype, from one
    GEMM whose epilogue (`_deriv_mod`) evaluates quack's own `dgelu_erf` of a unit gradient. For a training op whose
    backward then only multiplies by the stored derivative (`quack_dgelu_grad`): the erf and the exp move from the
    backward's epilogue into the forward's, which computes the erf anyway. Falls back to the torch ops (``F.gelu``
    and ATen's ``gelu_backward`` of a unit gradient, as `linear_gelu_dgelu` does)."""
    if _runs_quack(x, weight) and _bias_matches(x, bias) and x.shape[0] > 0:
        y, deriv = x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[0]))
        operands = {} if bias is None else {"bias": bias}
        _deriv_mod(bias is not None)(
            x, weight.t(), out={"D": deriv, "postact": y}, **({"tuned": True} | _choice("act-dgelu")), **operands
        )
        return y, deriv
    pre = F.linear(x, weight, bias)
    return F.gelu(pre), torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)


_quack_linear_gelu_dgelu.register_fake(_linear_fake)


@functools.cache
def _deriv_mod(bias: bool):
    """The forward's epilogue as a quack epilogue mod: from the accumulator ``acc = x @ weight.T`` (plus the bias, a
    row-broadcast operand, where `bias`), ``D = gelu'(pre)`` and ``postact = gelu(pre)`` by quack's `dgelu_erf` with
    a unit gradient (so the same erf and exp2 approximations as its backward epilogue). Built at the first GPU call."""
    from quack.activation import dact_fn_map
    from quack.epilogue.frontend import gemm_epilogue
    from quack.epilogue.ops import RowVecLoad

    dgelu = dact_fn_map["gelu_erf"]
    if bias:

        def gelu_erf_deriv_bias(acc, bias):
            deriv, out = dgelu(acc + bias, 1.0)
            return {"D": deriv, "postact": out}

        return gemm_epilogue(outputs=("postact",), ops={"bias": RowVecLoad("bias")})(gelu_erf_deriv_bias)

    def gelu_erf_deriv(acc):
        deriv, out = dgelu(acc, 1.0)
        return {"D": deriv, "postact": out}

    return gemm_epilogue(outputs=("postact",))(gelu_erf_deriv)


@torch.library.custom_op("dinov3_packing::quack_dgelu_grad", mutates_args=())
def _quack_dgelu_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, deriv: torch.Tensor, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_pre, grad_pre.sum(0) or an empty tensor)`` with ``grad_pre = (grad_out @ weight) * deriv`` for 2-D
    ``grad_out [M, K]``, ``weight [K, N]`` and the stored derivative ``deriv = gelu'(pre) [M, N]``
    (`quack_linear_gelu_dgelu`): one GEMM whose epilogue multiplies (no erf) and, when `bias_grad`, sums the fp32
    ``grad_pre`` over each tile's rows (`_product_mod`, as `quack_gelu_grad`'s fused bias sum). Falls back to the
    torch ops, which sum the rounded ``grad_pre``."""
    if _runs_quack(grad_out, weight, deriv) and grad_out.shape[0] > 0:
        res = _product_mod(bias_grad)(
            grad_out, weight, deriv, dynamic_scheduler=True, **({"tuned": True} | _choice("dact-dgelu"))
        )
        return res["D"], res["dbias"].to(deriv.dtype) if bias_grad else deriv.new_empty(0)
    grad_pre = (grad_out @ weight) * deriv
    return grad_pre, grad_pre.sum(0) if bias_grad else deriv.new_empty(0)


@_quack_dgelu_grad.register_fake
def _(grad_out, weight, deriv, bias_grad):
    return torch.empty_like(deriv), deriv.new_empty(deriv.shape[1] if bias_grad else 0)


@functools.cache
def _product_mod(bias_grad: bool):
    """The backward's epilogue for a stored derivative as a quack epilogue mod: from the accumulator ``acc =
    grad_out @ weight`` and the C operand ``deriv``, ``D = acc * deriv`` and, where `bias_grad`, ``dbias``, D in fp32
    summed over each tile's rows (`RowVecReduce`, as in `_dgelu_mod`). Built at the first GPU call."""
    from quack.epilogue.frontend import gemm_epilogue
    from quack.epilogue.ops import RowVecReduce

    if bias_grad:

        def gelu_deriv_product_bias_grad(acc, c):
            dx = acc * c
            return {"D": dx, "dbias": dx}

        return gemm_epilogue(reduces={"dbias": RowVecReduce("dbias")})(gelu_deriv_product_bias_grad)

    def gelu_deriv_product(acc, c):
        return {"D": acc * c}

    return gemm_epilogue()(gelu_deriv_product)


@torch.library.custom_op("dinov3_packing::quack_gelu_grad", mutates_args=())
def _quack_gelu_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, bias_grad: bool, postact: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_pre, gelu(pre) or an empty tensor, grad_pre.sum(0) or an empty tensor)`` with ``grad_pre = (grad_out @
    weight) * gelu'(pre)`` for 2-D ``grad_out [M, K]``, ``weight [K, N]``, ``pre [M, N]``. `postact`: recompute the
    GELU output too (for a caller that did not keep the forward's); without it the GEMM stores ``grad_pre`` only."""
    if _runs_quack(grad_out, weight, pre):
        fused_bias = bias_grad and FUSED_BIAS_GRAD
        if (fused_bias or not postact) and grad_out.shape[0] > 0:  # (no rows: gemm_dact's own empty-input path)
            # quack's `gemm_dact` launch (its dynamic tile scheduler, the tile of `_choice`) with the bias sum added
            # and/or the GELU output left out.
            res = _dgelu_mod(postact, fused_bias)(
                grad_out, weight, pre, dynamic_scheduler=True, **({"tuned": True} | _choice("dact"))
            )
            y = res["postact"] if postact else pre.new_empty(0)
            if fused_bias:
                return res["D"], y, res["dbias"].to(pre.dtype)
            grad_pre = res["D"]
        else:
            from quack.gemm_interface import gemm_dact

            grad_pre, y = gemm_dact(grad_out, weight, pre, activation="gelu_erf", **_choice("dact"))
            y = y if postact else pre.new_empty(0)
    else:
        grad_pre = torch.ops.aten.gelu_backward(grad_out @ weight, pre)
        y = F.gelu(pre) if postact else pre.new_empty(0)
    # The sum of the rounded grad_pre, accumulated in fp32 by ATen (what autograd of the unfused MLP computes; the
    # fused epilogue above sums grad_pre before its rounding).
    grad_b = grad_pre.sum(0) if bias_grad else pre.new_empty(0)
    return grad_pre, y, grad_b


@functools.cache
def _dgelu_mod(postact: bool, bias_grad: bool):
    """The epilogue of `gemm_dact` for the exact GELU as a quack epilogue mod (`quack.epilogue.frontend.
    gemm_epilogue`), with the GELU output (`postact`) and/or the bias gradient (`bias_grad`) among its outputs: from
    the accumulator ``acc = grad_out @ weight`` and the C operand ``pre``, ``D = acc * gelu'(pre)`` (the gradient of
    the pre-activation) and ``postact = gelu(pre)`` by quack's own `dgelu_erf` (what `gemm_dact(activation=
    "gelu_erf")` computes), and ``dbias``, D in fp32 summed over each tile's rows (`RowVecReduce`; rows past the
    token count are zeros). Calling it returns ``{"D"}`` with ``"postact"`` and ``"dbias"`` (the fp32 sum of the
    tiles' partial sums) where asked. Built at the first GPU call (quack imported then)."""
    from quack.activation import dact_fn_map
    from quack.epilogue.frontend import gemm_epilogue
    from quack.epilogue.ops import RowVecReduce

    dgelu = dact_fn_map["gelu_erf"]
    reduces = {"dbias": RowVecReduce("dbias")} if bias_grad else None
    # One function per output set: quack fingerprints an epilogue by its function's source.
    if postact and bias_grad:

        def dgelu_erf_bias_grad(acc, c):
            dx, out = dgelu(c, acc)
            return {"D": dx, "postact": out, "dbias": dx}

        return gemm_epilogue(outputs=("postact",), reduces=reduces)(dgelu_erf_bias_grad)
    if postact:
        raise ValueError("postact without bias_grad: quack's gemm_dact computes that")
    if bias_grad:

        def dgelu_erf_bias_grad_only(acc, c):
            dx, _ = dgelu(c, acc)
            return {"D": dx, "dbias": dx}

        return gemm_epilogue(reduces=reduces)(dgelu_erf_bias_grad_only)

    def dgelu_erf_only(acc, c):
        dx, _ = dgelu(c, acc)
        return {"D": dx}

    return gemm_epilogue()(dgelu_erf_only)


@_quack_gelu_grad.register_fake
def _(grad_out, weight, pre, bias_grad, postact=True):
    y = torch.empty_like(pre) if postact else pre.new_empty(0)
    return torch.empty_like(pre), y, pre.new_empty(pre.shape[1] if bias_grad else 0)
