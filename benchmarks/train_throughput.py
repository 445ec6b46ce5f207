"""Training-step throughput on mixed-64 (forward + backward, bf16): packed vs Hugging Face looped per image.

    python benchmarks/train_throughput.py --out $OUT/train_throughput.json

Systems: packed eager, packed with gradient checkpointing, packed compiled (compile.compile_model), HF
`DINOv3ViTModel` (sdpa) one image at a time with gradients accumulated. MFU counts 3x the forward FLOPs
(4x with checkpointing's recomputed forward is *not* credited: the same useful work is counted) over the
bf16 matmul peak measured in the same run. Each step is timed with CUDA events after a warm-up step
(`apps.bench.timing.measure`); the median is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dinov3_packing import load_packing_model, pack, reference_model
from dinov3_packing.apps.bench.timing import Timing, measure, peak_matmul_tflops, run_metadata, write_report
from dinov3_packing.apps.bench.workloads import forward_flops, mixed_sizes
from dinov3_packing.parallel.compile import compile_model


def timed(fn, reps: int) -> tuple[float, float]:
    """Median seconds per step and peak allocated GiB over the timed steps."""
    m = measure(fn, "cuda", Timing(target_s=0.0, min_repeats=reps, max_repeats=reps))
    return m["median_s"], m["peak_alloc_gib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/latest/train_throughput.json")
    parser.add_argument("--arch", default="vitl16")
    args = parser.parse_args()
    sizes = mixed_sizes(64)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    hs, grid = pack(images, 16)
    hs = hs.to("cuda", torch.bfloat16)
    peak = peak_matmul_tflops("cuda", torch.bfloat16, 8192)["tflops"] * 1e12
    report = {
        "meta": run_metadata("cuda"),
        "arch": args.arch,
        "workload": "mixed-64",
        "matmul_peak_tflops": peak / 1e12,
        "systems": {},
    }

    model = load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16).train()
    flops = 3 * forward_flops(model.config, [(h, w) for t, h, w in grid.tolist() for _ in range(t)])
    report["train_tflop_per_step"] = flops / 1e12

    def packed_step():
        model.zero_grad(set_to_none=True)
        out = model(hs, grid)
        (out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()).backward()

    def record(name, fn, reps):
        try:
            seconds, mem = timed(fn, reps)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            report["systems"][name] = {"error": "CUDA out of memory"}
            print(name, "CUDA out of memory", flush=True)
            return
        report["systems"][name] = {
            "images_per_s": 64 / seconds,
            "step_ms": seconds * 1e3,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak,
            "peak_mem_gib": mem,
        }
        print(name, json.dumps(report["systems"][name]), flush=True)

    record("packed eager", packed_step, 5)
    model.gradient_checkpointing_enable()
    record("packed eager + checkpointing", packed_step, 5)
    model.gradient_checkpointing_disable()
    compile_model(model)
    record("packed compiled", packed_step, 5)

    ref = reference_model(load_packing_model(f"random:{args.arch}", "cpu", torch.float32)).to("cuda", torch.bfloat16)
    ref.train()
    gpu_images = [img[None].to("cuda", torch.bfloat16) for img in images]

    def hf_loop_step():
        ref.zero_grad(set_to_none=True)
        for x in gpu_images:
            out = ref(x)
            (
                out.last_hidden_state[:, 5:].float().square().mean() / 64
                + out.pooler_output.float().square().mean() / 64
            ).backward()

    record("HF looped per image", hf_loop_step, 2)
    s = report["systems"]
    if "images_per_s" in s["packed compiled"] and "images_per_s" in s["HF looped per image"]:
        report["speedup_compiled_vs_hf_loop"] = (
            s["packed compiled"]["images_per_s"] / s["HF looped per image"]["images_per_s"]
        )
    if "peak_mem_gib" in s["packed eager"] and "peak_mem_gib" in s["packed eager + checkpointing"]:
        report["checkpointing_memory_saving"] = (
            1 - s["packed eager + checkpointing"]["peak_mem_gib"] / s["packed eager"]["peak_mem_gib"]
        )
    write_report(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("systems", "meta")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
