"""Kernel micro-benchmarks for the ViT-L mixed-64 shapes: varlen attention kernels and the MLP activation.

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_42f6efd/kernels_h100.txt,
archive/2026-11-25_ea7722c/kernels_h100_run2.txt and archive/2026-11-25_2bcf614/kernels_h100_tma.txt, and is
kept as the record of how those figures were measured. It may no longer run against the package: it calls
`linear_gelu.benchmark_linear_gelu`, removed from the kernel module, and reads the private
`_varlen_fwd_tuned`.

    PYTHONPATH=. python benchmarks/kernels_micro.py --out $OUT/kernels.txt

Attention candidates on the same q/k/v (16 heads x 64; mixed-64: 60,038 tokens in 64 segments of
201..2309 tokens; uniform 64 x 201 and 32 x 1029): FlashAttention-2 varlen (`varlen_attn`), this
package's Triton varlen kernel (autotuned and fixed configs), FlexAttention with a document mask
(mixed-64), dense SDPA (uniform, what HF runs); each checked against fp32 SDPA per segment.
MLP: up GEMM + erf GELU as two kernels vs variants.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
import torch.nn.functional as F
from triton.testing import do_bench

HEADS, HEAD_DIM = 16, 64


def attention_candidates(name: str, lens: list[int], log, attention_only: bool = False) -> None:
    """Time each varlen attention kernel on segments of `lens` tokens (ViT-L heads), with its error
    against fp32 SDPA per segment."""
    from torch.nn.attention.varlen import varlen_attn

    from dinov3_packing.ops.triton import varlen_attention as tva

    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    total, mx = sum(lens), max(lens)
    flops = sum(4 * n * n * HEADS * HEAD_DIM for n in lens)
    # q, k, v as strided views of one [T, 3, H, D] tensor, as the model passes them.
    q, k, v = torch.randn(total, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).unbind(1)
    log(f"attention {name}: {total} tokens, {len(lens)} segments, max {mx}, {flops / 1e12:.3f} TFLOP")
    bounds = list(itertools.pairwise(cu.tolist()))
    ref32 = torch.cat(
        [
            F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).float() for x in (q, k, v))).transpose(0, 1)
            for s, e in bounds
        ]
    )

    def bench(label, fn):
        try:
            out = fn()
            rel = float((out.float() - ref32).abs().max() / ref32.abs().max())
            ms = do_bench(fn, return_mode="median")
            log(f"  {label}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  rel err vs fp32 {rel:.2e}")
        except Exception as e:  # report and go on: one failing candidate must not end the run
            log(f"  {label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

    bench("FA2 varlen_attn", lambda: varlen_attn(q, k, v, cu, cu, mx, mx))
    bench("Triton varlen (autotuned)", lambda: tva.launch(q, k, v, cu))
    log(f"    autotuned config: {getattr(tva._varlen_fwd_tuned, 'best_config', None)}")
    for cfg in ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}):
        bench(f"Triton varlen {cfg}", lambda cfg=cfg: tva.launch(q, k, v, cu, config=cfg))
    if attention_only:
        return
    if len(set(lens)) == 1:
        b, n = len(lens), lens[0]

        def dense():
            qs, ks, vs = (x.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(total, HEADS, HEAD_DIM)

        bench("dense SDPA [B,H,N,D] (what HF runs)", dense)
        return
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

        def same_doc(b, h, qi, ki):
            return doc[qi] == doc[ki]

        block_mask = create_block_mask(same_doc, None, None, total, total, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_call():
            return flex(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask)[0].transpose(0, 1)

        bench("FlexAttention document mask (compiled)", flex_call)
    except Exception as e:
        log(f"  FlexAttention: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kernels.txt")
    parser.add_argument(
        "--attention-only", action="store_true", help="only the Triton kernels and FlashAttention-2, no MLP"
    )
    args = parser.parse_args()
    lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}"]

    def log(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    rng = random.Random(0)
    workloads = {
        "mixed-64": [5 + rng.randint(14, 48) * rng.randint(14, 48) for _ in range(64)],
        "uniform 64x224": [5 + 14 * 14] * 64,
        "uniform 32x512": [5 + 32 * 32] * 32,
    }
    for name, lens in workloads.items():
        attention_candidates(name, lens, log, args.attention_only)
    if args.attention_only:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return

    total = sum(workloads["mixed-64"])
    g = torch.Generator(device="cuda").manual_seed(1)
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

    try:
        from dinov3_packing.ops.triton.linear_gelu import benchmark_linear_gelu

        log(f"  Triton up GEMM + erf GELU epilogue (linear_gelu): {benchmark_linear_gelu(M=total)}")
    except Exception as e:
        log(f"  linear_gelu: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
