"""Training-step throughput on mixed-64 (forward + backward, bf16): packed vs Hugging Face looped per image.

    PYTHONPATH=. python benchmarks/train_throughput.py --out $OUT/train.json

Systems: packed eager, packed with gradient checkpointing, packed compiled (compile.compile_model), HF
`DINOv3ViTModel` (sdpa) one image at a time with gradients accumulated. MFU counts 3x the forward FLOPs
(4x with checkpointing's recomputed forward is *not* credited: the same useful work is counted) over the
bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from dinov3_packing import load_packing_model, pack, reference_model
from dinov3_packing.parallel.compile import compile_model


def matmul_peak() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 8192**3 / sorted(times)[10]


def forward_flops(model, grid) -> float:
    cfg = model.config
    linear = sum(p.numel() for n, p in model.model.named_parameters() if n.endswith("proj.weight"))
    d, layers, prefix = cfg.hidden_size, cfg.num_hidden_layers, model.num_prefix_tokens
    total = 0.0
    for t, h, w in grid.tolist():
        n = prefix + h * w
        total += t * (2 * linear * n + 4 * n * n * d * layers + 2 * h * w * d * model.patch_dim)
    return total


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="train.json")
    parser.add_argument("--arch", default="vitl16")
    args = parser.parse_args()
    rng = random.Random(0)
    sizes = [(16 * rng.randint(14, 48), 16 * rng.randint(14, 48)) for _ in range(64)]
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    hs, grid = pack(images, 16)
    hs = hs.to("cuda", torch.bfloat16)
    peak = matmul_peak()
    report = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "arch": args.arch,
        "workload": "mixed-64",
        "matmul_peak_tflops": peak / 1e12,
        "systems": {},
    }

    model = load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16).train()
    flops = 3 * forward_flops(model, grid)
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
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "systems"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
