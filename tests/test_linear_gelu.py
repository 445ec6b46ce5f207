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
from triton_interpreter import run_interpreted

from dinov3_packing.ops.triton import linear_gelu as lg

pytest.importorskip("triton")

# (name, dtype, M, K, N, bias, x layout, kernel, config): tails in M, N and K, grouped order with a partial last
# group, a persistent grid of 4 programs looping over many tiles, a row view of a wider tensor (stride(0) != K),
# a transposed x (stride(1) != 1), both epilogue forms, and the production configs.
_SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
_SMALL_TMA = dict(**_SMALL, EPI_SUBTILE=True)
_SMALL_NOSUB = dict(**_SMALL, EPI_SUBTILE=False)
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
]

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
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
        ref = F.gelu(F.linear(x.double(), w.double(), None if b is None else b.double()))
        diff = (y.double() - ref).abs()
        out[name] = dict(
            shape=list(y.shape),
            dtype=str(y.dtype),
            rel=(diff.max() / ref.abs().max()).item(),
            # worst excess over one fp16 rounding of the output, in units of max |ref|
            excess=((diff - (ref.abs() * 2.0**-11).clamp_min(2.0**-24)).max() / ref.abs().max()).item(),
            supported=lg.linear_gelu_supported(x, w, b),
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
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_interpreted(_INTERPRETER_SCRIPT, json.dumps(INTERPRETER_CASES), lg.__file__, timeout=120)


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=[c[0] for c in INTERPRETER_CASES])
def test_kernel_matches_reference_in_interpreter(interpreter_results, case):
    name, dtype, M, _K, N, *_ = case
    r = interpreter_results[name]
    assert r["shape"] == [M, N]
    assert r["dtype"] == f"torch.{dtype}"
    if dtype == "float32":
        assert r["rel"] <= 1e-5, r
    else:
        assert r["excess"] <= 1e-5, r
    assert r["supported"] is False  # the interpreter never counts as the kernel path


def test_gelu_epilogue_accuracy(interpreter_results):
    """The epilogue's GELU against the fp64 truth over [-14, 14] and [-1e4, 1e4]: within the documented 3e-7
    absolute (measured 2.4e-7) and no further off than torch's own fp32 F.gelu (measured 3.6e-7); +inf maps to
    +inf and -inf to (nearly) 0, where an unbounded last factor would give NaN or a growing tail."""
    r = interpreter_results["_gelu"]
    assert r["gelu_abs"] <= 3e-7, r
    assert r["gelu_abs"] <= r["torch_gelu_abs"], r
    pos_inf, neg_inf = r["at_inf"]
    assert pos_inf == float("inf") and abs(neg_inf) < 1e-7, r


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_fallback_is_exact(dtype, bias):
    x, w, b = _inputs(dtype, bias=bias)
    assert not lg.linear_gelu_supported(x, w, b)
    ref = F.gelu(F.linear(x, w, b))
    assert torch.equal(lg.linear_gelu(x, w, b), ref)
    assert torch.equal(torch.ops.dinov3_packing.linear_gelu(x, w, b), ref)


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


def test_dispatch_between_kernel_and_fallback(monkeypatch):
    """With the kernel path forced on, inference goes through the custom op and launcher; autograd does not."""
    calls = []

    def fake_launch(x, w, b, config=None):
        calls.append(tuple(x.shape))
        return F.gelu(F.linear(x, w, b))

    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(lg, "launch_linear_gelu", fake_launch)
    x, w, b = _inputs(M=6, K=64, N=32)
    x3 = x.reshape(2, 3, 64)
    with torch.inference_mode():
        y = lg.linear_gelu(x3, w, b)
    assert calls == [(6, 64)]  # leading dims flattened for the 2-D launcher
    assert y.shape == (2, 3, 32)
    assert torch.equal(y, F.gelu(F.linear(x3, w, b)))

    calls.clear()
    xg, wg, bg = _inputs(M=6, K=64, N=32, requires_grad=True)
    yg = lg.linear_gelu(xg, wg, bg)
    assert calls == [] and yg.grad_fn is not None
    with torch.no_grad():
        lg.linear_gelu(xg, wg, bg)
    assert calls == [(6, 64)]


def test_supported_rules():
    x, w, b = _inputs(torch.bfloat16)
    assert not lg.linear_gelu_supported(x, w, b)  # CPU
    meta = torch.device("meta")
    assert not lg.linear_gelu_supported(x.to(meta), w.to(meta), b.to(meta))  # not CUDA either


def test_custom_op_registered_with_fake():
    op = torch.ops.dinov3_packing.linear_gelu.default
    assert str(op._schema) == "dinov3_packing::linear_gelu(Tensor x, Tensor weight, Tensor? bias) -> Tensor"
    x, w, b = _inputs(M=5, K=64, N=48)
    torch.library.opcheck(torch.ops.dinov3_packing.linear_gelu, (x, w, b))
    torch.library.opcheck(torch.ops.dinov3_packing.linear_gelu, (x.reshape(5, 1, 64), w, None))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xf, wf = torch.empty(7, 3, 64, dtype=torch.bfloat16), torch.empty(48, 64, dtype=torch.bfloat16)
        y = torch.ops.dinov3_packing.linear_gelu(xf, wf, None)
    assert y.shape == (7, 3, 48) and y.dtype == torch.bfloat16


def test_compile_keeps_op_opaque():
    x, w, b = _inputs(M=9, K=64, N=48)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x, w, b: torch.ops.dinov3_packing.linear_gelu(x, w, b) * 2, backend=backend)
    y = fn(x, w, b)
    assert torch.equal(y, F.gelu(F.linear(x, w, b)) * 2)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.dinov3_packing.linear_gelu.default in targets or torch.ops.dinov3_packing.linear_gelu in targets
