"""The MLP of a block: the one place that knows the fused MLP kernel.

`feed_forward(mlp, x, batch)` runs a block's MLP module, or, when `batch.fused_mlp` is set and the module is
a plain Hugging Face GELU MLP, its up-projection, bias and exact GELU as one Triton GEMM
(`ops/triton/linear_gelu.py`) followed by the module's own down-projection. When autograd records and the
down-projection is a plain `nn.Linear` too, the whole MLP runs as one custom op (`gelu_mlp`) whose backward
fuses the GELU derivative and the up-projection's bias gradient into the GEMM that carries the gradient back
through the down-projection (`gelu_grad`). With `recompute=True` (`parallel.recompute`'s "mlp" policy) any
path runs under non-reentrant checkpoint. `fused_mlp_setting` validates the model's `fused_mlp=` option;
`fused_mlp_runs` is the device/dtype gate.

Every check here runs inside `torch.compile`'s region, and Dynamo reuses a graph for any module that passes
the graph's guards, a module of another model of the same config included. So each check reads what Dynamo
guards: types, a batch field, and attributes looked up as Python looks them up (not `vars()`, whose contents
Dynamo does not guard). Module hooks are the exception: by default (`torch._dynamo.config.
skip_nnmodule_hook_guards`) Dynamo does not guard them, so a hook added after a model of the same config was
compiled may not be seen there (on the H100, a model whose down-projections had a forward hook ran another
model's graph without recompiling); attach hooks before the first compiled call, or change a module's type.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.utils.checkpoint import checkpoint
from transformers.activations import GELUActivation
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTMLP

from ..packing import PackedBatch
from .quack import quack_gemms_available, quack_missing  # the module also registers the quack ops the training op calls
from .triton import linear_gelu as _lg
from .triton.linear_gelu import linear_gelu


def fused_mlp_setting(value: bool | None, use_gated_mlp: bool, hidden_act: str) -> bool:
    """The model's `fused_mlp` option, validated: None (auto) is on wherever the kernel computes the MLP
    exactly (a plain GELU MLP: ViT-S/B/L), not for the gated (SwiGLU) MLPs of ViT-H+ and 7B."""
    if value is None:
        return not use_gated_mlp and hidden_act == "gelu"
    if not isinstance(value, bool):
        raise TypeError(f"fused_mlp: expected a bool or None (auto), got {type(value).__name__}")
    if value and use_gated_mlp:
        raise ValueError(
            "fused_mlp: the fused up-projection + GELU kernel needs a plain GELU MLP; this config has a "
            "gated (SwiGLU) MLP"
        )
    if value and hidden_act != "gelu":
        raise ValueError(f"fused_mlp: the kernel computes the exact GELU; config.hidden_act is {hidden_act!r}")
    return value


def fused_mlp_runs(enabled: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs for a forward, with or without autograd: enabled, CUDA, fp16/bf16."""
    return enabled and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


# The forwards a plain MLP and up-projection run, as they were at import: one patched on the class later (as
# some libraries patch transformers' or torch's modules) is behaviour the fused path must not bypass either.
_MLP_FORWARD = DINOv3ViTMLP.forward
_LINEAR_FORWARD = nn.Linear.forward
_GELU_FORWARD = GELUActivation.forward


def _is_plain(mlp: nn.Module) -> bool:
    """Whether the fused kernel computes exactly what `mlp` would: the Hugging Face GELU MLP with plain
    `nn.Linear` projections and transformers' exact GELU, no forward or backward hooks and no forward replaced on
    the instance or the class. A replaced or wrapped projection (LoRA adapters, quantized layers), a hook or a
    wrapped forward keeps the module path, so nothing attached to the MLP is bypassed."""
    if type(mlp) is not DINOv3ViTMLP or type(mlp.up_proj) is not nn.Linear:
        return False
    # A forward replaced on the instance (a user's wrapper) is behaviour attached to it. Looked up as an
    # attribute, which Dynamo guards (whether the instance holds a `forward`, and which one); it does not
    # guard what `vars(mlp)` contains, so a graph traced for a plain MLP would run for a wrapped one.
    if not (runs_forward(mlp, _MLP_FORWARD) and runs_forward(mlp.up_proj, _LINEAR_FORWARD)):
        return False
    # The kernel computes the exact (erf) GELU: the activation must be transformers' GELU module as built for
    # `hidden_act="gelu"`, running `F.gelu` (not replaced, wrapped or switched to its Python form).
    act = mlp.act_fn
    if type(act) is not GELUActivation or not runs_forward(act, _GELU_FORWARD) or act.act is not F.gelu:
        return False
    if any(_hooked(m) for m in (mlp, mlp.up_proj, mlp.act_fn)):
        return False
    return not (
        _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
        or _module_globals._global_backward_pre_hooks
    )


def _hooked(module: nn.Module) -> bool:
    """A forward or backward hook on `module` (the fused path would skip a backward hook too: the module's output is
    not computed by the module)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def runs_forward(module: nn.Module, function) -> bool:
    """Whether `module.forward` is `function` bound to `module` itself: not another module's forward set on
    the instance (which computes with that module's weights), not a wrapper on the instance or the class."""
    forward = module.forward
    # Not `getattr(forward, "__func__", None)`: Dynamo (torch 2.14) traces that to None for a bound method.
    return isinstance(forward, types.MethodType) and forward.__self__ is module and forward.__func__ is function


def _down_is_plain(mlp: nn.Module) -> bool:
    """Whether the down-projection is a plain `nn.Linear` with nothing attached, so that the training op may run
    its product itself (`_is_plain` has checked the rest of the MLP and the global hooks)."""
    down = mlp.down_proj
    if type(down) is not nn.Linear or not runs_forward(down, _LINEAR_FORWARD):
        return False
    return not _hooked(down)


def _records(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))


def _run(
    mlp: nn.Module,
    x: torch.Tensor,
    fused: bool,
    gemms: str,
    fold: torch.Tensor | None,
    recompute_gelu: bool = False,
    down_bias: bool = True,
) -> torch.Tensor:
    """The MLP; `fold` (a LayerScale, given only where `fused` and the down-projection is plain): its product with
    the output, folded into the down-projection's weight and bias where the training op runs; `recompute_gelu`: the
    training op's (`gelu_mlp`); `down_bias=False` (only with `fold`): without the down-projection's bias."""
    if fused:
        up, down = mlp.up_proj, mlp.down_proj
        records = _records(x, up.weight, up.bias, down.weight, down.bias, fold)
        if _down_is_plain(mlp) and (records or not down_bias):
            weight, bias = down.weight, down.bias if down_bias else None
            if fold is not None:  # (h W^T + b) * s == h (s W)^T + s b
                weight = weight * fold[:, None]
                bias = bias * fold if bias is not None else None
            if not records:  # (the bias left out where autograd does not record: no training op to run)
                return F.linear(linear_gelu(x, up.weight, up.bias), weight, bias)
            return gelu_mlp(x, up.weight, up.bias, weight, bias, gemms, recompute_gelu)
        out = down(linear_gelu(x, up.weight, up.bias))
    else:
        out = mlp(x)
    return out if fold is None else out * fold


MLP_GEMMS = ("triton", "triton-dgelu", "quack", "quack-dgelu")
"""The GEMM kernels of the training op `gelu_mlp`: "triton" (`ops/triton/linear_gelu.py`: the forward keeps the GELU
output and the pre-activation, the backward's GEMM, `gelu_grad`, computes the GELU's derivative in its epilogue),
"triton-dgelu" (where both Triton kernels run, `linear_gelu.dgelu_path_runs`, the forward keeps the derivative at
the pre-activation instead, `linear_gelu_dgelu`, and the backward's GEMM, `dgelu_grad`, multiplies by it: a product
in the epilogue where "triton" has the erf; elsewhere it is "triton"; on the H100 no faster than "triton",
fourteenth session), "quack" (`ops/quack.py`: quack-kernels' GEMMs with the GELU in their epilogues; the forward
keeps only the GELU output and the pre-activation, as "triton" does; under `parallel.recompute`'s "gelu" policy only
the pre-activation, and the backward recomputes the GELU output in its GEMM's epilogue) or "quack-dgelu" (quack's
GEMMs, the forward keeping the derivative at the pre-activation instead, `quack_linear_gelu_dgelu`, and the
backward's GEMM multiplying by it, `quack_dgelu_grad`: the erf and exp leave the backward's epilogue; what "auto"
takes where quack runs; under the "gelu" policy it is "quack", which keeps the pre-activation that policy recomputes
from)."""

_QUACK = ("quack", "quack-dgelu")  # the choices of `MLP_GEMMS` that run quack's GEMMs


def mlp_gemms_setting(value: str) -> str:
    """The model's `mlp_gemms` option, validated: "auto" or one of `MLP_GEMMS`."""
    if not isinstance(value, str):
        raise TypeError(f"mlp_gemms: expected a str, got {type(value).__name__}")
    if value not in ("auto", *MLP_GEMMS):
        raise ValueError(f"mlp_gemms: expected 'auto' or one of {MLP_GEMMS}, got {value!r}")
    return value


def resolve_mlp_gemms(value: str, device: torch.device, fused: bool) -> str:
    """The GEMMs the training op runs on `device` (`fused`: the fused MLP runs there, `fused_mlp_runs`): "auto" is
    "quack-dgelu" where quack-kernels runs (`ops.quack.quack_gemms_available`: Hopper with the package installed;
    on the H100 its ViT-L mixed-64 step took 270-272 ms against 276-278 for "quack", 2026-12-07, seventeenth
    session), else "triton"; "quack" or "quack-dgelu" asked for where the fused MLP runs but quack cannot raises
    ValueError."""
    if value in ("triton", "triton-dgelu"):
        return value
    if not fused:
        return "triton"
    available = quack_gemms_available(device)
    if value in _QUACK:
        if not available:
            reason = quack_missing() or f"a CUDA device of compute capability 9.x; the model is on {device}"
            raise ValueError(f'mlp_gemms={value!r}: {reason} (pip install "dinov3-packing[hopper]")')
        return value
    return "quack-dgelu" if available else "triton"


@torch.library.custom_op("dinov3_packing::gelu_mlp", mutates_args=())
def _gelu_mlp_op(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    gemms: str = "triton",
    recompute_gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(down(gelu(up(x))), gelu(up(x)), s)``: the up-projection GEMM with the GELU in its epilogue, storing `s`
    too: ``gelu'(up(x))`` where `_stores_deriv` ("triton-dgelu", "quack-dgelu"), else the pre-activation
    ``up(x)`` (`gemms`: `MLP_GEMMS`), then the down-projection (cuBLAS). The last two outputs are what the backward
    may read; nothing else should. `recompute_gelu`: the backward recomputes ``gelu(up(x))`` instead of keeping it
    (see `gelu_mlp`)."""
    deriv = _stores_deriv(gemms, x, up_weight, up_bias, down_weight, recompute_gelu)
    if gemms in _QUACK:
        op = torch.ops.dinov3_packing.quack_linear_gelu_dgelu if deriv else torch.ops.dinov3_packing.quack_linear_gelu
        h, pre = op(x.reshape(-1, x.shape[-1]), up_weight, up_bias)
        shape = (*x.shape[:-1], up_weight.shape[0])  # (not -1: a pack of no tokens has no size to infer it from)
        h, pre = h.view(shape), pre.view(shape)
    elif deriv:
        h, pre = torch.ops.dinov3_packing.linear_gelu_dgelu(x, up_weight, up_bias)  # `pre` holds gelu'(pre)
    else:
        h, pre = torch.ops.dinov3_packing.linear_gelu(x, up_weight, up_bias, True)
    return F.linear(h, down_weight, down_bias), h, pre


def _stores_deriv(gemms: str, x, up_weight, up_bias, down_weight, recompute_gelu: bool) -> bool:
    """Whether the op's forward keeps gelu'(pre) rather than pre (a function of the op's arguments and the inputs'
    types, shapes and devices, so the forward and `setup_context` agree, also on fake tensors): "quack-dgelu" but
    under the "gelu" policy (which recomputes the GELU output from the pre-activation), "triton-dgelu" where both
    Triton kernels run."""
    if gemms == "quack-dgelu":
        return not recompute_gelu
    return gemms == "triton-dgelu" and _lg.dgelu_path_runs(x, up_weight, up_bias, down_weight)


@_gelu_mlp_op.register_fake
def _(x, up_weight, up_bias, down_weight, down_bias, gemms="triton", recompute_gelu=False):
    hidden = x.new_empty((*x.shape[:-1], up_weight.shape[0]))
    return x.new_empty((*x.shape[:-1], down_weight.shape[0])), hidden, torch.empty_like(hidden)


def _gelu_mlp_setup_context(ctx, inputs, output) -> None:
    x, up_weight, up_bias, down_weight, down_bias, gemms, recompute_gelu = inputs
    _, h, pre = output
    ctx.has_up_bias, ctx.has_down_bias, ctx.gemms = up_bias is not None, down_bias is not None, gemms
    ctx.deriv = _stores_deriv(gemms, x, up_weight, up_bias, down_weight, recompute_gelu)
    # Recomputing the GELU output needs the pre-activation, which "triton-dgelu" does not keep.
    keep_h = not recompute_gelu or ctx.deriv
    ctx.save_for_backward(x, up_weight, down_weight, h if keep_h else None, pre)
    ctx.mark_non_differentiable(h, pre)


def _gelu_mlp_backward(ctx, grad_out: torch.Tensor, _grad_h, _grad_pre):
    """The two linears' gradients, with the product through the down-projection and the GELU derivative as one
    GEMM (`dgelu_grad` with the stored derivative, `gelu_grad`, or `quack_gelu_grad`, which also recomputes the
    GELU output for the down-projection's weight gradient where the forward's was not kept), whose epilogue
    multiplies by gelu'(pre); so neither the gradient of the GELU output nor a separate elementwise pass over the
    4D-wide activations remains (but for the recomputed GELU output of the Triton kernels' "gelu" policy)."""
    x, up_weight, down_weight, h, pre = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    g = grad_out.reshape(-1, grad_out.shape[-1])
    pre = pre.reshape(-1, pre.shape[-1])
    grad_x = grad_w1 = grad_b1 = grad_pre = None
    bias_grad = ctx.has_up_bias and need_b1
    if need_x or need_w1 or need_b1:
        if ctx.deriv:  # `pre` holds gelu'(pre): the GEMM's epilogue multiplies by it
            product = (
                torch.ops.dinov3_packing.quack_dgelu_grad
                if ctx.gemms in _QUACK
                else torch.ops.dinov3_packing.dgelu_grad
            )
            grad_pre, grad_b = product(g, down_weight, pre, bias_grad)
        elif ctx.gemms in _QUACK:
            recompute = h is None and need_w2
            grad_pre, y, grad_b = torch.ops.dinov3_packing.quack_gelu_grad(g, down_weight, pre, bias_grad, recompute)
            h = y if recompute else h
        else:
            grad_pre, grad_b = torch.ops.dinov3_packing.gelu_grad(g, down_weight, pre, bias_grad)
        grad_b1 = grad_b if bias_grad else None
    if h is None and need_w2:  # the forward kept no GELU output, and no GEMM above recomputed it
        h = F.gelu(pre)
    grad_w2 = g.t() @ h.reshape(-1, h.shape[-1]) if need_w2 else None
    grad_b2 = g.sum(0) if ctx.has_down_bias and need_b2 else None
    if grad_pre is not None:
        grad_x = (grad_pre @ up_weight).reshape(x.shape) if need_x else None
        grad_w1 = grad_pre.t() @ x.reshape(-1, x.shape[-1]) if need_w1 else None
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


_gelu_mlp_op.register_autograd(_gelu_mlp_backward, setup_context=_gelu_mlp_setup_context)


def gelu_mlp(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    gemms: str = "triton",
    recompute_gelu: bool = False,
) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, up_weight, up_bias)), down_weight, down_bias)`` (exact GELU) as one custom op
    whose backward fuses the GELU derivative into the down-projection's input-gradient GEMM. For training.

    `gemms` (`MLP_GEMMS`): "triton" keeps the GELU output and the pre-activation for the backward, as the unfused
    MLP does, and runs ``torch.ops.dinov3_packing.gelu_grad`` there; "triton-dgelu" keeps the GELU's derivative
    at the pre-activation instead (as many bytes) and runs ``dgelu_grad``, where both Triton kernels run (else it
    is "triton"); "quack" keeps both too and runs ``torch.ops.dinov3_packing.quack_gelu_grad``; "quack-dgelu"
    keeps the GELU output and its derivative, as "triton-dgelu" does, from quack's GEMMs (``quack_linear_gelu_dgelu``,
    ``quack_dgelu_grad``). All fall back to the torch ops where their kernels cannot run.

    `recompute_gelu` (`parallel.recompute`'s "gelu" policy): keep only the pre-activation, not the GELU output (one
    ``[tokens, 4D]`` activation less); the backward recomputes the GELU output, in the gradient GEMM's epilogue
    for "quack" (which then stores two ``[tokens, 4D]`` tensors instead of one) and in an elementwise pass for
    "triton". "triton-dgelu" keeps no pre-activation to recompute it from, so it keeps the GELU output;
    "quack-dgelu" runs as "quack" under it."""
    if gemms not in MLP_GEMMS:
        raise ValueError(f"gemms: expected one of {MLP_GEMMS}, got {gemms!r}")
    if not isinstance(recompute_gelu, bool):
        raise TypeError(f"recompute_gelu: expected a bool, got {type(recompute_gelu).__name__}")
    return torch.ops.dinov3_packing.gelu_mlp(x, up_weight, up_bias, down_weight, down_bias, gemms, recompute_gelu)[0]


def down_bias_apart(mlp: nn.Module, batch: PackedBatch, out_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The down-projection's bias times `out_scale` where `feed_forward(..., out_scale=out_scale, down_bias=False)`
    leaves it out (the fused MLP with a plain down-projection that has a bias, and a LayerScale to fold), else
    None (and `feed_forward` must keep it: `down_bias=True`)."""
    if out_scale is None or not (batch.fused_mlp and _is_plain(mlp) and _down_is_plain(mlp)):
        return None
    bias = mlp.down_proj.bias
    return bias * out_scale if bias is not None else None


def feed_forward(
    mlp: nn.Module,
    x: torch.Tensor,
    batch: PackedBatch,
    recompute: bool = False,
    out_scale: torch.Tensor | None = None,
    recompute_gelu: bool = False,
    down_bias: bool = True,
) -> torch.Tensor:
    """`mlp(x)`, with the up-projection + bias + GELU fused where `batch.fused_mlp` allows it.

    `recompute`: when autograd records, keep only `x` for backward and run the MLP (fused or not) again
    there instead of keeping its 4D-wide activations. The fused op has a backward of its own, so it is
    recomputed like any other op.

    `recompute_gelu`: where the fused training op runs, it keeps the pre-activation only and its backward
    recomputes the GELU output (`gelu_mlp`); elsewhere it changes nothing.

    `out_scale`: a `[D]` LayerScale to multiply the output by (`mlp(x) * out_scale`). Where the fused training op
    runs (`gelu_mlp`) it multiplies the down-projection's weight rows and bias instead, so autograd keeps neither
    the op's output nor the product for the scale's gradient; elsewhere it multiplies the output, outside the
    recomputed part (its gradient then reads the output the forward computed, also where a hook on the MLP was
    removed before the backward recomputes it).

    `down_bias=False`: leave out the down-projection's bias (times `out_scale`), which the caller adds; only where
    `down_bias_apart` gives it (else ValueError).
    """
    # Decided here, outside the checkpoint: backward's recomputation runs the path the forward took, also
    # when a hook was added or removed in between (the other path would rebuild other saved tensors).
    fused = batch.fused_mlp and _is_plain(mlp)
    fold = out_scale if out_scale is not None and fused and _down_is_plain(mlp) else None
    if not down_bias and (fold is None or mlp.down_proj.bias is None):
        raise ValueError("down_bias=False: only where ops.mlp.down_bias_apart gives the bias to add apart")
    if recompute and torch.is_grad_enabled():
        out = checkpoint(_run, mlp, x, fused, batch.mlp_gemms, fold, recompute_gelu, down_bias, use_reentrant=False)
    else:
        out = _run(mlp, x, fused, batch.mlp_gemms, fold, recompute_gelu, down_bias)
    return out * out_scale if out_scale is not None and fold is None else out
