"""Where the host time of one packed forward goes (CUDA): timers per stage and a cProfile of the forward.

Archived study, not maintained: it wrote
benchmarks/results/archive/2026-11-25_42f6efd/host_profile_h100_vitl16_{eager,compiled}.txt, and is kept as
the record of how those figures were measured. It may no longer run against the package: it calls the
model's stages with the signatures they had then (`embeddings(hs, layout)`, `rope_embeddings(layout, dtype)`).

    PYTHONPATH=. python benchmarks/host_profile.py --out $OUT/host_profile.txt [--compile]

Host time is measured with the GPU idle before the call (synchronize, then time the call without
synchronizing), so it is the time to issue the work, plus any wait inside the call for the device.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

import torch

from dinov3_packing import load_packing_model, pack
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.compile import compile_model


def host_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="host_profile.txt")
    parser.add_argument("--arch", default="vitl16")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}"]
    model = load_packing_model(f"random:{args.arch}", "cuda", torch.bfloat16)
    rng = random.Random(0)
    sizes = [(16 * rng.randint(14, 48), 16 * rng.randint(14, 48)) for _ in range(64)]
    g = torch.Generator().manual_seed(0)
    hs, grid = pack([torch.randn(3, h, w, generator=g) for h, w in sizes], model.patch_size)
    hs = hs.to("cuda", torch.bfloat16)
    layout = PackedLayout.build(grid, model.num_prefix_tokens, "cuda")
    stages = {
        "PackedLayout.build (cuda)": lambda: PackedLayout.build(grid, model.num_prefix_tokens, "cuda"),
        "PackedLayout.build (cpu)": lambda: PackedLayout.build(grid, model.num_prefix_tokens, "cpu"),
        "rope tables": lambda: model.rope_embeddings(layout, torch.bfloat16),
        "embeddings": lambda: model.embeddings(hs, layout),
        "resolved_attn_backend": lambda: model.resolved_attn_backend(),
    }
    if args.compile:
        compile_model(model)
    run = lambda: model(hs, grid)  # noqa: E731
    for _ in range(3):
        run()
    stages["whole forward"] = run
    for name, fn in stages.items():
        fn()
        lines.append(f"{name}: host {host_ms(fn):.2f} ms")
        print(lines[-1], flush=True)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
        lines.append(buf.getvalue())
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
