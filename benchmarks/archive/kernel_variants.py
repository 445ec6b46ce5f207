"""A/B of kernel variants in one run on one GPU: alone (do_bench medians) and end to end.

Archived study, not maintained: it wrote
benchmarks/results/archive/2026-11-25_fa79814/kernel_variants_h100.jsonl and
archive/2026-11-25_0399248/kernel_variants_h100_gemm_0399248.jsonl, and is kept as the record of how those
figures were measured. It may no longer run against the package: it sets the kernel A/B switches
`linear_gelu.DEFAULT_ERF` and `varlen_attention.FOLD_SCALE` and the `erf=` forms, which the kernels no longer
have (one form of each is kept).

    PYTHONPATH=. python benchmarks/kernel_variants.py --out $OUT/kernel_variants.jsonl

Variants (both forms of each stay in the code, selected by a module switch):

- the fused up-projection's GELU epilogue, `linear_gelu.DEFAULT_ERF`: "poly" (erf polynomial, then
  0.5 * v * (1 + erf)) against "fold" (the same polynomial with 1/sqrt(2) and 1/2 folded into its
  coefficients and exponent: relu(v) - t * 2**-(t*Q(t) + 1) with t = min(|v|, 4*sqrt(2)), no compare or
  select; the timed code multiplied by |v| instead of t, which is equal up to 4*sqrt(2) and compiles to the
  same instructions, and was changed after the run for the far negative tail);
- the attention kernel's softmax scale, `varlen_attention.FOLD_SCALE`: every score multiplied by the scale
  before the row max (False) against the scale entering through one FMA inside exp2 (True).

Parts: `gemm` times each epilogue form and each TMA config on the MLP shapes of ViT-S/B/L (H+ and 7B have
SwiGLU MLPs) at the mixed-64 token count, next to cuBLAS F.linear and F.linear + F.gelu, with the errors against fp32;
`attention` times both scale forms and several block configs on the mixed-64 and uniform segment lengths
(ViT-L heads), next to FlashAttention-2 varlen, with the errors against fp32 SDPA per segment; `e2e` runs
the compiled ViT-L packed model (`random:vitl16`, bf16) on mixed-64 and uniform 64 x 224 with each
combination, the variants interleaved over several rounds so drift hits them alike, and the min token
cosine of each against the fp32 packed model (sdpa). One JSON line per measurement, appended as measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F


def emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def gemm_part(out, tokens: int) -> None:
    from dinov3_packing.ops.triton import linear_gelu as lg

    extra = [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, EPI_SUBTILE=True, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, EPI_SUBTILE=True, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=False, num_warps=8, num_stages=4),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=6),
    ]
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"vits16": (384, 1536), "vitb16": (768, 3072), "vitl16": (1024, 4096)}  # H+ / 7B: SwiGLU, not fused
    for arch, (k, n) in shapes.items():
        gemm_shape(out, g, arch, tokens, k, n, lg.CONFIGS + (extra if arch == "vitl16" else []))
        torch.cuda.empty_cache()


def gemm_shape(out, g, arch: str, tokens: int, k: int, n: int, configs: list[dict]) -> None:
    from triton.testing import do_bench

    from dinov3_packing.ops.triton import linear_gelu as lg

    x = torch.randn(tokens, k, device="cuda", generator=g).to(torch.bfloat16)
    w = ((torch.rand(n, k, device="cuda", generator=g) * 2 - 1) / k**0.5).to(torch.bfloat16)
    b = ((torch.rand(n, device="cuda", generator=g) * 2 - 1) / k**0.5).to(torch.bfloat16)
    flops = 2.0 * tokens * k * n
    with torch.inference_mode():
        ref32 = F.gelu(F.linear(x.float(), w.float(), b.float()))
        ref_lp = F.gelu(F.linear(x, w, b))
        base = {"part": "gemm", "arch": arch, "M": tokens, "K": k, "N": n}
        for label, fn in (
            ("cublas linear", lambda: F.linear(x, w, b)),
            ("cublas linear + gelu", lambda: F.gelu(F.linear(x, w, b))),
        ):
            ms = do_bench(fn, return_mode="median")
            emit(out, {**base, "variant": label, "ms": ms, "tflops": flops / ms * 1e-9})
        err = (ref_lp.float() - ref32).abs().max().item()
        emit(out, {**base, "variant": "torch bf16 error", "max_abs_vs_fp32": err})
        for ci, cfg in enumerate(configs):
            for erf in ("poly", "fold"):
                row = {**base, "variant": f"fused {erf}", "config": ci, "cfg": cfg}

                def call(cfg=cfg, erf=erf):
                    return lg.launch_linear_gelu(x, w, b, cfg, kernel="tma", erf=erf)

                try:
                    y = call()
                    ms = do_bench(call, return_mode="median")
                    row.update(ms=ms, tflops=flops / ms * 1e-9, max_abs_vs_fp32=(y.float() - ref32).abs().max().item())
                except Exception as e:  # a config that does not fit (shared memory) is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                emit(out, row)


def attention_part(out) -> None:
    rng = random.Random(0)
    workloads = {
        "mixed-64": [5 + rng.randint(14, 48) * rng.randint(14, 48) for _ in range(64)],
        "uniform 64x224": [5 + 14 * 14] * 64,
        "uniform 32x512": [5 + 32 * 32] * 32,
    }
    configs = [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    ]
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, lens in workloads.items():
        attention_workload(out, g, name, lens, configs)


def attention_workload(out, g, name: str, lens: list[int], configs: list[dict], heads: int = 16, d: int = 64) -> None:
    from torch.nn.attention.varlen import varlen_attn
    from triton.testing import do_bench

    from dinov3_packing.ops.triton import varlen_attention as va

    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    total, mx = sum(lens), max(lens)
    flops = sum(4 * n * n * heads * d for n in lens)
    q, k, v = torch.randn(total, 3, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).unbind(1)
    ref32 = torch.cat(
        [
            F.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1).float() for t in (q, k, v))).transpose(0, 1)
            for lo, hi in itertools.pairwise(cu.tolist())
        ]
    )
    base = {"part": "attention", "workload": name, "tokens": total}

    def bench(row, fn):
        try:
            o = fn()
            row["rel_vs_fp32"] = float((o.float() - ref32).abs().max() / ref32.abs().max())
            ms = do_bench(fn, return_mode="median")
            row.update(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        emit(out, row)

    bench({**base, "variant": "FA2 varlen_attn"}, lambda: varlen_attn(q, k, v, cu, cu, mx, mx))
    for cfg in configs:
        for fold in (False, True):
            c = dict(cfg, FOLD_SCALE=fold)
            bench(
                {**base, "variant": f"triton fold={int(fold)}", "cfg": cfg},
                lambda c=c: va.launch(q, k, v, cu, config=c),
            )


def e2e_part(out, rounds: int, calls: int) -> None:
    from dinov3_packing.apps.bench.suite import (
        Workload,
        forward_flops,
        make_inputs,
        mixed_sizes,
        peak_matmul_tflops,
        time_calls,
    )
    from dinov3_packing.model.archs import arch_config
    from dinov3_packing.ops.triton import linear_gelu as lg
    from dinov3_packing.ops.triton import varlen_attention as va
    from dinov3_packing.parallel.compile import compile_model
    from dinov3_packing.weights.load import random_packing_model

    dev, dt = torch.device("cuda"), torch.bfloat16
    config = arch_config("vitl16")
    torch.manual_seed(0)
    ref_model = random_packing_model(config, attn_backend="sdpa").to(dev).eval()
    model = random_packing_model(config).to(dev, dt).eval()
    model.load_state_dict(ref_model.state_dict())  # the same weights, in bf16
    compiled = compile_model(model)
    peak = peak_matmul_tflops(dev, dt, 8192)
    emit(out, {"part": "peak", "tflops": peak["tflops"], "device": torch.cuda.get_device_name()})
    wls = [
        Workload("mixed-64", tuple(mixed_sizes(64, 14, 48))),
        Workload("uniform-64x224", ((224, 224),) * 64),
    ]
    variants = [("poly", False), ("fold", True), ("fold", False), ("poly", True)]
    for wl in wls:
        x = make_inputs(wl, config.patch_size, dev, dt)
        flops = forward_flops(config, wl.segments(config.patch_size))
        with torch.no_grad():
            ref = ref_model(x.hidden_states.float(), x.grid_thw).last_hidden_state if wl.name == "mixed-64" else None
            times = {v: [] for v in variants}
            cos = {}
            for v in variants:  # warm-up (compile once, tune once) and the cosine of each variant
                lg.DEFAULT_ERF, va.FOLD_SCALE = v
                for _ in range(3):
                    y = compiled(x.hidden_states, x.grid_thw).last_hidden_state
                if ref is not None:
                    cos[v] = F.cosine_similarity(y.float(), ref, dim=-1).min().item()
            for _ in range(rounds):
                for v in variants:
                    lg.DEFAULT_ERF, va.FOLD_SCALE = v
                    times[v] += time_calls(lambda x=x: compiled(x.hidden_states, x.grid_thw), calls, dev)
        for v in variants:
            med = statistics.median(times[v])
            emit(
                out,
                {
                    "part": "e2e",
                    "workload": wl.name,
                    "erf": v[0],
                    "fold_scale": v[1],
                    "median_ms": med * 1e3,
                    "min_ms": min(times[v]) * 1e3,
                    "img_s": len(wl.sizes) / med,
                    "mfu": flops / med / 1e12 / peak["tflops"],
                    "min_cos_vs_fp32": cos.get(v),
                    "n": len(times[v]),
                },
            )
    lg.DEFAULT_ERF, va.FOLD_SCALE = "fold", True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="gemm,attention,e2e")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    t0 = time.time()
    emit(args.out, {"part": "meta", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    parts = args.parts.split(",")
    if "gemm" in parts:
        gemm_part(args.out, 60038)
    if "attention" in parts:
        attention_part(args.out)
    if "e2e" in parts:
        e2e_part(args.out, args.rounds, args.calls)
    emit(args.out, {"part": "done", "elapsed_s": time.time() - t0})


if __name__ == "__main__":
    main()
