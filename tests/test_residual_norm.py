"""The residual add + LayerNorm op with the bias gradients in its backward (ops/norm.py, ops/triton/residual_norm.py).

- The op against autograd of the same function written with torch ops, in fp64 (1e-12 relative): the gradients of
  x, h, the bias added into `s` (`bias_in`), the bias added after it on the residual stream (`bias_out`, detached
  there: its gradient comes from the op's backward) and the norm's weight and bias.
- The Triton kernel under Triton's CPU interpreter (subprocess) against `residual_norm_reference` in fp64: fp32
  within 1e-6 of each output's largest value; bf16 inputs: `g` within one bf16 ulp (the interpreter truncates) plus
  1e-6, the fp32 sums within 1e-5. A width that is not a power of two, a token count that is no multiple of the
  program's rows, no residual gradient.
- A whole model's fp64 training step on the CPU with `fused_norm` on and off, the fused MLP forced on (its torch
  fallback) so that the down-projection's bias goes through the op as well: every parameter's gradient equal to
  1e-10 relative (the same function; fp64 leaves only the order of the sums), the op run once per block; not where
  a path drops (stochastic depth) or the norm is hooked.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_config
from torch import nn
from triton_interpreter import run_interpreted

from dinov3_packing import pack, random_packing_model
from dinov3_packing.model import modeling
from dinov3_packing.ops import norm as norm_ops
from dinov3_packing.ops.triton.residual_norm import residual_norm_backward, residual_norm_reference


def _inputs(tokens: int, d: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, h = (torch.randn(tokens, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    b_in, b_out = (torch.randn(d, generator=g, dtype=torch.float64).to(dtype) * 0.3 for _ in range(2))
    ln = nn.LayerNorm(d).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64))
        ln.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=torch.float64))
    proj = torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype) / d**0.5
    return x, h, b_in, b_out, ln, proj


@pytest.mark.parametrize("with_biases", [True, False])
def test_op_gradients_equal_autograd_of_the_function(with_biases):
    x0, h0, b_in0, b_out0, ln, proj = _inputs(37, 24, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x0, h0, b_in0, b_out0)]
    target = torch.randn(37, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(out):
        return ((out - target) ** 2).sum()

    grads = {}
    for name in ("op", "autograd"):
        x, h, b_in, b_out = (t.detach().clone().requires_grad_(True) for t in leaves)
        ln.zero_grad()
        bias_in, bias_out = (b_in, b_out) if with_biases else (None, None)
        if name == "op":
            s, y = norm_ops.residual_layer_norm(x, h, ln, bias_in, bias_out)
            out = s + torch.tanh(y @ proj) + (bias_out.detach() if bias_out is not None else 0)
        else:
            s = x + h + (bias_in if bias_in is not None else 0)
            out = s + torch.tanh(ln(s) @ proj) + (bias_out if bias_out is not None else 0)
        loss(out).backward()
        grads[name] = [x.grad, h.grad, ln.weight.grad.clone(), ln.bias.grad.clone()]
        if with_biases:
            grads[name] += [b_in.grad, b_out.grad]
        else:
            assert b_in.grad is None and b_out.grad is None
    for got, ref in zip(grads["op"], grads["autograd"], strict=True):
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-12


def test_reference_without_a_residual_gradient_is_zero_for_it():
    x, _, _, _, ln, _ = _inputs(9, 16, torch.float64)
    s = x
    mean, rstd = s.mean(-1), (s.var(-1, unbiased=False) + ln.eps).rsqrt()
    gy = torch.randn(9, 16, dtype=torch.float64)
    g0, sums0 = residual_norm_reference(None, gy, s, ln.weight, mean.float(), rstd.float())
    g1, sums1 = residual_norm_reference(torch.zeros_like(gy), gy, s, ln.weight, mean.float(), rstd.float())
    assert torch.equal(g0, g1) and torch.equal(sums0, sums1) and not sums0[1].any()


CASES = [("fp32", "float32", 70, 48, True), ("bf16", "bfloat16", 33, 64, True), ("no_gs", "float32", 5, 40, False)]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from dinov3_packing.ops.triton.residual_norm import residual_norm_backward, residual_norm_reference

    out = {}
    for name, dtype, tokens, d, with_gs in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(tokens)
        s = (torch.randn(tokens, d, generator=gen) * 2 + 0.5).to(dt)
        mean = s.float().mean(-1)
        rstd = (s.float().var(-1, unbiased=False) + 1e-6).rsqrt()
        gy = torch.randn(tokens, d, generator=gen).to(dt)
        gs = torch.randn(tokens, d, generator=gen).to(dt) if with_gs else None
        w = (1 + 0.2 * torch.randn(d, generator=gen)).to(dt)
        g, sums = residual_norm_backward(gs, gy, s, w, mean, rstd, use_kernel=True)
        ref_g, ref_sums = residual_norm_reference(
            None if gs is None else gs.double(), gy.double(), s.double(), w.double(), mean.double(), rstd.double()
        )
        ref_g = ref_g.double()
        err = (g.double() - ref_g).abs()
        out[name] = {
            "g_rel": (err.max() / ref_g.abs().max()).item(),
            "g_excess": (err - ref_g.abs() * 2.0**-7 - 1e-6 * ref_g.abs().max()).max().item(),
            "sums_rel": [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                         for a, b in zip(sums, ref_sums)],
            "gs_sum_zero": bool((sums[1] == 0).all()) if gs is None else None,
            "dtype": str(g.dtype),
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("triton")
    return run_interpreted(_SCRIPT, json.dumps(CASES), timeout=300)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_under_the_interpreter(results, case):
    name, dtype, _, _, with_gs = case
    r = results[name]
    assert r["dtype"] == f"torch.{dtype}", r
    if dtype == "float32":
        assert r["g_rel"] <= 1e-6, r
        sums = r["sums_rel"] if with_gs else r["sums_rel"][:1] + r["sums_rel"][2:]
        assert max(sums) <= 1e-6, r
    else:
        assert r["g_excess"] <= 0, r
        assert max(r["sums_rel"]) <= 1e-5, r
    if not with_gs:
        assert r["gs_sum_zero"], r


def test_bad_shapes_are_refused_before_launch():
    s = torch.randn(4, 8)
    stats = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="g_y"):
        residual_norm_backward(None, torch.randn(4, 9), s, torch.ones(8), *stats)
    with pytest.raises(ValueError, match="weight"):
        residual_norm_backward(None, torch.randn(4, 8), s, torch.ones(7), *stats)
    with pytest.raises(ValueError, match="mean"):
        residual_norm_backward(None, torch.randn(4, 8), s, torch.ones(8), torch.zeros(5), stats[1])
    with pytest.raises(ValueError, match="norm"):
        norm_ops.residual_layer_norm(s, s, nn.LayerNorm(8, elementwise_affine=False))


def _step_grads(monkeypatch, fused_norm: bool, prepare=None):
    """fp64 CPU training step of a tiny model with the fused MLP forced on (its torch fallbacks), every parameter's
    gradient, and how many times the residual norm op ran."""
    monkeypatch.setattr(modeling, "fused_mlp_runs", lambda enabled, device, dtype: enabled)
    calls = []
    original = norm_ops._ResidualLayerNorm.apply
    monkeypatch.setattr(norm_ops._ResidualLayerNorm, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = random_packing_model(tiny_config(layerscale_value=0.5)).double()
    model.train()
    model.fused_norm = fused_norm
    if prepare is not None:
        prepare(model)
    images = random_images([(32, 48), (48, 32), (16, 16)], 16, seed=3)
    hs, grid = pack(images, patch_size=16)
    out = model(hs.double(), grid).last_hidden_state
    (out.square().mean() + out[:, :3].sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def test_model_gradients_equal_with_and_without_the_op(monkeypatch):
    fused, calls = _step_grads(monkeypatch, True)
    plain, plain_calls = _step_grads(monkeypatch, False)
    assert calls == 2 and plain_calls == 0  # once per block
    assert fused.keys() == plain.keys()
    for name, ref in plain.items():
        rel = ((fused[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert rel <= 1e-10, (name, rel)
    assert fused["model.layer.0.mlp.down_proj.bias"].abs().sum() > 0  # the bias taken apart has its gradient


@pytest.mark.parametrize("prepare", ["drop_path", "hook"])
def test_not_where_a_path_drops_or_the_norm_is_hooked(monkeypatch, prepare):
    def drop(model):
        for layer in model.model.layer:
            layer.drop_path.drop_prob = 0.1

    def hook(model):
        model.model.layer[0].norm2.register_forward_hook(lambda module, args, output: output)

    _, calls = _step_grads(monkeypatch, True, drop if prepare == "drop_path" else hook)
    assert calls == (0 if prepare == "drop_path" else 1)


def test_option_is_validated():
    model = random_packing_model(tiny_config())
    with pytest.raises(TypeError, match="fused_norm"):
        model.fused_norm = 1
    assert F is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_kernel_matches_the_reference(dtype):
    """The kernel on the GPU at ViT-L's width, 8,193 tokens (no multiple of its rows or programs), against
    `residual_norm_reference` in fp64 on the same inputs: `g` within half a unit in the last place of its dtype
    (rounded to nearest once) plus 1e-6 of its largest value, the fp32 sums within 1e-5."""
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(0)
    tokens, d = 8193, 1024
    s = (torch.randn(tokens, d, generator=gen, device=cuda) * 2 + 0.5).to(dtype)
    mean = s.float().mean(-1)
    rstd = (s.float().var(-1, unbiased=False) + 1e-6).rsqrt()
    gy, gs = (torch.randn(tokens, d, generator=gen, device=cuda).to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(d, generator=gen, device=cuda)).to(dtype)
    g, sums = residual_norm_backward(gs, gy, s, w, mean, rstd)
    ref_g, ref_sums = residual_norm_reference(*(t.double() for t in (gs, gy, s, w, mean, rstd)))
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    err = (g.double() - ref_g).abs()
    assert (err <= ref_g.abs() * ulp + 1e-6 * ref_g.abs().max()).all(), err.max()
    for got, ref in zip(sums, ref_sums, strict=True):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
