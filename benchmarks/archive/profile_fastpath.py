"""Profile the packed fast path on mixed-64 (ViT-L/16 bf16): variants of compilation, top kernels.

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_ea7722c/,
archive/2026-11-25_42f6efd/, archive/2026-11-25_80796de/, archive/2026-11-25_0e48fe6/,
archive/2026-11-25_004e4fb/ and archive/2026-11-25_e638667/ (profile_h100_*.txt), and is kept as the record of
how those figures were measured. It may no longer run against the package: it selects compile variants and
attention backends by the names they had then.

    PYTHONPATH=. python benchmarks/profile_fastpath.py --out $OUT/profile.txt

Prints images/s per variant and, for the eager and the best compiled variant, the CUDA kernels that
take the most time, grouped as GEMM / attention / elementwise+norm / other.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dinov3_packing import load_packing_model, pack
from dinov3_packing.parallel.compile import compile_model

WORKLOADS = {
    "mixed-64": lambda rng: [(16 * rng.randint(14, 48), 16 * rng.randint(14, 48)) for _ in range(64)],
    "uniform-64x224": lambda rng: [(224, 224)] * 64,
    "uniform-32x512": lambda rng: [(512, 512)] * 32,
}


def make_inputs(workload: str, p: int, device: str):
    sizes = WORKLOADS[workload](random.Random(0))
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    hs, grid = pack(images, p)
    return hs.to(device, torch.bfloat16), grid, images


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def host_ms(fn, reps: int = 5) -> float:
    """CPU time to issue one forward (no synchronize): when it nears the wall time, the host is the bound."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


def kernel_kind(name: str) -> str:
    """GEMM / attention / elementwise for a CUDA kernel name. Inductor's generated kernels (`triton_*`)
    are elementwise or norms even where an attention op's name is fused into theirs; attention kernels
    are checked before GEMMs because FlashAttention's names mention cutlass."""
    low = name.lower()
    if low.startswith("triton_"):
        return "elementwise/norm/other"
    if any(k in low for k in ("flash", "fmha", "_varlen_fwd", "sdpa", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "matmul", "sm90_xmma", "cutlass", "nvjet", "linear_gelu")):
        return "gemm"
    return "elementwise/norm/other"


def kernel_table(fn, label: str, lines: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total / 1e3
        if t <= 0:
            continue
        name = e.key
        kind = kernel_kind(name)
        groups[kind] = groups.get(kind, 0.0) + t
        rows.append((t, e.count, kind, name[:110]))
    rows.sort(reverse=True)
    lines.append(f"## {label}: total {sum(groups.values()):.1f} ms of kernels")
    lines += [f"  {k:<24} {v:8.2f} ms" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += [f"  {t:8.2f} ms x{c:<4} {k:<10} {n}" for t, c, k, n in rows[:25]]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile.txt")
    parser.add_argument("--arch", default="vitl16")
    parser.add_argument("--variants", default="all,tokens", help="comma list of all, tokens, autotune")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--backends", default="auto", help="comma list of attention backends to compile with")
    parser.add_argument("--workload", default="mixed-64", choices=sorted(WORKLOADS))
    parser.add_argument("--hf-compiled", action="store_true", help="also profile HF under torch.compile (uniform)")
    args = parser.parse_args()
    lines: list[str] = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  workload {args.workload}"]
    model = load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16)
    hs, grid, images = make_inputs(args.workload, model.patch_size, "cuda")
    n_images = len(images)

    def run():
        return model(hs, grid)

    if not args.no_eager:
        t = timed(run)
        lines.append(f"eager: {n_images / t:.1f} images/s ({t * 1e3:.1f} ms), host issue time {host_ms(run):.1f} ms")
        print(lines[-1], flush=True)
        kernel_table(run, "eager", lines)

    known = {
        "all": ("compile dynamic=all scope=block", {"dynamic": "all", "scope": "block"}),
        "tokens": ("compile dynamic=tokens scope=block", {"dynamic": "tokens", "scope": "block"}),
        "stack": ("compile dynamic=tokens scope=stack", {"dynamic": "tokens", "scope": "stack"}),
        "autotune": ("compile stack max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"}),
    }
    runs = [(v, b) for v in args.variants.split(",") for b in args.backends.split(",")]
    for (variant, kwargs), backend in ((known[v], b) for v, b in runs):
        variant = f"{variant} attn={backend}"
        torch._dynamo.reset()
        model = load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16, attn_backend=backend)
        compile_model(model, **kwargs)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        t = timed(run)
        lines.append(
            f"{variant} ({model.resolved_attn_backend()}): {n_images / t:.1f} images/s ({t * 1e3:.1f} ms), "
            f"first call {warm:.1f} s, "
            f"host issue time {host_ms(run):.1f} ms"
        )
        print(lines[-1], flush=True)
        kernel_table(run, variant, lines)
        other = model(hs[: int(grid[:10].prod(1).sum())], grid[:10])  # another pack: must not recompile
        del other
        stats = dict(torch._dynamo.utils.counters["stats"])
        lines.append(f"{variant}: dynamo stats after a second pack {stats}")
        print(lines[-1], flush=True)
    if args.hf_compiled:
        from dinov3_packing.weights.load import reference_model

        torch._dynamo.reset()
        hf = reference_model(load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16)).to("cuda").eval()
        batch = torch.stack(images).to("cuda", torch.bfloat16)
        hf_fwd = torch.compile(hf)

        def hf_run():
            return hf_fwd(pixel_values=batch)

        hf_run()
        t = timed(hf_run)
        lines.append(
            f"HF compiled: {n_images / t:.1f} images/s ({t * 1e3:.1f} ms), host issue {host_ms(hf_run):.1f} ms"
        )
        print(lines[-1], flush=True)
        kernel_table(hf_run, "HF compiled", lines)
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
