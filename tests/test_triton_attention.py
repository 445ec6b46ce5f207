"""The Triton varlen attention kernel (ops/triton/varlen_attention.py) and its backend selection.

No GPU here: the kernel runs under Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when triton is
imported, hence a subprocess). Reference: SDPA in fp64 on each segment alone (fp32 SDPA itself is 0.8-1.1e-6
from fp64 on these inputs, measured; the kernel 0.4-0.7e-6). The interpreter computes `tl.dot` in fp32
for fp32 inputs, so fp32 is held to 1e-6 relative; fp16 inputs are rounded once more
(p cast to fp16 before the second product, as on the GPU), so fp16 is held to 1e-3 relative (fp16 has an
11-bit mantissa: 4.9e-4 per rounding). The interpreter's `tl.dot` on bf16 is broken (it returns garbage
for a plain bf16 matmul), so bf16 is checked on the GPU (benchmarks/gpu_parity.py).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from triton_interpreter import run_interpreted

from dinov3_packing.ops.attention import ATTENTION_BACKENDS, resolve_attention

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

KERNEL_CHECK = textwrap.dedent(
    """
    import itertools, json
    import torch
    import torch.nn.functional as F
    from dinov3_packing.ops.triton.varlen_attention import BLOCK_M, launch

    g = torch.Generator().manual_seed(0)
    # Lengths around the block sizes: 1 token, exact multiples of BLOCK_N and BLOCK_M, one over, a short
    # tail, and a segment longer than two query blocks.
    lens = [1, 5, 64, 65, BLOCK_M, BLOCK_M + 1, 31, 2 * BLOCK_M + 7, 3]
    # Segments starting on multiples of BLOCK_M mid-pack, empty segments, many one-token segments, and
    # many segments of random lengths (the vector lookup of cu_seqlens over a wide power of two).
    aligned = [BLOCK_M, BLOCK_M, 1, BLOCK_M - 1, 2 * BLOCK_M, 2]
    empty = [0, 5, 0, BLOCK_M, 0]
    ones = [1] * 40
    rand = [int(n) for n in torch.randint(1, 40, (300,), generator=g)]
    results = []
    # The last field: other config keys (a 64-row query block: the virtual block numbering follows it).
    for lens, dtype, heads, d, block_n, cu_dtype, extra in [
        (lens, torch.float32, 3, 32, 32, torch.int32, {}),
        (lens, torch.float32, 2, 64, 64, torch.int32, {}),
        (lens, torch.float32, 1, 16, 128, torch.int64, {}),
        (lens, torch.float16, 2, 32, 64, torch.int32, {}),
        (aligned, torch.float32, 1, 16, 64, torch.int32, {}),
        (empty, torch.float32, 1, 16, 32, torch.int64, {}),
        (ones, torch.float32, 2, 16, 32, torch.int32, {}),
        (rand, torch.float32, 1, 16, 32, torch.int32, {}),
        (lens, torch.float32, 2, 32, 32, torch.int32, {"BLOCK_M": 64}),
        (aligned, torch.float32, 1, 16, 64, torch.int64, {"BLOCK_M": 64}),
    ]:
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=cu_dtype)
        # q, k, v as strided views of one [T, 3, H, D] tensor, as the model passes them.
        qkv = torch.randn(cu[-1].item(), 3, heads, d, generator=g).to(dtype)
        q, k, v = qkv.unbind(1)
        out = launch(q, k, v, cu, config={"BLOCK_N": block_n, **extra})
        worst = 0.0
        for (s, e) in itertools.pairwise(cu.tolist()):
            if e == s:
                continue
            ref = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).double() for x in (q, k, v)))
            ref = ref.transpose(0, 1)
            worst = max(worst, ((out[s:e].double() - ref).abs().max() / ref.abs().max()).item())
        results.append(
            {"dtype": str(dtype), "segments": len(lens), "rel": worst, "finite": bool(out.isfinite().all())}
        )
    print("RESULT" + json.dumps(results))
    """
)


def test_kernel_matches_sdpa_per_segment_under_the_interpreter():
    pytest.importorskip("triton")
    results = run_interpreted(KERNEL_CHECK, timeout=300)
    assert len(results) == 10
    for r in results:
        tol = 1e-6 if r["dtype"] == "torch.float32" else 1e-3
        assert r["finite"], r
        assert r["rel"] <= tol, r


def test_triton_backend_selection():
    pytest.importorskip("triton")
    assert "triton" in ATTENTION_BACKENDS
    # Inference on CUDA in bf16 with a supported head size: auto takes the Triton kernel.
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True, head_dim=64) == "triton"
    # With autograd, attention dropout, fp32, an unsupported head size or on CPU, it does not.
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=False, head_dim=64) in ("varlen", "flash_attn")
    assert resolve_attention("auto", CUDA, torch.bfloat16, 0.1, inference=True, head_dim=64) in ("sdpa", "flash_attn")
    assert resolve_attention("auto", CUDA, torch.float32, inference=True, head_dim=64) == "sdpa"
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True, head_dim=48) in ("varlen", "flash_attn")
    assert resolve_attention("auto", CPU, torch.bfloat16, inference=True, head_dim=64) == "sdpa"
    assert resolve_attention("triton", CUDA, torch.float16, inference=True, head_dim=128) == "triton"
    # Without a head size the kernel is never assumed to fit.
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True) in ("varlen", "flash_attn")
    with pytest.raises(ValueError, match="head_dim=None"):
        resolve_attention("triton", CUDA, torch.bfloat16, inference=True)


@pytest.mark.parametrize(
    ("device", "dtype", "dropout", "inference", "head_dim", "match"),
    [
        (CPU, torch.bfloat16, 0.0, True, 64, "CUDA device"),
        (CUDA, torch.float32, 0.0, True, 64, "fp16/bf16"),
        (CUDA, torch.bfloat16, 0.1, True, 64, "dropout"),
        (CUDA, torch.bfloat16, 0.0, False, 64, "forward-only"),
        (CUDA, torch.bfloat16, 0.0, True, 48, "power of two"),
    ],
)
def test_triton_backend_refused_with_the_reason(device, dtype, dropout, inference, head_dim, match):
    with pytest.raises(ValueError, match=match):
        resolve_attention("triton", device, dtype, dropout, inference=inference, head_dim=head_dim)


def test_explicit_triton_backend_on_cpu_is_refused(tiny):
    from dinov3_packing.model.modeling import DINOv3ViTPackingModel

    model = DINOv3ViTPackingModel(tiny(), attn_backend="triton")
    with pytest.raises(ValueError, match="attn_backend: 'triton' needs a CUDA device"):
        model.resolved_attn_backend(inference=True)


def _forward_decision(model, hs, grid, **ctx) -> bool:
    """The `inference` flag the model's forward passes to backend resolution."""
    seen = []
    original = model.resolved_attn_backend

    def spy(inference: bool = True, **kwargs) -> str:
        seen.append(inference)
        return original(inference, **kwargs)

    model.resolved_attn_backend = spy
    try:
        if ctx.get("no_grad"):
            with torch.no_grad():
                model(hs, grid)
        else:
            model(hs, grid)
    finally:
        del model.resolved_attn_backend
    assert len(seen) == 1
    return seen[0]


def test_forward_is_inference_only_when_autograd_records_nothing(tiny):
    from dinov3_packing.model.modeling import DINOv3ViTPackingModel

    model = DINOv3ViTPackingModel(tiny()).eval()
    grid = torch.tensor([[1, 2, 2]])
    hs = torch.randn(4, model.patch_dim)
    assert _forward_decision(model, hs, grid, no_grad=True) is True
    assert _forward_decision(model, hs, grid) is False  # grad on, parameters require grad
    # Only the final norm frozen: the blocks still need gradients, so the forward-only kernel is out.
    model.norm.requires_grad_(False)
    assert _forward_decision(model, hs, grid) is False
    model.requires_grad_(False)
    assert _forward_decision(model, hs, grid) is True  # a frozen tower under grad mode
    assert _forward_decision(model, hs.requires_grad_(), grid) is False  # gradients wanted for the input
    model.train()
    assert _forward_decision(model, hs.detach(), grid) is False
    assert _forward_decision(model, hs.detach(), grid, no_grad=True) is True


INPUT_CHECKS = [
    (lambda q, cu: (q[:, :, :-16], q, q, cu), "k: expected shape"),
    (lambda q, cu: (q, q.half(), q, cu), "k: expected shape"),
    (lambda q, cu: (q[0], q[0], q[0], cu), "q: expected"),
    (lambda q, cu: (q.transpose(1, 2).contiguous().transpose(1, 2), q, q, cu), "q: expected unit stride"),
    (lambda q, cu: (q[..., :24], q[..., :24], q[..., :24], cu), "q: head_dim must be a power of two"),
    (lambda q, cu: (q, q, q, cu.float()), "cu_seqlens: expected a 1-D int32/int64"),
    (lambda q, cu: (q, q, q, cu[:1]), "cu_seqlens: expected a 1-D int32/int64"),
    (lambda q, cu: (q, q, q, cu[None]), "cu_seqlens: expected a 1-D int32/int64"),
    (lambda q, cu: (q, q, q, cu.tolist()), "cu_seqlens: expected a torch.Tensor"),
]


@pytest.mark.parametrize(("make", "match"), INPUT_CHECKS)
def test_kernel_inputs_are_checked_before_launch(make, match):
    pytest.importorskip("triton")
    from dinov3_packing.ops.triton.varlen_attention import launch

    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=match):
        launch(*make(q, cu), config={"BLOCK_N": 32})


def test_unknown_config_keys_are_refused():
    """A key the kernel does not take (a removed form switch, a misspelt block size) is an error, not ignored."""
    pytest.importorskip("triton")
    from dinov3_packing.ops.triton.varlen_attention import launch

    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for bad in ({"BLOCK_N": 32, "FOLD_SCALE": False}, {"BLOCK_N": 32, "BLOCK_m": 64}):
        with pytest.raises(ValueError, match="config: expected keys among"):
            launch(q, q, q, cu, config=bad)


def test_segment_search_width_is_shared_by_small_packs():
    """Every pack of up to 64 segments runs the kernel compiled for one search width (a job's short last pack
    compiled its own on the H200: a 0.6-1 s stall), larger ones the next power of two."""
    from dinov3_packing.ops.triton.varlen_attention import MIN_SEGMENT_SEARCH, segment_search_width

    assert MIN_SEGMENT_SEARCH == 64
    assert {segment_search_width(n) for n in range(0, 65)} == {64}
    assert [segment_search_width(n) for n in (65, 128, 129, 300, 4096, 4097)] == [128, 128, 256, 512, 4096, 8192]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
def test_packs_of_3_and_50_segments_share_one_compiled_kernel():
    """On the GPU: a pack of 50 segments and a short one of 3 run the same compiled kernel (before, the
    segment count's power of two was a specialisation: the short last pack of a run compiled its own)."""
    from dinov3_packing.ops.triton.varlen_attention import _varlen_fwd_kernel, launch

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

    def run(n: int) -> None:
        lens = torch.randint(40, 300, (n,), generator=g, device=dev)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
        q, k, v = torch.randn(int(cu[-1]), 3, 4, 64, generator=g, device=dev, dtype=torch.bfloat16).unbind(1)
        launch(q, k, v, cu, config=config)
        torch.cuda.synchronize()

    run(50)  # compiles (or finds) the kernel of this config
    cache = _varlen_fwd_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    run(3)
    run(17)
    assert len(cache) == before
