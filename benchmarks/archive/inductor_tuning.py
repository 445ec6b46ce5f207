"""Does Inductor's coordinate-descent tuning of its own kernels (norms, residuals, RoPE) pay off end to end?

Archived study, not maintained: it wrote
benchmarks/results/archive/2026-11-25_7f35be6/inductor_tuning_h100.jsonl, and is kept as the record of how
those figures were measured. It may no longer run against the package: it imports `time_calls` and the
workload helpers from `apps.bench.suite` (now `apps.bench.timing` and `apps.bench.workloads`).

    PYTHONPATH=. python benchmarks/inductor_tuning.py --out $OUT/inductor_tuning.jsonl

The ViT-L packed model (`random:vitl16`, bf16, the shipped defaults) compiled twice with `compile_model`:
once as shipped, once with `torch._inductor.config.coordinate_descent_tuning = True` while it compiles
(Inductor then searches block sizes and warp counts for each generated kernel on its first call). Each
runs mixed-64 and uniform 64 x 224 (the shipped compile before and after the tuned one); reported: median
and min per forward, the first-call (compile + tune) time, and the max difference from the shipped output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    from dinov3_packing.apps.bench.suite import Workload, forward_flops, make_inputs, mixed_sizes, time_calls
    from dinov3_packing.model.archs import arch_config
    from dinov3_packing.parallel.compile import compile_model
    from dinov3_packing.weights.load import random_packing_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    config = arch_config("vitl16")
    emit(args.out, {"part": "meta", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    wls = [Workload("mixed-64", tuple(mixed_sizes(64, 14, 48))), Workload("uniform-64x224", ((224, 224),) * 64)]
    inputs = {wl.name: make_inputs(wl, config.patch_size, dev, dt) for wl in wls}
    # Phases run one after another, each on a freshly compiled model (Dynamo reset in between: with nn
    # modules inlined, a second instance would otherwise reuse the first one's compiled code), the shipped
    # compile measured before and after the tuned one so that drift shows.
    outs = {}
    for name, tune in (("shipped", False), ("coordinate-descent", True), ("shipped-again", False)):
        torch._dynamo.reset()
        torch._inductor.config.coordinate_descent_tuning = tune
        model = compile_model(random_packing_model(config).to(dev, dt).eval())
        for wl in wls:
            x = inputs[wl.name]
            flops = forward_flops(config, wl.segments(config.patch_size))
            with torch.no_grad():
                t0 = time.perf_counter()
                outs[name, wl.name] = model(x.hidden_states, x.grid_thw).last_hidden_state.float()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                for _ in range(2):
                    model(x.hidden_states, x.grid_thw)
                t = []
                for _ in range(args.rounds):
                    t += time_calls(lambda m=model, x=x: m(x.hidden_states, x.grid_thw), args.calls, dev)
            med = statistics.median(t)
            emit(
                args.out,
                {
                    "workload": wl.name,
                    "compile": name,
                    "median_ms": med * 1e3,
                    "min_ms": min(t) * 1e3,
                    "img_s": len(wl.sizes) / med,
                    "tflops": flops / med / 1e12,
                    "first_call_s": first,
                    "max_abs_diff_vs_shipped": (outs[name, wl.name] - outs["shipped", wl.name]).abs().max().item(),
                    "n": len(t),
                },
            )
        del model
    torch._inductor.config.coordinate_descent_tuning = False


if __name__ == "__main__":
    main()
