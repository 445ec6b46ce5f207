"""The RoPE kernel (ops/triton/rope.py): the rotation and its inverse against torch's formula.

The kernel runs under Triton's CPU interpreter in a subprocess (`triton_interpreter.run_interpreted`) on
fp32 and bf16 tensors: planes of a fused `[tokens, 3, heads, head_dim]` projection into a new tensor (the
forward), in place (the backward), a head size whose half is not a power of two (masked columns), a token
count that is not a multiple of the kernel's block. Reference: `rope_reference` (torch ops), in fp64 on the
same inputs. Tolerances: fp32, 1e-6 of max |ref| (two products and a sum, rounded once or twice: measured
~1e-7); bf16, each element within one bf16 ulp (2**-7 of |ref|, plus 1e-6 of max |ref|) of the fp64
result: the kernel computes in fp32 and rounds once, and the interpreter (Triton 3.8) converts fp32 to bf16
by truncation (every element equal to the truncated fp32 result when this was written), where a GPU rounds
to nearest: the GPU check keeps half an ulp (2**-8). The inverse is also checked to be the rotation's
transpose (`<R x, g> == <x, R^T g>`) and, for tables of real angles, its inverse (un-rotating a rotated
tensor gives it back). With a bias (added before the rotation) and with the inverse's column sums (the bias's
gradient) the same comparisons hold. On CUDA (the device) the same comparisons run on the GPU kernel.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from triton_interpreter import run_interpreted

from dinov3_packing.ops.triton.rope import BLOCK_T, check_planes, rope_planes, rope_reference

pytest.importorskip("triton")

# (name, dtype, tokens, heads, head_dim, mode): mode "new" writes planes 0-1 of a [tokens, 3, heads, d] tensor
# into a new one; "inplace" rotates them where they are.
CASES = [
    ("fp32_new", "float32", 2 * BLOCK_T + 5, 3, 16, "new"),
    ("fp32_inplace", "float32", BLOCK_T - 3, 2, 16, "inplace"),
    ("fp32_half_not_pow2", "float32", 41, 2, 24, "new"),
    ("bf16_new", "bfloat16", 2 * BLOCK_T + 5, 3, 16, "new"),
    ("bf16_inplace", "bfloat16", 41, 2, 64, "inplace"),
]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from dinov3_packing.ops.triton.rope import rope_planes, rope_reference

    def tables(tokens, d, gen):
        angles = torch.rand(tokens, d // 2, generator=gen, dtype=torch.float64).mul(6.3).repeat(1, 2)
        sin = angles.sin()
        return angles.cos(), torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=1)

    out = {}
    for name, dtype, tokens, heads, d, mode in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(len(out))
        cos64, sin64 = tables(tokens, d, gen)
        cos, sin = cos64.to(dt), sin64.to(dt)
        qkv = torch.randn(tokens, 3, heads, d, generator=gen).to(dt)
        row = {}
        for inverse in (False, True):
            x = qkv.clone()
            planes = x[:, :2]
            dst = planes if mode == "inplace" else torch.empty(tokens, 2, heads, d, dtype=dt)
            got = rope_planes(planes, dst, cos, sin, inverse=inverse, use_kernel=True)
            ref = rope_reference(qkv[:, :2].double(), cos.double(), sin.double(), inverse)
            err = (got.double() - ref).abs()
            scale = ref.abs().max()
            key = "inverse" if inverse else "forward"
            row[key + "_rel"] = (err.max() / scale).item()
            row[key + "_excess"] = (err - ref.abs() * 2.0**-7 - 1e-6 * scale).max().item()
            row[key + "_same_object"] = got is dst
            row[key + "_v_untouched"] = bool(torch.equal(x[:, 2], qkv[:, 2]))
        # A bias added before the rotation, and the column sums of the inverse (the bias's gradient).
        bias = torch.randn(2, heads, d, generator=gen).to(dt)
        x = qkv.clone()
        dst = x[:, :2] if mode == "inplace" else torch.empty(tokens, 2, heads, d, dtype=dt)
        got = rope_planes(x[:, :2], dst, cos, sin, use_kernel=True, bias=bias)
        ref = rope_reference(qkv[:, :2].double() + bias.double(), cos.double(), sin.double())
        err = (got.double() - ref).abs()
        row["bias_rel"] = (err.max() / ref.abs().max()).item()
        row["bias_excess"] = (err - ref.abs() * 2.0**-7 - 1e-6 * ref.abs().max()).max().item()
        # The sums through both launches: every head of a block of rows per program, then one head per program
        # over several blocks of rows.
        from dinov3_packing.ops.triton import rope
        default = rope.SUMS_LAUNCH
        rope.SUMS_LAUNCH = {"kernel": "rows", "block": 32, "num_warps": 4, "iters": 1}
        sums = torch.full((2, heads, d), float("nan"))
        x = qkv.clone()
        dst = x[:, :2] if mode == "inplace" else torch.empty(tokens, 2, heads, d, dtype=dt)
        rope_planes(x[:, :2], dst, cos, sin, inverse=True, use_kernel=True, sums=sums)
        ref = rope_reference(qkv[:, :2].double(), cos.double(), sin.double(), True)
        row["sums_rel"] = ((sums.double() - ref.sum(0)).abs().max() / ref.abs().sum(0).max()).item()
        rope.SUMS_LAUNCH = {"kernel": "heads", "block": 16, "num_warps": 2, "iters": 2}
        sums = torch.full((2, heads, d), float("nan"))
        x = qkv.clone()
        dst = x[:, :2] if mode == "inplace" else torch.empty(tokens, 2, heads, d, dtype=dt)
        got = rope_planes(x[:, :2], dst, cos, sin, inverse=True, use_kernel=True, sums=sums)
        row["heads_sums_rel"] = ((sums.double() - ref.sum(0)).abs().max() / ref.abs().sum(0).max()).item()
        err = (got.double() - ref).abs()
        row["heads_rel"] = (err.max() / ref.abs().max()).item()
        row["heads_excess"] = (err - ref.abs() * 2.0**-7 - 1e-6 * ref.abs().max()).max().item()
        row["heads_v_untouched"] = bool(torch.equal(x[:, 2], qkv[:, 2]))
        # Past CUDA's grid limit for the "heads" launch's rows the "rows" launch takes over (the limit lowered here).
        limit, rope._MAX_GRID_Y = rope._MAX_GRID_Y, 0
        sums = torch.full((2, heads, d), float("nan"))
        x = qkv.clone()
        rope_planes(x[:, :2], x[:, :2], cos, sin, inverse=True, use_kernel=True, sums=sums)
        row["fallback_sums_rel"] = ((sums.double() - ref.sum(0)).abs().max() / ref.abs().sum(0).max()).item()
        rope._MAX_GRID_Y = limit
        rope.SUMS_LAUNCH = default
        # The inverse is the transpose: <R x, g> == <x, R^T g> (fp64 tensors through the kernel's formula).
        xs, gs = (torch.randn(tokens, 1, heads, d, generator=gen, dtype=torch.float32) for _ in range(2))
        c32, s32 = cos64.float(), sin64.float()
        rx = rope_planes(xs, torch.empty_like(xs), c32, s32, use_kernel=True)
        rtg = rope_planes(gs, torch.empty_like(gs), c32, s32, inverse=True, use_kernel=True)
        row["adjoint_gap"] = abs((rx.double() * gs.double()).sum() - (xs.double() * rtg.double()).sum()).item()
        back = rope_planes(rx, torch.empty_like(rx), c32, s32, inverse=True, use_kernel=True)
        row["roundtrip_rel"] = ((back - xs).abs().max() / xs.abs().max()).item()
        out[name] = row
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(CASES), timeout=300)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_torch_under_the_interpreter(results, case):
    name, dtype = case[:2]
    r = results[name]
    for key in ("forward", "inverse"):
        if dtype == "float32":
            assert r[key + "_rel"] <= 1e-6, r
        else:
            assert r[key + "_excess"] <= 0, r
        assert r[key + "_same_object"] and r[key + "_v_untouched"], r


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_adds_a_bias_and_sums_the_inverse_under_the_interpreter(results, case):
    """The forward with a `[planes, heads, head_dim]` bias added before the rotation, against the fp64 rotation of
    the biased input (the same tolerances as without it: the kernel adds in fp32 and rounds once), and the
    inverse's column sums (the bias's gradient, summed in fp32 before rounding) against the fp64 sums of the fp64
    inverse: within 1e-6 of the largest sum of magnitudes (fp32 sums of up to ~70 terms); the inverse with sums
    through both launches (`SUMS_LAUNCH` "rows" and "heads")."""
    name, dtype = case[:2]
    r = results[name]
    if dtype == "float32":
        assert r["bias_rel"] <= 1e-6 and r["heads_rel"] <= 1e-6, r
    else:
        assert r["bias_excess"] <= 0 and r["heads_excess"] <= 0, r
    assert r["sums_rel"] <= 1e-6 and r["heads_sums_rel"] <= 1e-6 and r["heads_v_untouched"], r
    assert r["fallback_sums_rel"] <= 1e-6, r


@pytest.mark.parametrize(
    "launch",
    [
        {"kernel": "cols", "block": 32, "num_warps": 4, "iters": 8},
        {"kernel": "heads", "block": 24, "num_warps": 4, "iters": 8},
        {"kernel": "heads", "block": 32, "num_warps": 3, "iters": 8},
        {"kernel": "heads", "block": 32, "num_warps": 4, "iters": 0},
        {"kernel": "heads", "block": True, "num_warps": 4, "iters": 8},
        {"kernel": "heads", "block": 32, "num_warps": 4},
        [32, 4, 8],
    ],
)
def test_bad_sums_launch_is_refused_before_launch(monkeypatch, launch):
    from dinov3_packing.ops.triton import rope

    assert rope.check_sums_launch(dict(rope.SUMS_LAUNCH)) == rope.SUMS_LAUNCH
    monkeypatch.setattr(rope, "SUMS_LAUNCH", launch)
    x, c = torch.zeros(5, 2, 8, 8), torch.zeros(5, 8)
    with pytest.raises(ValueError, match="SUMS_LAUNCH: expected"):
        rope_planes(x, x, c, c, inverse=True, use_kernel=True, sums=torch.empty(2, 8, 8))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_inverse_is_the_transpose_and_undoes_the_rotation(results, case):
    r = results[case[0]]
    assert r["adjoint_gap"] <= 1e-3, r  # sums of ~10^3 fp32 products of order 1
    assert r["roundtrip_rel"] <= 1e-6, r


def test_reference_inverse_is_autograd_of_the_forward():
    """`rope_reference(..., inverse=True)` is the gradient of the forward, exactly (fp64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = (torch.randn(7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(7, 2, 3, 8, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(rope_reference(x, cos, sin), x, grad)
    torch.testing.assert_close(rope_reference(grad, cos, sin, inverse=True), want, rtol=0, atol=1e-15)


def test_cpu_path_without_kernel_equals_reference_in_place():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(9, 3, 2, 8, generator=g)
    cos, sin = (torch.randn(9, 8, generator=g) for _ in range(2))
    want = rope_reference(qkv[:, :2], cos, sin, inverse=True)
    v = qkv[:, 2].clone()
    sums = torch.empty(2, 2, 8)
    rope_planes(qkv[:, :2], qkv[:, :2], cos, sin, inverse=True, sums=sums)
    assert torch.equal(qkv[:, :2], want) and torch.equal(qkv[:, 2], v)
    assert torch.equal(sums, want.sum(0))
    bias = torch.randn(2, 2, 8, generator=g)
    got = rope_planes(qkv[:, :2], torch.empty(9, 2, 2, 8), cos, sin, bias=bias)
    assert torch.equal(got, rope_reference(qkv[:, :2] + bias, cos, sin))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bias": torch.zeros(2, 4, 8)}, r"bias: expected a contiguous \[planes, heads, head_dim\] = \[2, 8, 8\]"),
        ({"bias": torch.zeros(2, 8, 8, 2)[..., 0]}, "bias: expected a contiguous"),
        ({"sums": torch.zeros(1, 8, 8)}, "sums: expected a contiguous"),
        ({"sums": torch.zeros(2, 8, 8, dtype=torch.float64)}, "sums: expected float32"),
    ],
)
def test_bad_bias_or_sums_are_refused(kwargs, match):
    x, c = torch.zeros(5, 2, 8, 8), torch.zeros(5, 8)
    with pytest.raises(ValueError, match=match):
        rope_planes(x, torch.empty_like(x), c, c, **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, c: (x[0], x[0], c, c), "x: expected \\[tokens, planes"),
        (lambda x, c: (x, x[:, :1], c, c), "out: expected x's shape"),
        (lambda x, c: (x, x, c[:-1], c), "cos: expected \\[tokens, head_dim\\]"),
        (lambda x, c: (x, x, c, c[:, :4]), "sin: expected \\[tokens, head_dim\\]"),
        (lambda x, c: (x[..., :7], x[..., :7], c[:, :7], c[:, :7]), "even head_dim"),
        (lambda x, c: (x.transpose(2, 3), x.transpose(2, 3), c, c), "x: expected a unit stride"),
    ],
)
def test_bad_layouts_are_refused_before_launch(make, match):
    x, c = torch.zeros(5, 2, 8, 8), torch.zeros(5, 8)
    with pytest.raises(ValueError, match=match):
        check_planes(*make(x, c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_torch(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    tokens, heads, d = 60_038, 16, 64  # mixed-64's token count, ViT-L heads
    angles = torch.rand(tokens, d // 2, generator=g, device=dev, dtype=torch.float64).mul(6.3).repeat(1, 2)
    sin64 = angles.sin()
    cos = angles.cos().to(dtype)
    sin = torch.cat([-sin64[:, : d // 2], sin64[:, d // 2 :]], dim=1).to(dtype)
    qkv = torch.randn(tokens, 3, heads, d, generator=g, device=dev).to(dtype)
    for inverse in (False, True):
        got = rope_planes(qkv[:, :2], torch.empty(tokens, 2, heads, d, device=dev, dtype=dtype), cos, sin, inverse)
        ref = rope_reference(qkv[:, :2].double(), cos.double(), sin.double(), inverse)
        err = (got.double() - ref).abs()
        if dtype == torch.float32:
            assert (err.max() / ref.abs().max()).item() <= 1e-6
        else:
            assert (err - ref.abs() * 2.0**-8 - 1e-6 * ref.abs().max()).max().item() <= 0
        x = qkv.clone()
        rope_planes(x[:, :2], x[:, :2], cos, sin, inverse)
        assert torch.equal(x[:, :2], got) and torch.equal(x[:, 2], qkv[:, 2])
    # A bias before the rotation (as tight as without it), and the inverse's column sums in fp32 under each launch
    # (`SUMS_LAUNCH`): within 1e-5 of the largest sum of magnitudes (fp32 sums of blocks of rows, then of the
    # blocks' sums), the un-rotated result equal to the launch without sums.
    bias = torch.randn(2, heads, d, generator=g, device=dev).to(dtype)
    got = rope_planes(qkv[:, :2], torch.empty(tokens, 2, heads, d, device=dev, dtype=dtype), cos, sin, bias=bias)
    ref = rope_reference(qkv[:, :2].double() + bias.double(), cos.double(), sin.double())
    err = (got.double() - ref).abs()
    if dtype == torch.float32:
        assert (err.max() / ref.abs().max()).item() <= 1e-6
    else:
        assert (err - ref.abs() * 2.0**-8 - 1e-6 * ref.abs().max()).max().item() <= 0
    from dinov3_packing.ops.triton import rope

    ref = rope_reference(qkv[:, :2].double(), cos.double(), sin.double(), True)
    want = rope_planes(qkv[:, :2], torch.empty_like(got), cos, sin, inverse=True)
    default = dict(rope.SUMS_LAUNCH)
    try:
        for launch in (
            default,
            {"kernel": "rows", "block": 32, "num_warps": 4, "iters": 1},
            {"kernel": "rows", "block": 32, "num_warps": 1, "iters": 1},
        ):
            rope.SUMS_LAUNCH = dict(launch)
            sums = torch.empty(2, heads, d, device=dev)
            out = rope_planes(qkv[:, :2], torch.empty_like(got), cos, sin, inverse=True, sums=sums)
            assert torch.equal(out, want), launch  # the same rotation, rounded once
            assert ((sums.double() - ref.sum(0)).abs().max() / ref.abs().sum(0).max()).item() <= 1e-5, launch
    finally:
        rope.SUMS_LAUNCH = default
