"""Does the forward's speed depend on the weights' values? Same code, same inputs, two random inits.

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_7f35be6/init_speed_h100.jsonl,
and is kept as the record of how those figures were measured. It may no longer run against the package: it
imports `build_on_device`, `time_calls` and the workload helpers from `apps.bench.suite` (now
`apps.bench.systems`, `apps.bench.timing` and `apps.bench.workloads`).

    PYTHONPATH=. python benchmarks/init_speed.py --out $OUT/init_speed.jsonl

The bench suite builds its models with Hugging Face's init on the device (`bench.build_on_device`: weights
truncated-normal 0.02, zero biases, LayerNorm 1/0, LayerScale 1e-5); the variant scripts use
`random:<arch>` (`random_packing_model`: biases, norms and LayerScale U(0.05, 0.3) drawn too). On a
power-limited card the data can change clocks. Both ViT-L models, compiled with the shipped defaults, run
mixed-64 interleaved over several rounds on one GPU; median and min per forward for each.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    from dinov3_packing.apps.bench.suite import Workload, build_on_device, make_inputs, mixed_sizes, time_calls
    from dinov3_packing.model.archs import arch_config
    from dinov3_packing.parallel.compile import compile_model
    from dinov3_packing.weights.load import random_packing_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    config = arch_config("vitl16")
    wl = Workload("mixed-64", tuple(mixed_sizes(64, 14, 48)))
    x = make_inputs(wl, config.patch_size, dev, dt)
    models = {
        "hf-init (bench)": compile_model(build_on_device(config, dev, dt)),
        "random:vitl16": compile_model(random_packing_model(config).to(dev, dt).eval()),
    }
    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x.hidden_states, x.grid_thw)
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name] += time_calls(lambda m=m: m(x.hidden_states, x.grid_thw), args.calls, dev)
    for name, t in times.items():
        row = {
            "device": torch.cuda.get_device_name(),
            "workload": wl.name,
            "init": name,
            "median_ms": statistics.median(t) * 1e3,
            "min_ms": min(t) * 1e3,
            "img_s": len(wl.sizes) / statistics.median(t),
            "n": len(t),
        }
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
