"""Measure the fast-path options against each other and against compiled HF, in one run on one GPU.

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_831f009/,
archive/2026-11-25_2bcf614/ and archive/2026-11-25_81566f3/ (fastpath_variants_h100*.jsonl), and is kept as
the record of how those figures were measured. It may no longer run against the package: it imports `Timing`,
`measure`, `peak_matmul_tflops` and the workload helpers from `apps.bench.suite` (now `apps.bench.timing` and
`apps.bench.workloads`) and reads the private `linear_gelu._tma_autotuned`.

    PYTHONPATH=. python benchmarks/fastpath_variants.py --out $OUT/variants.jsonl

Each row is appended to `--out` as one JSON line the moment it is measured (a cut-off run keeps what it
measured). End to end (`random:<arch>`, bf16, `compile_model`): each variant `fused_mlp/compile-mode`
(fused_mlp 0 or 1; a torch.compile mode such as `default` or `reduce-overhead`, which adds CUDA graphs) on
mixed-64, uniform 64 x 224 and 32 x 512, with HF `DINOv3ViTModel` under torch.compile on the
uniform batches and HF looped per image on mixed-64 as the baselines, the min token cosine of each
variant's mixed-64 output against the fp32 packed model (sdpa), and the number of graphs each variant
compiled. The three recorded runs drew the weights with Hugging Face's init (LayerScale 1e-5), under
which the blocks barely touch the output, so their cosines (0.999995 in every row) carry no information;
the script now draws them like `random:<arch>`. (The first run, `results/fastpath_variants_h100.jsonl`,
also timed RoPE inside the attention kernel, at commit 831f009; the second,
`fastpath_variants_h100_run2.jsonl`, a TMA variant of the kernel, at 2bcf614. Both were removed because
they were slower.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

DEFAULT_VARIANTS = ["0/default", "1/default", "1/reduce-overhead", "0/reduce-overhead"]


def emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def host_ms(fn, reps: int = 7) -> float:
    """Median host time to issue one call, the GPU idle before it (synchronize, time the call, synchronize)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


def end_to_end(
    arch: str,
    variants: list[str],
    out,
    hf_modes: list[str],
    deadline: float,
    smoke: bool = False,
) -> None:
    from dinov3_packing.apps.bench.suite import (
        ArchSystems,
        Timing,
        Workload,
        build_on_device,
        forward_flops,
        make_inputs,
        measure,
        mixed_sizes,
        peak_matmul_tflops,
    )
    from dinov3_packing.model.archs import arch_config
    from dinov3_packing.parallel.compile import compile_model, compile_stats
    from dinov3_packing.weights.load import random_packing_model

    dev, dt = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    config = arch_config(arch)
    if smoke:  # the code paths on the CPU in seconds (two layers, tiny images)
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    # fp32 reference weights drawn like `random:<arch>` (LayerScale U(0.05, 0.3): with Hugging Face's init,
    # LayerScale 1e-5, the blocks barely touch the output and the cosine check could not fail).
    base = random_packing_model(config, attn_backend="sdpa").to(dev).eval()
    peak = peak_matmul_tflops(dev, dt, 256 if smoke else 8192)
    emit(out, {"part": "peak", **{k: v for k, v in peak.items() if not isinstance(v, list)}})
    wls = [
        Workload("mixed-64", tuple(mixed_sizes(4 if smoke else 64, *((1, 4) if smoke else (14, 48))))),
        Workload("uniform-64x224", ((32 if smoke else 224,) * 2,) * (2 if smoke else 64)),
        Workload("uniform-32x512", ((64 if smoke else 512,) * 2,) * (2 if smoke else 32)),
    ]
    inputs = {wl.name: make_inputs(wl, config.patch_size, dev, dt) for wl in wls}
    flops = {wl.name: forward_flops(config, wl.segments(config.patch_size)) for wl in wls}
    timing = Timing(target_s=0.01, min_repeats=1, max_repeats=2) if smoke else Timing(1.0, 5, 40)
    mixed = inputs["mixed-64"]
    with torch.no_grad():
        ref = base(mixed.hidden_states.float(), mixed.grid_thw).last_hidden_state

    def rate_row(row, wl, m):
        row.update(
            {
                "median_ms": m["median_s"] * 1e3,
                "min_ms": m["min_s"] * 1e3,
                "img_s": len(wl.sizes) / m["median_s"],
                "tflops": flops[wl.name] / m["median_s"] / 1e12,
                "mfu": flops[wl.name] / m["median_s"] / 1e12 / peak["tflops"],
                "first_call_s": m["first_call_s"],
                "repeats": m["repeats"],
                "times_ms": [round(t * 1e3, 3) for t in m["times_s"]],
            }
        )

    if hf_modes:
        systems = ArchSystems(arch, base.cpu(), dev, dt)
        for mode in hf_modes:
            # Static shapes (each uniform batch its own graph), HF's best case; with "reduce-overhead" CUDA graphs.
            hf_c = torch.compile(systems.hf, dynamic=False, mode=None if mode == "default" else mode)
            for wl in wls[1:]:
                x = inputs[wl.name]
                row = {"part": "e2e", "arch": arch, "workload": wl.name, "variant": f"hf-compiled/{mode}"}
                with torch.no_grad():
                    rate_row(row, wl, measure(lambda x=x, f=hf_c: f(pixel_values=x.batch), dev, timing, compiled=True))
                    row["host_ms"] = host_ms(lambda x=x, f=hf_c: f(pixel_values=x.batch))
                emit(out, row)
            del hf_c
            torch.compiler.reset()
        fn, _ = systems.runner("hf-loop", mixed)
        row = {"part": "e2e", "arch": arch, "workload": "mixed-64", "variant": "hf-loop"}
        with torch.no_grad():
            rate_row(row, wls[0], measure(fn, dev, Timing(target_s=2.0, min_repeats=3, max_repeats=5)))
        emit(out, row)
        del systems
        base = base.to(dev)

    for variant in variants:
        if time.time() > deadline:
            emit(out, {"part": "e2e", "variant": variant, "skipped": "time budget"})
            continue
        fused, mode = variant.split("/")
        model = build_on_device(config, dev, dt)
        model.load_state_dict(base.state_dict())
        model.fused_mlp = fused == "1"
        compile_model(model, mode=None if mode == "default" else mode)
        graphs0 = compile_stats()["unique_graphs"]
        t0 = time.time()
        for wl in wls:
            row = {"part": "e2e", "arch": arch, "workload": wl.name, "variant": variant}
            x = inputs[wl.name]
            try:
                with torch.no_grad():
                    m = measure(lambda x=x, f=model: f(x.hidden_states, x.grid_thw), dev, timing, compiled=True)
                    rate_row(row, wl, m)
                    row["host_ms"] = host_ms(lambda x=x, f=model: f(x.hidden_states, x.grid_thw))
                    if wl.name == "mixed-64":
                        got = model(x.hidden_states, x.grid_thw).last_hidden_state.float()
                        row["min_cos_vs_fp32"] = float(F.cosine_similarity(got, ref, dim=-1).min())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row["graphs_compiled"] = compile_stats()["unique_graphs"] - graphs0
            if model.fused_mlp:
                from dinov3_packing.ops.triton import linear_gelu

                row["linear_gelu_config"] = str(getattr(linear_gelu._tma_autotuned, "best_config", None))
            row["variant_wall_s"] = time.time() - t0
            emit(out, row)
        del model
        torch.compiler.reset()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines, appended")
    ap.add_argument("--arch", default="vitl16")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=DEFAULT_VARIANTS,
        help="fused_mlp (0/1) / torch.compile mode",
    )
    ap.add_argument(
        "--hf-modes", nargs="*", default=["default"], help="torch.compile modes of the HF baseline (none: skip HF)"
    )
    ap.add_argument("--budget", type=float, default=540, help="seconds; later variants are skipped past it")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, two layers, tiny images: checks the code paths")
    args = ap.parse_args()
    deadline = time.time() + args.budget
    emit(
        args.out,
        {
            "part": "meta",
            "device": "cpu" if args.smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cmd": "python benchmarks/fastpath_variants.py",
            "variants": args.variants,
        },
    )
    end_to_end(args.arch, args.variants, args.out, args.hf_modes, deadline, args.smoke)


if __name__ == "__main__":
    main()
