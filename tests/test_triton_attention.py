"""The Triton varlen attention kernel (kernels/varlen_attention.py) and its backend selection.

No GPU here: the kernel runs under Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when triton is
imported, hence a subprocess). Reference: fp32 SDPA on each segment alone. The interpreter computes
`tl.dot` in fp32 for fp32 inputs, so fp32 is held to 1e-6 relative; fp16 inputs are rounded once more
(p cast to fp16 before the second product, as on the GPU), so fp16 is held to 1e-3 relative (fp16 has an
11-bit mantissa: 4.9e-4 per rounding). The interpreter's `tl.dot` on bf16 is broken (it returns garbage
for a plain bf16 matmul), so bf16 is checked on the GPU (benchmarks/gpu_parity.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dinov3_packing.attention import BACKENDS, resolve_backend

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

KERNEL_CHECK = textwrap.dedent(
    """
    import itertools, json
    import torch
    import torch.nn.functional as F
    from dinov3_packing.kernels.varlen_attention import BLOCK_M, launch

    g = torch.Generator().manual_seed(0)
    # Lengths around the block sizes: 1 token, exact multiples of BLOCK_N and BLOCK_M, one over, a short
    # tail, and a segment longer than two query blocks.
    lens = [1, 5, 64, 65, BLOCK_M, BLOCK_M + 1, 31, 2 * BLOCK_M + 7, 3]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    results = []
    for dtype, heads, d, block_n in [
        (torch.float32, 3, 32, 32),
        (torch.float32, 2, 64, 64),
        (torch.float32, 1, 16, 128),
        (torch.float16, 2, 32, 64),
    ]:
        # q, k, v as strided views of one [T, 3, H, D] tensor, as the model passes them.
        qkv = torch.randn(cu[-1].item(), 3, heads, d, generator=g).to(dtype)
        q, k, v = qkv.unbind(1)
        out = launch(q, k, v, cu, config={"BLOCK_N": block_n})
        worst = 0.0
        for (s, e) in itertools.pairwise(cu.tolist()):
            ref = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).float() for x in (q, k, v)))
            ref = ref.transpose(0, 1)
            worst = max(worst, ((out[s:e].float() - ref).abs().max() / ref.abs().max()).item())
        results.append({"dtype": str(dtype), "block_n": block_n, "rel": worst, "finite": bool(out.isfinite().all())})
    print(json.dumps(results))
    """
)


def test_kernel_matches_sdpa_per_segment_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        tol = 1e-6 if r["dtype"] == "torch.float32" else 1e-3
        assert r["finite"], r
        assert r["rel"] <= tol, r


def test_triton_backend_selection():
    assert "triton" in BACKENDS
    # Inference on CUDA in bf16 with a supported head size: auto takes the Triton kernel.
    assert resolve_backend("auto", CUDA, torch.bfloat16, inference=True, head_dim=64) == "triton"
    # With autograd, attention dropout, fp32, an unsupported head size or on CPU, it does not.
    assert resolve_backend("auto", CUDA, torch.bfloat16, inference=False, head_dim=64) in ("varlen", "flash_attn")
    assert resolve_backend("auto", CUDA, torch.bfloat16, 0.1, inference=True, head_dim=64) in ("sdpa", "flash_attn")
    assert resolve_backend("auto", CUDA, torch.float32, inference=True, head_dim=64) == "sdpa"
    assert resolve_backend("auto", CUDA, torch.bfloat16, inference=True, head_dim=48) in ("varlen", "flash_attn")
    assert resolve_backend("auto", CPU, torch.bfloat16, inference=True, head_dim=64) == "sdpa"
    assert resolve_backend("triton", CUDA, torch.float16, inference=True, head_dim=128) == "triton"


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
        resolve_backend("triton", device, dtype, dropout, inference=inference, head_dim=head_dim)


def test_model_uses_triton_only_without_autograd(tiny):
    from dinov3_packing.modeling import DINOv3ViTPackingModel

    model = DINOv3ViTPackingModel(tiny(), attn_backend="auto").eval()
    # On the CPU every path is sdpa; the resolution itself is what the model asks for on CUDA.
    assert model.resolved_attn_backend(inference=True) == "sdpa"
    explicit = DINOv3ViTPackingModel(tiny(), attn_backend="triton")
    with pytest.raises(ValueError, match="attn_backend: 'triton' needs a CUDA device"):
        explicit.resolved_attn_backend(inference=True)
