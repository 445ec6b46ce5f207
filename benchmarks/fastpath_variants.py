"""Measure the fast-path options against each other and against compiled HF, in one run on one GPU.

    PYTHONPATH=. python benchmarks/fastpath_variants.py --out $OUT/variants.jsonl

Two parts, each row appended to `--out` as one JSON line the moment it is measured (a cut-off run keeps
what it measured):

1. Kernels (ViT-L heads, 16 x 64, bf16; mixed-64 and uniform segment lengths): the Triton varlen kernel
   with RoPE applied before it (`rope=none`, plus the elementwise RoPE pass on q and k that it needs),
   with q rotated inside it (`rope=q`, plus the pass on k alone) and with q and k rotated inside it
   (`rope=qk`, no pass); each checked against fp32 SDPA per segment on the same inputs rotated in fp32.
2. End to end (`random:<arch>`, bf16, `compile_model`): each variant `rope/fused_mlp/compile-mode`
   on mixed-64, uniform 64 x 224 and 32 x 512, with HF `DINOv3ViTModel` under torch.compile on the
   uniform batches as the baseline, the min token cosine of each variant's mixed-64 output against the
   fp32 packed model (sdpa), and the number of graphs each variant compiled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 16, 64
DEFAULT_VARIANTS = [
    "none/0/default",
    "qk/0/default",
    "qk/1/default",
    "q/1/default",
    "qk/1/reduce-overhead",
    "none/1/default",
    "q/0/default",
    "none/0/reduce-overhead",
]


def emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def rope_tables(total: int, cu: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-style tables `[T, D]` (halves repeat; sin carries rotate_half's sign), prefix rows unrotated."""
    ang = torch.rand(total, HEAD_DIM // 2, device="cuda", generator=g) * 6.28
    for s in cu[:-1]:
        ang[s : s + 5] = 0
    ang = ang.tile(2)
    sin = ang.sin()
    sin = torch.cat([-sin[:, : HEAD_DIM // 2], sin[:, HEAD_DIM // 2 :]], 1)
    return ang.cos().bfloat16(), sin.bfloat16()


def kernels(name: str, lens: list[int], out) -> None:
    from triton.testing import do_bench

    from dinov3_packing.attention import apply_rope
    from dinov3_packing.kernels import varlen_attention as tva

    g = torch.Generator(device="cuda").manual_seed(0)
    cu_list = [0, *itertools.accumulate(lens)]
    cu = torch.tensor(cu_list, dtype=torch.int32, device="cuda")
    total = cu_list[-1]
    flops = sum(4 * n * n * HEADS * HEAD_DIM for n in lens)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    cos, sin = rope_tables(total, cu_list, g)
    half = HEAD_DIM // 2
    ch, sh = cos[:, :half], sin[:, half:]
    rope_qk = torch.compile(lambda x: apply_rope(x[:, :2], cos, sin), dynamic=False)
    rope_k = torch.compile(lambda x: apply_rope(x[:, 1], cos, sin), dynamic=False)
    # fp32 reference: rotate the bf16 inputs in fp32, then SDPA per segment.
    qkv32 = qkv.float()
    qk32 = apply_rope(qkv32[:, :2], cos.float(), sin.float())
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (qk32[:, 0], qk32[:, 1], qkv32[:, 2])))
            .transpose(0, 1)
            for s, e in itertools.pairwise(cu_list)
        ]
    )
    qk_rot = rope_qk(qkv)
    k_rot = rope_k(qkv)
    q, k, v = qkv.unbind(1)
    cases = {
        "rope pass q,k (elementwise)": (lambda: rope_qk(qkv), False),
        "rope pass k (elementwise)": (lambda: rope_k(qkv), False),
        "kernel rope=none": (lambda: tva.launch(qk_rot[:, 0], qk_rot[:, 1], v, cu), True),
        "kernel rope=q": (lambda: tva.launch(q, k_rot, v, cu, cos=ch, sin=sh), True),
        "kernel rope=qk": (lambda: tva.launch(q, k, v, cu, cos=ch, sin=sh, rope_k=True), True),
    }
    for label, (fn, check) in cases.items():
        row = {"part": "kernel", "workload": name, "tokens": total, "segments": len(lens), "case": label}
        try:
            res = fn()
            ms = do_bench(fn, return_mode="median")
            row["ms"] = ms
            if check:
                row["tflops"] = flops / ms / 1e9
                row["rel_err_vs_fp32"] = float((res.float() - ref).abs().max() / ref.abs().max())
                row["config"] = str(getattr(tva._varlen_fwd_tuned, "best_config", None))
        except Exception as e:  # one failing case must not end the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        emit(out, row)


def end_to_end(arch: str, variants: list[str], out, hf_baseline: bool, deadline: float, smoke: bool = False) -> None:
    from dinov3_packing import attention
    from dinov3_packing.archs import arch_config
    from dinov3_packing.bench import (
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
    from dinov3_packing.compile import compile_model, compile_stats

    dev, dt = (torch.device("cpu"), torch.float32) if smoke else (torch.device("cuda"), torch.bfloat16)
    config = arch_config(arch)
    if smoke:  # the code paths on the CPU in seconds (two layers, tiny images)
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    with torch.device(dev):
        from dinov3_packing.modeling import DINOv3ViTPackingModel

        base = DINOv3ViTPackingModel(config, attn_backend="sdpa").eval()  # fp32 reference weights, on the GPU
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
            }
        )

    if hf_baseline:
        systems = ArchSystems(arch, base.cpu(), dev, dt)
        for wl in wls[1:]:
            fn, _ = systems.runner("hf-compiled", inputs[wl.name])
            row = {"part": "e2e", "arch": arch, "workload": wl.name, "variant": "hf-compiled"}
            with torch.no_grad():
                rate_row(row, wl, measure(fn, dev, timing, compiled=True))
            emit(out, row)
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
        rope, fused, mode = variant.split("/")
        attention.TRITON_ROPE = rope
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
                    m = measure(lambda x=x: model(x.hidden_states, x.grid_thw), dev, timing, compiled=True)
                    rate_row(row, wl, m)
                    if wl.name == "mixed-64":
                        got = model(x.hidden_states, x.grid_thw).last_hidden_state.float()
                        row["min_cos_vs_fp32"] = float(F.cosine_similarity(got, ref, dim=-1).min())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row["graphs_compiled"] = compile_stats()["unique_graphs"] - graphs0
            row["variant_wall_s"] = time.time() - t0
            emit(out, row)
        del model
        torch.compiler.reset()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines, appended")
    ap.add_argument("--arch", default="vitl16")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="rope/fused_mlp/compile-mode")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baselines")
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
    if not args.no_kernels and not args.smoke:
        rng = random.Random(0)
        mixed = [5 + rng.randint(14, 48) * rng.randint(14, 48) for _ in range(64)]
        for name, lens in [("mixed-64", mixed), ("uniform-64x201", [201] * 64), ("uniform-32x1029", [1029] * 32)]:
            kernels(name, lens, args.out)
    end_to_end(args.arch, args.variants, args.out, not args.no_hf, deadline, args.smoke)


if __name__ == "__main__":
    main()
