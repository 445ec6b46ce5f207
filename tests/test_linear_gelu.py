"""The fused linear + exact-GELU kernels (ops/triton/linear_gelu.py) on CPU.

The Triton kernels run under Triton's CPU interpreter, which reads ``TRITON_INTERPRET=1`` when Triton is
imported, so those cases run in one subprocess with that variable set. Reference: ``F.gelu(F.linear(...))`` in
fp64 on the same (rounded) inputs. Tolerances: fp32 inputs, 1e-5 of max |ref| (measured ~2e-7: the interpreter's
fp32 matmul plus the GELU's < 3e-7 absolute); fp16 inputs, each element within one fp16 rounding of the output
(2**-11 of |ref|, floor 2**-24) plus 1e-5 of max |ref| for fp32 accumulation order. bf16 is not run under the
interpreter: its ``tl.dot`` multiplies bf16's uint16 storage as integers (Triton 3.8), so bf16 is checked on a
GPU only. The epilogue's GELU itself is checked elementwise against fp64 over [-14, 14] and out to +-1e4.

The torch fallback (CPU, fp32, autograd) must equal ``F.gelu(F.linear(...))`` exactly, and the custom op must be
registered with a fake implementation that ``torch.compile`` can trace through.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import capturing_aot_backend
from triton_interpreter import run_interpreted

from dinov3_packing.ops.triton import linear_gelu as lg

pytest.importorskip("triton")

# (name, dtype, M, K, N, bias, x layout, kernel, config): tails in M, N and K, grouped order with a partial last
# group, a persistent grid of 4 programs looping over many tiles, a row view of a wider tensor (stride(0) != K),
# a transposed x (stride(1) != 1), both epilogue forms, and the production configs.
_SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
_SMALL_TMA = dict(**_SMALL, EPI_SUBTILE=True)
_SMALL_NOSUB = dict(**_SMALL, EPI_SUBTILE=False)
# The other schedules (`CANDIDATE_CONFIGS`): two programs per SM (a grid and tile stride of 2 x the 4 programs the
# interpreter runs), flattened or not, and the unflattened loop with one program per SM.
_SMALL_OCC2 = dict(**_SMALL_TMA, OCC=2, FLATTEN=False)
_SMALL_OCC2_FLAT = dict(**_SMALL_NOSUB, OCC=2)
_SMALL_UNFLAT = dict(**_SMALL_TMA, FLATTEN=False)
INTERPRETER_CASES = [
    ("ptr_fp32_tails", "float32", 130, 72, 100, True, "contiguous", "ptr", _SMALL),
    ("ptr_fp32_even", "float32", 130, 128, 192, True, "contiguous", "ptr", dict(_SMALL, BLOCK_K=64)),
    ("ptr_fp32_nobias", "float32", 37, 64, 128, False, "contiguous", "ptr", _SMALL),
    ("ptr_fp32_rowview", "float32", 37, 64, 128, True, "rowview", "ptr", _SMALL),
    ("ptr_fp32_transposed", "float32", 37, 96, 64, True, "transposed", "ptr", _SMALL),
    ("ptr_fp16_tails", "float16", 130, 72, 100, True, "contiguous", "ptr", _SMALL),
    ("ptr_fp16_rowview", "float16", 130, 72, 100, True, "rowview", "ptr", _SMALL),
    ("ptr_fp16_prod", "float16", 130, 128, 256, True, "rowview", "ptr", lg.PTR_CONFIGS[1]),
    ("tma_fp32_tails", "float32", 130, 72, 200, True, "contiguous", "tma", _SMALL_TMA),
    ("tma_fp32_even", "float32", 130, 64, 128, True, "contiguous", "tma", _SMALL_TMA),
    ("tma_fp32_nosub", "float32", 130, 72, 200, True, "contiguous", "tma", _SMALL_NOSUB),
    ("tma_fp32_nosub_transposed", "float32", 37, 64, 96, True, "transposed", "tma", _SMALL_NOSUB),
    ("tma_fp32_nobias", "float32", 37, 64, 128, False, "contiguous", "tma", _SMALL_TMA),
    ("tma_fp32_rowview", "float32", 37, 64, 128, True, "rowview", "tma", _SMALL_TMA),
    ("tma_fp32_transposed", "float32", 37, 96, 64, True, "transposed", "tma", _SMALL_TMA),
    ("tma_fp16_tails", "float16", 130, 72, 200, True, "contiguous", "tma", _SMALL_TMA),
    ("tma_fp16_prod0", "float16", 130, 128, 256, True, "rowview", "tma", lg.CONFIGS[0]),
    ("tma_fp16_prod2", "float16", 300, 128, 320, False, "contiguous", "tma", lg.CONFIGS[2]),
    ("tma_fp32_occ2", "float32", 130, 72, 200, True, "contiguous", "tma", _SMALL_OCC2),
    ("tma_fp32_occ2_flat", "float32", 130, 72, 200, True, "rowview", "tma", _SMALL_OCC2_FLAT),
    ("tma_fp16_unflat", "float16", 130, 72, 200, True, "contiguous", "tma", _SMALL_UNFLAT),
    ("tma_fp16_cand_2sm", "float16", 300, 128, 320, True, "contiguous", "tma", lg.CANDIDATE_CONFIGS["128x128 w8 2/SM"]),
]

# The backward's GEMM (`launch_gelu_grad`, GRAD): (name, dtype, M, K, N, bias gradient, config): tails in M, N and
# K, both epilogue forms, with and without the bias gradient's atomic column sums, and production configs.
GRAD_CASES = [
    ("grad_fp32_tails", "float32", 130, 72, 200, True, _SMALL_TMA),
    ("grad_fp32_nosub", "float32", 130, 72, 200, True, _SMALL_NOSUB),
    ("grad_fp32_nobias", "float32", 37, 64, 96, False, _SMALL_TMA),
    ("grad_fp16_tails", "float16", 130, 72, 200, True, _SMALL_TMA),
    ("grad_fp16_prod0", "float16", 300, 128, 512, True, lg.GRAD_CONFIGS[0]),
    ("grad_fp16_prod1", "float16", 130, 64, 256, True, lg.GRAD_CONFIGS[1]),
    ("grad_fp32_occ2", "float32", 130, 72, 200, True, _SMALL_OCC2),
    ("grad_fp32_occ2_flat", "float32", 130, 72, 200, False, _SMALL_OCC2_FLAT),
    ("grad_fp16_unflat", "float16", 130, 72, 200, True, _SMALL_UNFLAT),
    ("grad_fp16_cand_2sm", "float16", 300, 128, 512, True, lg.GRAD_CANDIDATE_CONFIGS["64x256 w4 2/SM"]),
]

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import functools, importlib.util, json, sys
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl

    # The module file alone: importing the dinov3_packing package would add seconds of transformers import.
    spec = importlib.util.spec_from_file_location("linear_gelu_interpreted", sys.argv[2])
    lg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lg)

    cases = json.loads(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype, M, K, N, has_bias, layout, kernel, cfg in cases:
        dt = getattr(torch, dtype)
        if layout == "rowview":
            x = torch.randn(M, K + 24, generator=gen)[:, 8 : 8 + K].to(dt)
        elif layout == "transposed":
            x = torch.randn(K, M, generator=gen).to(dt).t()
        else:
            x = torch.randn(M, K, generator=gen).to(dt)
        w = (torch.randn(N, K, generator=gen) / K**0.5).to(dt)
        b = torch.randn(N, generator=gen).to(dt) if has_bias else None
        y = lg.launch_linear_gelu(x, w, b, cfg, kernel=kernel)
        # The same launch storing the pre-activation too (what training runs).
        pre = torch.full((M, N), float("nan"), dtype=dt)
        y_with_pre = lg.launch_linear_gelu(x, w, b, cfg, kernel=kernel, pre_out=pre)
        pre_ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        ref = F.gelu(pre_ref)

        def errors(got, ref):
            diff = (got.double() - ref).abs()
            # rel: in units of max |ref|; excess: the worst excess over one fp16 rounding of the output, likewise
            excess = (diff - (ref.abs() * 2.0**-11).clamp_min(2.0**-24)).max() / ref.abs().max()
            return (diff.max() / ref.abs().max()).item(), excess.item()

        rel, excess = errors(y, ref)
        pre_rel, pre_excess = errors(pre, pre_ref)
        # Storing the GELU's derivative at the pre-activation instead (the training op's "triton" forward).
        deriv = torch.full((M, N), float("nan"), dtype=dt)
        y_with_deriv = lg.launch_linear_gelu(x, w, b, cfg, kernel=kernel, pre_out=deriv, deriv=True)
        deriv_rel, deriv_excess = errors(deriv, torch.ops.aten.gelu_backward(torch.ones_like(pre_ref), pre_ref))
        out[name] = dict(
            deriv_rel=deriv_rel,
            deriv_excess=deriv_excess,
            same_y_with_deriv=torch.equal(y, y_with_deriv),
            shape=list(y.shape),
            dtype=str(y.dtype),
            rel=rel,
            excess=excess,
            pre_rel=pre_rel,
            pre_excess=pre_excess,
            same_y_with_pre=torch.equal(y, y_with_pre),
            supported=lg.linear_gelu_supported(x, w, b),
        )

    def errors64(got, ref):  # (max error, worst excess over one fp16 rounding of ref), in units of max |ref|
        diff = (got.double() - ref).abs()
        excess = (diff - (ref.abs() * 2.0**-11).clamp_min(2.0**-24)).max() / ref.abs().max()
        return (diff.max() / ref.abs().max()).item(), excess.item()

    for name, dtype, M, K, N, bias_grad, cfg in json.loads(sys.argv[3]):
        dt = getattr(torch, dtype)
        g = torch.randn(M, K, generator=gen).to(dt)
        w = (torch.randn(K, N, generator=gen) / K**0.5).to(dt)
        pre = (2 * torch.randn(M, N, generator=gen)).to(dt)
        grad_pre, grad_b = lg.launch_gelu_grad(g, w, pre, bias_grad, cfg)
        ref = torch.ops.aten.gelu_backward(g.double() @ w.double(), pre.double())
        rel, excess = errors64(grad_pre, ref)
        b_rel, b_excess = errors64(grad_b, ref.sum(0)) if bias_grad else (None, None)
        # From the stored derivative instead (the epilogue a product): against fp64 (g @ w) * deriv.
        deriv = torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
        d_pre, d_b = lg.launch_gelu_grad(g, w, deriv, bias_grad, cfg, deriv=True)
        d_ref = (g.double() @ w.double()) * deriv.double()
        d_rel, d_excess = errors64(d_pre, d_ref)
        d_b_rel, d_b_excess = errors64(d_b, d_ref.sum(0)) if bias_grad else (None, None)
        out[name] = dict(
            d_rel=d_rel, d_excess=d_excess, d_b_rel=d_b_rel, d_b_excess=d_b_excess,
            shape=list(grad_pre.shape), dtype=str(grad_pre.dtype), rel=rel, excess=excess, b_rel=b_rel,
            b_excess=b_excess, b_dtype=None if grad_b is None else str(grad_b.dtype),
        )

    # The op with the kernel (the gate forced open, a small config): the same numbers as the launcher.
    launch_grad = lg.launch_gelu_grad
    _small_grad = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, EPI_SUBTILE=True)
    lg.gelu_grad_supported = lambda *args: True
    lg.launch_gelu_grad = lambda *args, **kw: launch_grad(*args, config=_small_grad, **kw)
    g = torch.randn(45, 64, generator=gen)
    w = torch.randn(64, 96, generator=gen) / 8
    pre = torch.randn(45, 96, generator=gen)
    op_pre, op_b = torch.ops.dinov3_packing.gelu_grad(g, w, pre, True)
    direct_pre, direct_b = launch_grad(g, w, pre, True, _small_grad)
    ref = torch.ops.aten.gelu_backward(g.double() @ w.double(), pre.double())
    out["_grad_op"] = dict(
        same_as_launcher=torch.equal(op_pre, direct_pre) and torch.allclose(op_b, direct_b, rtol=1e-6, atol=0),
        rel=errors64(op_pre, ref)[0],
        b_rel=errors64(op_b, ref.sum(0))[0],
        empty_without_bias=list(torch.ops.dinov3_packing.gelu_grad(g, w, pre, False)[1].shape),
    )
    # The same for the op that takes the stored derivative (`dgelu_grad`, the "triton" training op's backward).
    deriv = torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
    op_pre, op_b = torch.ops.dinov3_packing.dgelu_grad(g, w, deriv, True)
    direct_pre, direct_b = launch_grad(g, w, deriv, True, _small_grad, deriv=True)
    ref = (g.double() @ w.double()) * deriv.double()
    out["_dgelu_grad_op"] = dict(
        same_as_launcher=torch.equal(op_pre, direct_pre) and torch.allclose(op_b, direct_b, rtol=1e-6, atol=0),
        rel=errors64(op_pre, ref)[0],
        b_rel=errors64(op_b, ref.sum(0))[0],
        empty_without_bias=list(torch.ops.dinov3_packing.dgelu_grad(g, w, deriv, False)[1].shape),
    )

    # The autotuned path: the tuner runs the kernel once per config and repeat on the real arguments (three
    # runs here, with the last config last, as Triton's does), then the launcher must start the bias sums again.
    class RepeatingTuner:
        def __init__(self, configs):
            self.configs = configs

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                nargs = dict(zip(("x_desc", "w_desc", "y_desc", "p_desc"), args[:4]))
                for cfg in self.configs:
                    lg._set_desc_blocks({**nargs, **cfg.kwargs, "GRAD": kwargs["GRAD"]})
                    even = args[6] % cfg.kwargs["BLOCK_N"] == 0
                    lg._linear_gelu_tma_kernel[grid](*args, **kwargs, **cfg.all_kwargs(), EVEN_N=even)
                self.best_config = self.configs[-1]

            return run

    small_cfgs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, EPI_SUBTILE=e) for e in (False, True, True)]
    lg._grad_autotuned = RepeatingTuner([lg._triton_config(dict(c, num_warps=4, num_stages=2)) for c in small_cfgs])
    g, w = torch.randn(45, 64, generator=gen), torch.randn(64, 96, generator=gen) / 8
    pre = torch.randn(45, 96, generator=gen)
    tuned_pre, tuned_b = launch_grad(g, w, pre, True)  # config None: the (stand-in) autotuner
    cached_pre, cached_b = launch_grad(g, w, pre, True)  # its choice, kept: one launch
    ref = torch.ops.aten.gelu_backward(g.double() @ w.double(), pre.double())
    out["_grad_autotuned"] = dict(
        rel=[errors64(t, ref)[0] for t in (tuned_pre, cached_pre)],
        b_rel=[errors64(t, ref.sum(0))[0] for t in (tuned_b, cached_b)],
    )

    @triton.jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, lg._gelu_folded(v), mask=offs < n)

    # [-14, 14] finely, then the far tails up to 1e4 (where the last factor must stay bounded), then the
    # infinities.
    v = torch.cat([torch.linspace(-14, 14, 200001), torch.linspace(-1e4, 1e4, 20001)]).float()
    v = torch.cat([v, torch.tensor([float("inf"), float("-inf")])])
    y = torch.empty_like(v)
    gelu_kernel[(triton.cdiv(v.numel(), 4096),)](v, y, v.numel(), BLOCK=4096)
    fin = v.isfinite()
    vd = v[fin].double()
    gelu_true = vd * 0.5 * torch.special.erfc(-vd * 0.5**0.5)
    out["_gelu"] = dict(
        gelu_abs=(y[fin].double() - gelu_true).abs().max().item(),
        torch_gelu_abs=(F.gelu(v[fin]).double() - gelu_true).abs().max().item(),
        at_inf=[y[-2].item(), y[-1].item()],
    )

    @triton.jit
    def gelu_grad_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, lg._gelu_grad(v), mask=offs < n)

    gelu_grad_kernel[(triton.cdiv(v.numel(), 4096),)](v, y, v.numel(), BLOCK=4096)
    # d/dv [v * Phi(v)] = Phi(v) + v * phi(v), in fp64
    grad_true = 0.5 * torch.special.erfc(-vd * 0.5**0.5) + vd * torch.exp(-0.5 * vd * vd) / (2 * torch.pi) ** 0.5
    torch_grad = torch.ops.aten.gelu_backward(torch.ones_like(v[fin]), v[fin])
    out["_gelu_grad"] = dict(
        abs=(y[fin].double() - grad_true).abs().max().item(),
        torch_abs=(torch_grad.double() - grad_true).abs().max().item(),
        at_inf=[y[-2].item(), y[-1].item()],
    )

    # Training through the custom op with the real kernel: the interpreter never counts as the kernel path, so the
    # gate is forced open and the launcher given a small config (the autotuner does not run here); every launch
    # is recorded to show the kernel stored the pre-activation. Reference: fp64 autograd of F.gelu(F.linear(...))
    # on the same inputs and output gradient.
    launch, launches = lg.launch_linear_gelu, []

    def recording_launch(*args, config, kernel, **kwargs):
        launches.append(kwargs.get("pre_out") is not None)
        return launch(*args, config=config, kernel=kernel, **kwargs)

    lg.linear_gelu_supported = lambda *args: True
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    for name, kernel, cfg, has_bias in (
        ("tma", "tma", dict(small, EPI_SUBTILE=True), True),
        ("tma_nosub_nobias", "tma", dict(small, EPI_SUBTILE=False), False),
        ("ptr", "ptr", small, True),
    ):
        lg.launch_linear_gelu = functools.partial(recording_launch, config=cfg, kernel=kernel)
        launches.clear()
        x = torch.randn(2, 37, 72, generator=gen).requires_grad_()  # leading dims; tails in M, N and K
        w = (torch.randn(100, 72, generator=gen) / 72**0.5).requires_grad_()
        b = torch.randn(100, generator=gen).requires_grad_() if has_bias else None
        leaves = [t for t in (x, w, b) if t is not None]
        y = lg.linear_gelu(x, w, b)
        grad_y = torch.randn(y.shape, generator=gen)
        grads = torch.autograd.grad(y, leaves, grad_y)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        y64 = F.gelu(F.linear(leaves64[0], leaves64[1], leaves64[2] if has_bias else None))
        grads64 = torch.autograd.grad(y64, leaves64, grad_y.double())
        out["_train_" + name] = dict(
            launches=launches[:],
            y_rel=((y.double() - y64).abs().max() / y64.abs().max()).item(),
            grad_rel=[((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, grads64)],
            grad_shapes=[list(g.shape) for g in grads],
        )
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    cases, grad_cases = json.dumps(INTERPRETER_CASES), json.dumps(GRAD_CASES)
    return run_interpreted(_INTERPRETER_SCRIPT, cases, lg.__file__, grad_cases, timeout=180)


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=[c[0] for c in INTERPRETER_CASES])
def test_kernel_matches_reference_in_interpreter(interpreter_results, case):
    name, dtype, M, _K, N, *_ = case
    r = interpreter_results[name]
    assert r["shape"] == [M, N]
    assert r["dtype"] == f"torch.{dtype}"
    if dtype == "float32":
        assert r["rel"] <= 1e-5 and r["pre_rel"] <= 1e-5, r
    else:
        assert r["excess"] <= 1e-5 and r["pre_excess"] <= 1e-5, r
    assert r["same_y_with_pre"], r  # storing the pre-activation leaves the output bit for bit as it was
    # Storing the GELU's derivative instead: within one rounding of fp64 ATen's derivative, the output unchanged.
    assert (r["deriv_rel"] if dtype == "float32" else r["deriv_excess"]) <= 1e-5, r
    assert r["same_y_with_deriv"], r
    assert r["supported"] is False  # the interpreter never counts as the kernel path


@pytest.mark.parametrize("name", ["tma", "tma_nosub_nobias", "ptr"])
def test_kernel_backward_matches_autograd_in_interpreter(interpreter_results, name):
    """fp32 training through the op with the real kernel: one launch, which stored the pre-activation; the output
    within the forward's 1e-5 of max |ref| of fp64 autograd, and the x / weight / bias gradients within 2e-6
    (fp32 products of a few hundred terms; measured 1.1-3.7e-7)."""
    r = interpreter_results["_train_" + name]
    assert r["launches"] == [True], r
    assert r["y_rel"] <= 1e-5, r
    expected = [[2, 37, 72], [100, 72]] + ([] if "nobias" in name else [[100]])
    assert r["grad_shapes"] == expected, r
    assert all(g <= 2e-6 for g in r["grad_rel"]), r


def test_gelu_epilogue_accuracy(interpreter_results):
    """The epilogue's GELU against the fp64 truth over [-14, 14] and [-1e4, 1e4]: within the documented 3e-7
    absolute (measured 2.4e-7) and no further off than torch's own fp32 F.gelu (measured 3.6e-7); +inf maps to
    +inf and -inf to (nearly) 0, where an unbounded last factor would give NaN or a growing tail."""
    r = interpreter_results["_gelu"]
    assert r["gelu_abs"] <= 3e-7, r
    assert r["gelu_abs"] <= r["torch_gelu_abs"], r
    pos_inf, neg_inf = r["at_inf"]
    assert pos_inf == float("inf") and abs(neg_inf) < 1e-7, r


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gelu_grad_kernel_matches_fp64_in_interpreter(interpreter_results, case):
    """`launch_gelu_grad` against fp64 ``gelu_backward(g @ w, pre)`` and its column sums, on the same (rounded)
    inputs; tolerances as for the forward: fp32 within 1e-5 of max |ref|, fp16 within one fp16 rounding of each
    element plus 1e-5 of max |ref| (the bias gradient is summed in fp32 and rounded once)."""
    name, dtype, M, _K, N, bias_grad, _cfg = case
    r = interpreter_results[name]
    assert r["shape"] == [M, N] and r["dtype"] == f"torch.{dtype}", r
    if dtype == "float32":
        assert r["rel"] <= 1e-5, r
    else:
        assert r["excess"] <= 1e-5, r
    if bias_grad:
        assert r["b_dtype"] == f"torch.{dtype}", r
        assert (r["b_rel"] if dtype == "float32" else r["b_excess"]) <= 1e-5, r
    else:
        assert r["b_rel"] is None and r["b_dtype"] is None, r
    # From a stored derivative (`deriv=True`): against fp64 (g @ w) * derivative, same tolerances.
    assert (r["d_rel"] if dtype == "float32" else r["d_excess"]) <= 1e-5, r
    if bias_grad:
        assert (r["d_b_rel"] if dtype == "float32" else r["d_b_excess"]) <= 1e-5, r
    else:
        assert r["d_b_rel"] is None, r


@pytest.mark.parametrize("op", ["gelu_grad", "dgelu_grad"])
def test_gelu_grad_op_runs_the_kernel_where_supported(interpreter_results, op):
    """The custom op (from the pre-activation, or from the stored derivative) with its gate open returns the
    launcher's numbers (its bias gradient within fp32 atomics' order, 1e-6), an fp32 result within 1e-5 of fp64,
    and an empty bias gradient when not asked for one."""
    r = interpreter_results["_grad_op" if op == "gelu_grad" else "_dgelu_grad_op"]
    assert r["same_as_launcher"], r
    assert r["rel"] <= 1e-5 and r["b_rel"] <= 1e-5, r
    assert r["empty_without_bias"] == [0], r


def test_gelu_grad_bias_sums_start_again_after_autotuning(interpreter_results):
    """The autotuner times every config on the call's own arguments, so the bias gradient's atomic sums pile up
    over its runs (on the GPU: 362x the right value, H100 2026-12-06); the launcher zeroes them and launches the
    chosen config once more. With a stand-in tuner that runs three configs: both the tuned and the cached launch
    give the bias gradient within fp32 rounding (1e-5 of max |ref|)."""
    r = interpreter_results["_grad_autotuned"]
    assert all(v <= 1e-5 for v in r["rel"] + r["b_rel"]), r


def test_gelu_grad_epilogue_accuracy(interpreter_results):
    """The epilogue's GELU derivative against the fp64 truth ``Phi(v) + v * phi(v)`` over [-14, 14] and
    [-1e4, 1e4]: within 2.5e-7 absolute (measured 1.3e-7) and no further off than ATen's fp32 ``gelu_backward``
    (measured 2.6e-7); 1 at +inf and (nearly) 0 at -inf, the CDF's floor of 7.9e-9, where an unclamped density term
    would give ``inf * 0 = NaN``."""
    r = interpreter_results["_gelu_grad"]
    assert r["abs"] <= 2.5e-7, r
    assert r["abs"] <= r["torch_abs"], r
    pos_inf, neg_inf = r["at_inf"]
    assert pos_inf == 1.0 and 0.0 <= neg_inf < 1e-8, r


def test_gelu_grad_launcher_names_mismatched_shapes():
    g, w, pre = torch.empty(5, 64), torch.empty(64, 96), torch.empty(5, 96)
    for args in ((g, w.t(), pre), (g, w, pre[:, :48]), (g[:4], w, pre)):
        with pytest.raises(ValueError, match=r"gelu_grad: grad_out .* do not match \(\[M, K\], \[K, N\], \[M, N\]\)"):
            lg.launch_gelu_grad(*args, True)
    assert not lg.gelu_grad_supported(g, w, pre)  # CPU tensors never take the kernel


def test_even_n_rule_of_the_autotuned_tma_kernel():
    """The autotuned TMA kernel drops the bias mask only when N is a multiple of the config's BLOCK_N (a wrong
    EVEN_N reads past the bias; the clipped TMA store would hide it from an output comparison)."""
    even_n = lg._tma_autotuned.fn.values["EVEN_N"]
    for n in (4096, 3072, 1536):
        for c in lg.CONFIGS:
            assert even_n({"N": n, "BLOCK_N": c["BLOCK_N"]}) is True
    assert even_n({"N": 200, "BLOCK_N": 256}) is False
    assert even_n({"N": 320, "BLOCK_N": 128}) is False


def test_tma_alignment_rule():
    x = torch.empty(8, 72, dtype=torch.float16)
    assert lg._tma_compatible(x, x[:, 8:], x[2:])  # 16-byte aligned bases and row strides
    assert not lg._tma_compatible(x[:, 1:])  # base off by 2 bytes
    assert not lg._tma_compatible(torch.empty(8, 36, dtype=torch.float16))  # 72-byte rows
    assert not lg._tma_compatible(x.t())  # inner stride != 1


def _inputs(dtype=torch.float32, M=37, K=64, N=96, bias=True, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(requires_grad)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(N, generator=g).to(dtype).requires_grad_(requires_grad) if bias else None
    return x, w, b


OP = torch.ops.dinov3_packing.linear_gelu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_fallback_is_exact(dtype, bias):
    x, w, b = _inputs(dtype, bias=bias)
    assert not lg.linear_gelu_supported(x, w, b)
    ref = F.gelu(F.linear(x, w, b))
    assert torch.equal(lg.linear_gelu(x, w, b), ref)
    y, pre = OP(x, w, b, False)
    assert torch.equal(y, ref) and pre.numel() == 0  # nothing kept without save_pre
    y, pre = OP(x, w, b, True)
    assert torch.equal(y, ref) and torch.equal(pre, F.linear(x, w, b))


def test_fallback_keeps_autograd():
    x, w, b = _inputs(requires_grad=True)
    y = lg.linear_gelu(x, w, b)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.gelu(F.linear(x, w, b)).square().sum().backward()
    for got, t in zip(grads, (x, w, b), strict=True):
        assert torch.equal(got, t.grad)


def _grads(fn, leaves, grad_y):
    return torch.autograd.grad(fn(*leaves), [t for t in leaves if t is not None], grad_y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_op_backward_equals_autograd_of_the_reference(dtype, bias):
    """The op's registered backward on the CPU path (torch forward, saved pre-activation, ATen's gelu_backward and
    three matmuls) against autograd through F.gelu(F.linear(...)): the same ATen kernels on the same values, so
    the gradients must be equal bit for bit, over leading dims of x."""
    x, w, b = _inputs(dtype, M=74, bias=bias, requires_grad=True)
    x = x.detach().reshape(2, 37, 64).requires_grad_()
    grad_y = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = _grads(lambda x, w, b: OP(x, w, b, True)[0], (x, w, b), grad_y)
    ref = _grads(lg.linear_gelu_reference, (x, w, b), grad_y)
    assert len(got) == (3 if bias else 2)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype and torch.equal(g, r)


@pytest.mark.parametrize("bias", [True, False])
def test_op_gradcheck_fp64(bias):
    """Finite differences in fp64 (gradcheck's defaults: eps 1e-6, atol 1e-5, rtol 1e-3) on the CPU path; the
    kernel path accumulates in fp32, so it is checked against fp64 autograd instead (interpreter test above)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(6, 8, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_() if bias else None
    assert torch.autograd.gradcheck(lambda x, w, b: OP(x, w, b, True)[0], (x, w, b))


def test_pre_activation_output_is_not_differentiable():
    x, w, b = _inputs(requires_grad=True)
    y, pre = OP(x, w, b, True)
    assert y.requires_grad and not pre.requires_grad


def test_backward_without_saved_pre_activation_is_refused():
    x, w, b = _inputs(requires_grad=True)
    y, _ = OP(x, w, b, False)
    with pytest.raises(RuntimeError, match="save_pre=False"):
        y.sum().backward()


def _force_kernel_path(monkeypatch) -> list:
    """Open the gate on the CPU with a launcher made of torch ops (the kernel needs a GPU or the interpreter); the
    returned list records each launch as (x shape, whether a pre-activation was asked for)."""
    calls = []

    def torch_launch(x, w, b, config=None, *, pre_out=None):
        calls.append((tuple(x.shape), pre_out is not None))
        if pre_out is not None:
            pre_out.copy_(F.linear(x, w, b))
        return F.gelu(F.linear(x, w, b))

    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(lg, "launch_linear_gelu", torch_launch)
    return calls


def test_dispatch_between_kernel_and_fallback(monkeypatch):
    """With the kernel path forced on, inference and training both go through the custom op and the launcher:
    without autograd the launcher keeps no pre-activation, with autograd it fills one and the backward uses it."""
    calls = _force_kernel_path(monkeypatch)
    x, w, b = _inputs(M=6, K=64, N=32)
    x3 = x.reshape(2, 3, 64)
    with torch.inference_mode():
        y = lg.linear_gelu(x3, w, b)
    assert calls == [((6, 64), False)]  # leading dims flattened for the 2-D launcher
    assert y.shape == (2, 3, 32)
    assert torch.equal(y, F.gelu(F.linear(x3, w, b)))

    calls.clear()
    xg, wg, bg = _inputs(M=6, K=64, N=32, requires_grad=True)
    with torch.no_grad():
        lg.linear_gelu(xg, wg, bg)
    assert calls == [((6, 64), False)]
    yg = lg.linear_gelu(xg, wg, bg)
    assert calls[1:] == [((6, 64), True)] and yg.grad_fn is not None
    grad_y = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(yg, (xg, wg, bg), grad_y)
    ref = _grads(lg.linear_gelu_reference, (xg, wg, bg), grad_y)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


def test_supported_rules():
    x, w, b = _inputs(torch.bfloat16)
    assert not lg.linear_gelu_supported(x, w, b)  # CPU
    meta = torch.device("meta")
    assert not lg.linear_gelu_supported(x.to(meta), w.to(meta), b.to(meta))  # not CUDA either


def test_custom_op_registered_with_fake_and_autograd():
    op = torch.ops.dinov3_packing.linear_gelu.default
    assert str(op._schema) == (
        "dinov3_packing::linear_gelu(Tensor x, Tensor weight, Tensor? bias, bool save_pre) -> (Tensor, Tensor)"
    )
    x, w, b = _inputs(M=5, K=64, N=48)
    xg, wg, bg = _inputs(M=5, K=64, N=48, requires_grad=True)
    # opcheck runs the op against its fake, its schema and, for inputs requiring grad, its autograd registration.
    torch.library.opcheck(OP, (x, w, b, False))
    torch.library.opcheck(OP, (x.reshape(5, 1, 64), w, None, True))
    torch.library.opcheck(OP, (xg, wg, bg, True))
    torch.library.opcheck(OP, (xg.detach().reshape(5, 1, 64).requires_grad_(), wg, None, True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xf, wf = torch.empty(7, 3, 64, dtype=torch.bfloat16), torch.empty(48, 64, dtype=torch.bfloat16)
        y, pre = OP(xf, wf, None, True)
        y2, empty = OP(xf, wf, None, False)
    assert y.shape == pre.shape == y2.shape == (7, 3, 48) and y.dtype == pre.dtype == torch.bfloat16
    assert empty.shape == (0,)


def _compiled_with_graphs(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=backend), graphs


def _op_nodes(gm) -> int:
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return sum(t in (OP, OP.default) for t in targets)


def test_compile_keeps_op_opaque():
    x, w, b = _inputs(M=9, K=64, N=48)
    fn, graphs = _compiled_with_graphs(lambda x, w, b: OP(x, w, b, False)[0] * 2)
    y = fn(x, w, b)
    assert torch.equal(y, F.gelu(F.linear(x, w, b)) * 2)
    assert _op_nodes(graphs[0]) == 1


def test_compile_trains_through_the_op(monkeypatch):
    """Under torch.compile with autograd (AOTAutograd, as Inductor runs it) the forward graph holds the op once,
    with save_pre set, and the backward graph runs the registered formula (ATen's gelu_backward, no second call of
    the op): gradients equal eager autograd of the reference. The gate is forced open with a torch-ops launcher."""
    calls = _force_kernel_path(monkeypatch)
    backend, graphs = capturing_aot_backend()
    fn = torch.compile(lambda x, w, b: lg.linear_gelu(x, w, b).square().sum(), backend=backend)
    x, w, b = _inputs(M=9, K=64, N=48, requires_grad=True)
    got = torch.autograd.grad(fn(x, w, b), (x, w, b))
    ref = torch.autograd.grad(lg.linear_gelu_reference(x, w, b).square().sum(), (x, w, b))
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r), (g - r).abs().max()

    def calls_of(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function"]

    fwd_ops = [n for n in calls_of(graphs["forward"]) if n.target in (OP, OP.default)]
    assert [n.args[3] for n in fwd_ops] == [True]
    bwd_targets = {n.target for n in calls_of(graphs["backward"])}
    assert torch.ops.aten.gelu_backward.default in bwd_targets and not bwd_targets & {OP, OP.default}
    assert calls == [((9, 64), True)]


def test_pinned_configs_are_what_later_launches_take(monkeypatch):
    """A pinned config is what `launch_linear_gelu` / `launch_gelu_grad` launch without a config (the kernel launch
    itself is recorded instead of run: no GPU here); without a pin they go to the autotuner."""
    launches, tuned = [], []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    class Tuner:
        def __getitem__(self, grid):
            tuned.append(grid)
            raise RuntimeError("autotuner reached")

    monkeypatch.setattr(lg, "_TUNED_TMA", {})
    monkeypatch.setattr(lg, "_linear_gelu_tma_kernel", Recorder())
    monkeypatch.setattr(lg, "_tma_autotuned", Tuner())
    monkeypatch.setattr(lg, "_grad_autotuned", Tuner())
    half = torch.float16
    x, w, b = torch.randn(300, 64).to(half), torch.randn(256, 64).to(half), torch.randn(256).to(half)
    grad_out, down, pre = torch.randn(300, 64).to(half), torch.randn(64, 256).to(half), torch.randn(300, 256).to(half)
    with pytest.raises(RuntimeError, match="autotuner reached"):
        lg.launch_linear_gelu(x, w, b, kernel="tma", pre_out=torch.empty(300, 256, dtype=half))
    with pytest.raises(RuntimeError, match="autotuner reached"):
        lg.launch_gelu_grad(grad_out, down, pre, True)
    assert len(tuned) == 2 and not launches

    forward = lg.CANDIDATE_CONFIGS["128x128 w8 2/SM"]
    backward = lg.GRAD_CANDIDATE_CONFIGS["64x256 w4 2/SM"]
    lg.pin_linear_gelu_config(x, w, b, "pre", forward)
    lg.pin_gelu_grad_config(grad_out, down, pre, True, False, backward)
    lg.launch_linear_gelu(x, w, b, kernel="tma", pre_out=torch.empty(300, 256, dtype=half))
    with pytest.raises(RuntimeError, match="autotuner reached"):
        lg.launch_linear_gelu(x, w, b, kernel="tma")  # inference: another key, not pinned
    assert len(tuned) == 3
    lg.launch_gelu_grad(grad_out, down, pre, True)
    with pytest.raises(RuntimeError, match="autotuner reached"):
        lg.launch_gelu_grad(grad_out, down, pre, False)  # no bias gradient: another key
    assert len(tuned) == 4 and len(launches) == 2
    (grid_f, kw_f), (grid_b, kw_b) = launches
    assert {k: kw_f[k] for k in forward} == forward and kw_f["STORE_PRE"] and not kw_f["GRAD"]
    assert {k: kw_b[k] for k in backward} == backward and kw_b["GRAD"] and kw_b["HAS_BIAS"]
    # Two programs per "SM" (the interpreter's 4) over 3 x 2 tiles of 128 x 128; 5 x 1 tiles of 64 x 256.
    assert grid_f(forward) == (6,) and grid_b(backward) == (5,)
    assert len(lg.tuned_configs()) == 2
    with pytest.raises(ValueError, match="store: expected None, 'pre' or 'deriv'"):
        lg.pin_linear_gelu_config(x, w, b, "post", forward)
    with pytest.raises(ValueError, match="config: expected a dict with keys"):
        lg.pin_linear_gelu_config(x, w, b, None, {"BLOCK_M": 128})
    with pytest.raises(ValueError, match="config: expected a dict with keys"):
        lg.pin_gelu_grad_config(grad_out, down, pre, True, False, dict(forward, TILE=1))
