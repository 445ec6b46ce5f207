"""The packed forward against Hugging Face's per-image loop on the CPU, fp32, in one run.

Issue 13 item 6: a user's 30 images of 200-700 px (23k patches, 2 cores) took longer packed than with
`DINOv3ViTModel` looped per image. This script times, for each architecture, on the same weights:

    hf-loop       `DINOv3ViTModel` (sdpa) with the same weights (`reference_model`), one call per image
    packed        `DINOv3ViTPackingModel` as shipped (on the CPU the blocks run over chunks of whole segments
                  of at most `cpu_chunk_tokens` tokens)
    packed-whole  the same model with `cpu_chunk_tokens = None`: every block over the whole pack at once,
                  the path before chunking
    packed-chunk-N  (with `--budgets`) the chunk budget N, to choose the default

on packs built from the bundled photos resized to each size:

    issue-30        30 images, `rng = random.Random(0)`, each `(rng.randint(200, 700), rng.randint(200, 700))` px
                    resized to at most 1024 patches (`target_size(..., max_tokens=1024)`), ~23k patches
    issue-8, issue-4, issue-1   the first 8, 4 and 1 images of that stream (small packs)
    uniform-16x224  16 images of 224 x 224 px

Systems and packs are timed interleaved (each round times every system on every pack once, after one
untimed warm-up call each), under `torch.inference_mode()` with `torch.set_num_threads(--threads)`; the
report gives the median, min and max over the rounds, and each packed system's max |diff| / max |ref| against
`hf-loop` (fp32 parity, checked on the warm-up outputs).

    python benchmarks/cpu_forward.py --threads 2 --rounds 5 --out benchmarks/results/latest/cpu_forward.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dinov3_packing import load_packing_model, pack, reference_model
from dinov3_packing.apps.bench.timing import run_metadata, time_calls, write_report
from dinov3_packing.data.files import load_at_patch_multiple, sample_image_paths
from dinov3_packing.data.preprocess import target_size

PATCH = 16
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def issue_sizes(n: int = 30) -> list[tuple[int, int]]:
    """Pixel sizes of the issue's stream: 200-700 px sides, at most 1024 patches."""
    rng = random.Random(0)
    return [target_size(rng.randint(200, 700), rng.randint(200, 700), PATCH, max_tokens=1024) for _ in range(n)]


def workloads() -> dict[str, list[tuple[int, int]]]:
    stream = issue_sizes()
    return {
        "issue-30": stream,
        "issue-8": stream[:8],
        "issue-4": stream[:4],
        "issue-1": stream[:1],
        "uniform-16x224": [(224, 224)] * 16,
    }


def photos_at(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The bundled photos, normalized, cycled and resized (bilinear, antialiased) to `sizes`."""
    photos = [load_at_patch_multiple(p, PATCH, *IMAGENET) for p in sample_image_paths()]
    return [
        F.interpolate(photos[i % len(photos)][None], size=hw, mode="bilinear", antialias=True)[0]
        for i, hw in enumerate(sizes)
    ]


def rel_diff(packed: torch.Tensor, refs: list[torch.Tensor], prefix: int) -> float:
    """max |packed - ref| / max |ref| over the patch tokens of every image."""
    ref = torch.cat([r[0, prefix:] for r in refs])
    return ((packed - ref).abs().max() / ref.abs().max()).item()


def packed_call(model, hs: torch.Tensor, grid: torch.Tensor, budget: int | None):
    def call():
        model.cpu_chunk_tokens = budget
        return model(hs, grid).last_hidden_state

    return call


def hf_call(ref, images: list[torch.Tensor]):
    return lambda: [ref(pixel_values=i[None]).last_hidden_state for i in images]


def run_arch(arch: str, inputs: dict[str, list[torch.Tensor]], budgets: list[int], rounds: int) -> list[dict]:
    """Rows for one architecture: every system on every pack, interleaved over `rounds`."""
    model = load_packing_model(f"random:{arch}")
    ref = reference_model(model)
    default_budget, prefix = model.cpu_chunk_tokens, model.num_prefix_tokens
    variants = {"packed": default_budget, "packed-whole": None, **{f"packed-chunk-{b}": b for b in budgets}}
    calls, parity = {}, {}
    with torch.inference_mode():
        for name, images in inputs.items():
            hs, grid = pack(images, PATCH)
            calls[(name, "hf-loop")] = hf_call(ref, images)
            for system, budget in variants.items():
                calls[(name, system)] = packed_call(model, hs, grid, budget)
        refs = {}
        for (name, system), call in calls.items():  # warm-up, untimed; parity from its outputs
            out = call()
            if system == "hf-loop":
                refs[name] = out
            else:
                parity[(name, system)] = rel_diff(out, refs[name], prefix)
        times = {key: [] for key in calls}
        for r in range(rounds):
            for key, call in calls.items():
                times[key].append(time_calls(call, 1, "cpu")[0])
            print(f"{arch} round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    model.cpu_chunk_tokens = default_budget
    rows = []
    for (name, system), ts in times.items():
        hf = statistics.median(times[(name, "hf-loop")])
        rows.append(
            {
                "arch": arch,
                "workload": name,
                "images": len(inputs[name]),
                "patches": sum(i.shape[1] * i.shape[2] for i in inputs[name]) // PATCH**2,
                "system": system,
                "chunk_tokens": variants.get(system),
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "times_s": ts,
                "speedup_vs_hf_loop": hf / statistics.median(ts),
                "rel_diff_vs_hf": parity.get((name, system)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="vits16,vitb16", help="comma-separated random:<arch> architectures")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    ap.add_argument("--workloads", default=",".join(workloads()), help="comma-separated packs to time")
    ap.add_argument("--budgets", default="", help="comma-separated extra chunk budgets to time (packed-chunk-N)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = ap.parse_args(argv)
    names = args.workloads.split(",")
    unknown = sorted(set(names) - set(workloads()))
    if unknown:
        ap.error(f"--workloads: unknown {unknown}; expected some of {list(workloads())}")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    torch.set_num_threads(args.threads)

    meta = run_metadata("cpu")
    inputs = {name: photos_at(sizes) for name, sizes in workloads().items() if name in names}
    results = []
    for arch in args.archs.split(","):
        for row in run_arch(arch, inputs, budgets, args.rounds):
            results.append(row)
            print(
                f"{arch:8s} {row['workload']:15s} {row['system']:18s} median {row['median_s']:7.3f} s "
                f"[{row['min_s']:.3f}, {row['max_s']:.3f}]  x{row['speedup_vs_hf_loop']:.2f} vs hf-loop"
                + (f"  rel diff {row['rel_diff_vs_hf']:.1e}" if row["rel_diff_vs_hf"] is not None else ""),
                flush=True,
            )
        if args.out:  # after every architecture, so that a run cut short keeps what it measured
            write_report(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
