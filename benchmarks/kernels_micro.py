"""Kernel micro-benchmarks for the ViT-L mixed-64 shapes: varlen attention kernels and the MLP activation.

    PYTHONPATH=. python benchmarks/kernels_micro.py --out $OUT/kernels.txt

Attention candidates on the same q/k/v (60,038 tokens, 16 heads x 64, 64 segments of 201..2309 tokens):
FlashAttention-2 varlen (`varlen_attn`), cuDNN varlen (`aten._cudnn_attention_forward` with cumulative
sequence lengths), checked against FA2 for agreement. MLP: up GEMM + erf GELU as two kernels vs variants.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kernels.txt")
    args = parser.parse_args()
    lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}"]

    def log(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    rng = random.Random(0)
    lens = [5 + rng.randint(14, 48) * rng.randint(14, 48) for _ in range(64)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total, mx, heads, dh = sum(lens), max(lens), 16, 64
    flops = sum(4 * n * n * heads * dh for n in lens)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(total, heads, dh, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    log(f"attention: {total} tokens, {len(lens)} segments, max {mx}, {flops / 1e12:.2f} TFLOP")

    from torch.nn.attention.varlen import varlen_attn

    ref = varlen_attn(q, k, v, cu, cu, mx, mx)
    ms = do_bench(lambda: varlen_attn(q, k, v, cu, cu, mx, mx), return_mode="median")
    log(f"  FA2 varlen_attn: {ms:.2f} ms  {flops / ms / 1e9:.0f} TFLOP/s")

    def cudnn():
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, False, 0.0, False, False)[0]

    try:
        out = cudnn()
        err = float((out.float() - ref.float()).abs().max())
        ms = do_bench(cudnn, return_mode="median")
        log(f"  cuDNN varlen: {ms:.2f} ms  {flops / ms / 1e9:.0f} TFLOP/s  max|diff| vs FA2 {err:.2e}")
    except Exception as e:
        log(f"  cuDNN varlen: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

    # MLP up-projection + GELU at ViT-L widths.
    x = torch.randn(total, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    log(f"  up GEMM: {do_bench(lambda: F.linear(x, w, b), return_mode='median'):.3f} ms")
    h = F.linear(x, w, b)
    log(f"  erf GELU alone: {do_bench(lambda: F.gelu(h), return_mode='median'):.3f} ms")
    log(f"  up GEMM + erf GELU: {do_bench(lambda: F.gelu(F.linear(x, w, b)), return_mode='median'):.3f} ms")
    try:
        tanh_fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        err = float((tanh_fused.float() - F.gelu(h).float()).abs().max())
        ms = do_bench(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), return_mode="median")
        log(f"  cublasLt GEMM+GELU epilogue: {ms:.3f} ms (max|diff| vs erf GELU {err:.2e})")
    except Exception as e:
        log(f"  cublasLt GELU epilogue unavailable: {e}")

    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
