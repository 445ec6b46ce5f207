"""Benchmark suite: packed DINOv3 against the Hugging Face loop, batched and compiled HF, and timm NaFlexViT.

One run measures, on one GPU and in this order (a time budget skips the tail, with a printed note):
    1. peak       the card's bf16 matmul throughput (8192^3, median of 20), the denominator of every MFU;
    2. correctness  bf16 packed output on mixed-64 against Hugging Face fp32 run image by image
                  (min token cosine, max relative diff), and fp32 packed against the same reference;
    3. mixed      `mixed-64` (the issue's 64 mixed sizes) through every system;
    4. uniform    `uniform-64x224` and `uniform-32x512`;
    5. scaling    packs of ~4k..128k tokens drawn from the mixed size distribution (throughput and
                  forward memory against tokens per pack: memory must grow linearly);
    6. archs      (with `--archs-sweep`) packed eager and compiled on mixed-64 for ViT-S/B/L/H+/7B.

Systems, each given inputs already on the device (pixel tensors, packed rows; the packed model's host-side
`grid_thw` stays on the CPU, where the model reads it without a device sync):
    packed           `DINOv3ViTPackingModel`, eager, attention backend "auto" (on CUDA bf16 inference: the
                     Triton varlen kernel, as `ops.attention` chooses it)
    packed-compiled  the same through `parallel.compile.compile_model` (compilation happens in the warm-up)
    hf-loop          Hugging Face `DINOv3ViTModel` (sdpa), one image per call (mixed sizes)
    hf-batched       Hugging Face, one `[B, 3, H, W]` call (uniform sizes)
    hf-compiled      Hugging Face under `torch.compile` (static shapes), one call (uniform sizes)
    timm-naflex      timm NaFlexViT built from the DINOv3 Eva config: mixed sizes padded to the longest
                     image with a patch-valid mask; uniform sizes as a plain `[B, 3, H, W]` batch

Workloads and FLOPs are defined in `workloads`, the systems in `systems`, timing and the run's metadata
in `timing` (`timing.measure`: warm-up, then repeats timed with CUDA events; the median is reported,
with the forward's own peak memory). This module runs the sections and writes the report.

`--smoke` runs every code path on the CPU in seconds (tiny workloads, fp32, no compilation); the tests
run it so the suite never rots.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig

from ...model.archs import ARCHS, arch_config
from ...model.modeling import DINOv3ViTPackingModel
from ...parallel.compile import compile_model, compile_stats
from ...weights.load import load_packing_model, random_packing_model, reference_model
from .options import DEFAULT_OUT, SECTIONS, SMOKE_OUT, Options
from .systems import BASELINES, SYSTEMS, ArchSystems, build_on_device, has_timm
from .timing import Timing, measure, peak_matmul_tflops, run_metadata, write_report
from .workloads import FLOPS_DEFINITION, Workload, make_inputs, mixed_sizes, workloads

SMOKE_LAYERS = 2  # --smoke runs vits16 with this many blocks
# The HF loop costs the same per image at any pack size, and it is the slowest system by far: measure it
# on the smaller packs only.
HF_LOOP_MAX_TOKENS = 32768
MIN_COSINE = 0.999  # issue 3: bf16 packed vs fp32 Hugging Face on mixed-64
# Budget estimates (seconds, H100) for the items that are worth refusing up front rather than overrunning.
SWEEP_ESTIMATE_S = {"vits16": 40, "vitb16": 40, "vitl16": 60, "vith16plus": 60, "vit7b16": 90}


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


class Run:
    """State of one benchmark run: options, device, budget and the report written as it grows."""

    def __init__(self, opts: Options):
        self.opts = opts
        if opts.smoke:
            self.device, self.dtype = torch.device("cpu"), torch.float32
            self.timing = Timing(target_s=0.0, min_repeats=1, max_repeats=1)
        else:
            if not torch.cuda.is_available():
                raise ValueError("bench: no CUDA device; the full suite needs a GPU (use --smoke on the CPU)")
            self.device, self.dtype = torch.device("cuda"), torch.bfloat16
            self.timing = Timing()
        self.out = Path(opts.out or (SMOKE_OUT if opts.smoke else DEFAULT_OUT))
        self.budget = Budget(opts.time_budget)
        self.bases: dict[str, DINOv3ViTPackingModel] = {}
        self.report: dict = {
            "meta": self._meta(),
            "flops_definition": FLOPS_DEFINITION,
            "workload_definitions": {
                "mixed-64": Workload("mixed-64", tuple(mixed_sizes(64))).describe(arch_config("vitl16"))
                | {"arch": "vitl16"}
            },
            "peak": None,
            "correctness": [],
            "results": [],
            "notes": [],
        }

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _meta(self) -> dict:
        return run_metadata(self.device) | {
            "dtype": str(self.dtype).removeprefix("torch."),
            "smoke": self.opts.smoke,
            "smoke_layers": SMOKE_LAYERS if self.opts.smoke else None,
            "options": asdict(self.opts),
            "timing": asdict(self.timing),
        }

    def note(self, msg: str) -> None:
        if msg in self.report["notes"]:
            return
        print(f"NOTE: {msg}", flush=True)
        self.report["notes"].append(msg)

    def save(self) -> None:
        self.report["meta"]["elapsed_s"] = round(self.budget.elapsed(), 1)
        write_report(self.out, self.report)
        self.out.with_suffix(".md").write_text(format_report(self.report))

    def config(self, arch: str) -> DINOv3ViTConfig:
        config = arch_config(arch)
        if self.opts.smoke:
            config.num_hidden_layers = SMOKE_LAYERS
        return config

    def apply_fused_mlp(self, model: DINOv3ViTPackingModel) -> None:
        """The fused up-projection + GELU runs where it applies (plain GELU MLPs: ViT-S/B/L; the model's
        default); `--no-fused-mlp` turns it off everywhere."""
        model.fused_mlp = None if self.opts.fused_mlp else False

    def base(self, arch: str) -> DINOv3ViTPackingModel:
        """fp32 CPU model with `random:<arch>` weights, built once and shared by correctness and timing."""
        if arch not in self.bases:
            t0 = time.perf_counter()
            if self.opts.smoke:
                self.bases[arch] = random_packing_model(self.config(arch)).eval()
            else:
                self.bases[arch] = load_packing_model(f"random:{arch}", "cpu", torch.float32)
            self.apply_fused_mlp(self.bases[arch])
            print(f"built random:{arch} on the CPU in {time.perf_counter() - t0:.1f} s", flush=True)
        return self.bases[arch]

    def free(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # -- sections --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        sections = self.opts.sections
        print(f"bench: {self.report['meta']['card']}, {self.dtype}, sections {sections}", flush=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = False  # the fp32 reference's patch-embedding conv
            torch.backends.cuda.matmul.allow_tf32 = False
            # Several architectures and shapes compile in one process; the default limit (8) would fall back to eager.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)
        with torch.no_grad():
            if "peak" in sections:
                n = 8192 if self.device.type == "cuda" else 256
                self.report["peak"] = peak_matmul_tflops(self.device, self.dtype, n)
                print(f"peak matmul: {self.report['peak']['tflops']:.1f} TFLOP/s ({n}^3 {self.dtype})", flush=True)
                self.save()
            if "correctness" in sections:
                for arch in self.opts.correctness_archs:
                    self.guarded(f"correctness {arch}", lambda a=arch: self.correctness(a))
                    self.save()
            for arch in self.opts.archs:
                if not {"mixed", "uniform", "scaling"} & set(sections):
                    break
                # One set of models per architecture, shared by its sections (each compiles once).
                systems = ArchSystems(arch, self.base(arch), self.device, self.dtype)
                for section in ("mixed", "uniform", "scaling"):
                    if section in sections:
                        self.timed_section(section, systems)
                        self.save()
                del systems
                self.free()
            self.bases.clear()
            if self.opts.compile:
                torch._dynamo.reset()  # the sweep builds new models: drop every graph that holds the old ones
            self.free()
            if "archs" in sections:
                self.arch_sweep()
        self.save()
        print(format_report(self.report), flush=True)
        print(f"wrote {self.out} and {self.out.with_suffix('.md')} ({self.budget.elapsed():.0f} s)", flush=True)
        return self.report

    def guarded(self, what: str, fn: Callable[[], object]) -> str | None:
        """Run `fn`; on failure print a short traceback, free memory and return the error (the run goes on)."""
        try:
            fn()
            return None
        except Exception as e:  # a failing system must not end the run: record it and go on
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"ERROR in {what}: {err}", flush=True)
            print("".join(traceback.format_exc().splitlines(keepends=True)[-12:]), file=sys.stderr, flush=True)
            self.free()
            return err

    def correctness(self, arch: str) -> None:
        """bf16 packed (and fp32 packed) on the mixed workload against Hugging Face fp32, image by image."""
        base = self.base(arch)
        config = base.config
        wl = workloads(config, self.opts.smoke)["mixed"][0]
        x = make_inputs(wl, config.patch_size, self.device, torch.float32, self.opts.seed)
        prefix = 1 + config.num_register_tokens
        ref = reference_model(base).to(self.device)
        outs = [ref(pixel_values=img) for img in x.images]
        ref_patches = torch.cat([o.last_hidden_state[0, prefix:] for o in outs])
        ref_cls = torch.cat([o.pooler_output for o in outs])
        del ref, outs
        row = {"arch": arch, "workload": wl.name, "reference": "HF DINOv3ViTModel fp32 per image (sdpa)"}
        for label, dtype in (("fp32", torch.float32), ("packed", self.dtype)):
            model = copy.deepcopy(base).to(self.device, dtype)
            out = model(x.hidden_states.to(dtype), x.grid_thw)
            row[f"{label}_backend"] = model.resolved_attn_backend(inference=True)
            row[f"{label}_dtype"] = str(dtype).removeprefix("torch.")
            row |= {f"{label}_{k}": v for k, v in compare(out.last_hidden_state, ref_patches).items()}
            row[f"{label}_cls_min_cos"] = compare(out.pooler_output, ref_cls)["min_cos"]
            del model, out
        row["threshold"] = MIN_COSINE
        row["pass"] = row["packed_min_cos"] >= MIN_COSINE
        self.report["correctness"].append(row)
        print(
            f"correctness {arch} {wl.name}: {row['packed_dtype']} min cos {row['packed_min_cos']:.6f} "
            f"max rel {row['packed_max_rel']:.2e}; fp32 max rel {row['fp32_max_rel']:.2e} "
            f"({'PASS' if row['pass'] else 'FAIL'} at {MIN_COSINE})",
            flush=True,
        )

    def systems_for(self, section: str) -> list[str]:
        systems = list(SYSTEMS)
        if section == "scaling":
            systems.remove("hf-batched")
            systems.remove("hf-compiled")
        return [s for s in systems if self._enabled(s)]

    def _enabled(self, system: str) -> bool:
        if system.endswith("compiled") and not self.opts.compile:
            return False
        return not (system == "timm-naflex" and not (self.opts.timm and has_timm()))

    def timed_section(self, section: str, systems: ArchSystems) -> None:
        if not self.opts.compile:
            self.note(f"{section}: compiled systems skipped ({'--smoke' if self.opts.smoke else '--no-compile'})")
        if self.opts.timm and not has_timm():
            self.note(f"{section}: timm is not installed: timm-naflex skipped")
        for wl in workloads(systems.base.config, self.opts.smoke)[section]:
            self.guarded(f"{systems.arch} {wl.name}", lambda w=wl: self.run_workload(section, systems.arch, systems, w))

    def run_workload(self, section: str, arch: str, systems: ArchSystems, wl: Workload) -> None:
        config = systems.base.config
        desc = wl.describe(config)
        x = make_inputs(wl, config.patch_size, self.device, self.dtype, self.opts.seed)
        rows = []
        for system in self.systems_for(section):
            if system == "hf-loop" and section == "scaling" and desc["tokens"] > HF_LOOP_MAX_TOKENS:
                continue
            if system in systems.failed:
                self.note(f"{arch} {system}: skipped on {wl.name} after its earlier error")
                continue
            first_compile = system.endswith("compiled") and system.replace("-", "_") not in vars(systems)
            if not self.budget.allows(45 if first_compile else 0):
                self.note(f"time budget: skipped {arch} {wl.name} {system} at {self.budget.elapsed():.0f} s")
                continue
            row = self.measure_system(section, arch, systems, system, x, wl, desc)
            if row is not None:
                rows.append(row)
        add_ratios(rows)
        self.report["results"].extend(rows)
        del x
        self.free()

    def measure_system(self, section, arch, systems, system, x, wl, desc) -> dict | None:
        row = {"section": section, "arch": arch, "workload": wl.name, "system": system} | desc
        compiled = system.endswith("compiled")
        graphs_before = compile_stats()["unique_graphs"] if compiled else 0

        def go():
            got = systems.runner(system, x)
            if got is None:
                return
            call, details = got
            row.update(details)
            row.update(measure(call, self.device, self.timing, compiled=compiled))

        err = self.guarded(f"{arch} {wl.name} {system}", go)
        if err is None and "median_s" not in row:
            return None  # not applicable to this workload
        if err is not None:
            row["error"] = err
            # A compile failure would cost its compile time again on every later workload; an OOM recurs on
            # the larger packs that follow. Either way, stop trying this system for this architecture.
            systems.failed.add(system)
        else:
            self._rates(row)
            if compiled:
                row["graphs_compiled"] = compile_stats()["unique_graphs"] - graphs_before
        print(progress_line(row), flush=True)
        return row

    def _rates(self, row: dict) -> None:
        t = row["median_s"]
        row["images_per_s"] = row["images"] / t
        row["tokens_per_s"] = row["tokens"] / t
        row["tflops"] = row["tflop"] / t
        peak = self.report["peak"]
        row["mfu"] = row["tflops"] / peak["tflops"] if peak else None

    def arch_sweep(self) -> None:
        """Packed eager and compiled on the mixed workload for every released size, built on the device."""
        for arch in self.opts.sweep_archs:
            wl = workloads(self.config(arch), self.opts.smoke)["mixed"][0]
            wanted = ["packed", "packed-compiled"] if self.opts.compile else ["packed"]
            reused = [
                r
                for r in self.report["results"]
                if (r["section"], r["arch"], r["workload"]) == ("mixed", arch, wl.name)
                and r["system"] in wanted
                and "error" not in r
            ]
            # Same model, workload and systems as the mixed section: reuse rather than compile again.
            if len(reused) == len(wanted) and not self.opts.smoke:
                self.report["results"].extend({**r, "section": "archs", "reused_from": "mixed"} for r in reused)
                print(f"archs: {arch} reuses its mixed-section rows", flush=True)
                continue
            estimate = 0 if self.opts.smoke else SWEEP_ESTIMATE_S.get(arch, 60)
            if not self.budget.allows(estimate):
                self.note(
                    f"time budget: skipped archs sweep {arch} (needs ~{estimate} s, {self.budget.elapsed():.0f} s used)"
                )
                continue
            self.guarded(f"archs {arch}", lambda a=arch, w=wl: self.sweep_one(a, w))
            if self.opts.compile:
                torch._dynamo.reset()  # drop this arch's graphs before the next one compiles
            self.free()
            self.save()

    def sweep_one(self, arch: str, wl: Workload) -> None:
        t0 = time.perf_counter()
        model = build_on_device(self.config(arch), self.device, self.dtype)
        self.apply_fused_mlp(model)
        build_s = time.perf_counter() - t0
        print(f"archs: built {arch} on {self.device} in {build_s:.1f} s", flush=True)
        systems = ArchSystems(arch, model, self.device, self.dtype)
        systems.packed = model  # already on the device: no copy
        x = make_inputs(wl, model.config.patch_size, self.device, self.dtype, self.opts.seed)
        desc = wl.describe(model.config) | {"build_s": build_s}
        rows = [self.measure_system("archs", arch, systems, "packed", x, wl, desc)]
        if self.opts.compile:
            systems.packed_compiled = compile_model(model)  # in place: eager is done
            rows.append(self.measure_system("archs", arch, systems, "packed-compiled", x, wl, desc))
        self.report["results"].extend(r for r in rows if r is not None)


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-token cosine (min, mean) and max |got - ref| / max |ref|, in fp32."""
    g, r = got.float(), ref.float()
    cos = F.cosine_similarity(g, r, dim=-1)
    return {
        "min_cos": float(cos.min()),
        "mean_cos": float(cos.mean()),
        "max_rel": float((g - r).abs().max() / r.abs().max()),
    }


def add_ratios(rows: list[dict]) -> None:
    """`ratios[baseline]` = images/s of the row over images/s of that baseline in the same workload."""
    base = {r["system"]: r["images_per_s"] for r in rows if r.get("images_per_s") and r["system"] in BASELINES}
    for r in rows:
        if r.get("images_per_s"):
            r["ratios"] = {b: r["images_per_s"] / v for b, v in base.items()}


# ---------------------------------------------------------------------------------------------------------
# Output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def progress_line(r: dict) -> str:
    head = f"[{r['section']}] {r['arch']} {r['workload']:<15} {r['system']:<16}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (
        f"{head} {r['images_per_s']:9.1f} img/s {r['tokens_per_s']:11.0f} tok/s {r['tflops']:7.1f} TFLOP/s "
        f"MFU {_pct(r['mfu'])}  fwd mem {_fmt(r['fwd_mem_gib'], '.2f')} GiB  "
        f"({r['repeats']} x {1e3 * r['median_s']:.1f} ms)"
    )


def format_report(report: dict) -> str:
    """Markdown: run header, correctness table and one results table per section."""
    m = report["meta"]
    lines = [
        f"# dinov3-packing benchmark: {m['card']}",
        "",
        f"- command: `{m['command']}`",
        f"- date {m['date']}, {m['dtype']}, torch {m['torch']} (CUDA {m['cuda']}), transformers "
        f"{m['transformers']}, timm {m['timm']}, commit {m['git_commit']}, package sources sha256 "
        f"{str(m.get('source_sha256'))[:12]}, {m.get('elapsed_s', '?')} s",
    ]
    if report["peak"]:
        p = report["peak"]
        lines.append(
            f"- measured matmul peak: {p['tflops']:.1f} TFLOP/s ({p['n']}^3 {p['dtype']}, median of "
            f"{p['repeats']}); MFU = achieved / this"
        )
    lines.append(f"- FLOPs: {report['flops_definition']}")
    if report["correctness"]:
        lines += ["", "## Correctness (vs Hugging Face fp32, image by image)", ""]
        lines += [
            "| arch | workload | packed | min cos | mean cos | max rel | CLS min cos | fp32 packed max rel | pass |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in report["correctness"]:
            lines.append(
                f"| {c['arch']} | {c['workload']} | {c['packed_dtype']} ({c['packed_backend']}) | "
                f"{c['packed_min_cos']:.6f} | {c['packed_mean_cos']:.6f} | {c['packed_max_rel']:.2e} | "
                f"{c['packed_cls_min_cos']:.6f} | {c['fp32_max_rel']:.2e} | "
                f"{'yes' if c['pass'] else 'NO'} (>= {c['threshold']}) |"
            )
    cols = "| arch | workload | images | tokens | system | ms | img/s | tok/s | TFLOP/s | MFU | fwd mem GiB |"
    cols += "".join(f" x {b} |" for b in BASELINES)
    for section in ("mixed", "uniform", "scaling", "archs"):
        rows = [r for r in report["results"] if r["section"] == section]
        if not rows:
            continue
        lines += ["", f"## {section}", "", cols, "|---" * (11 + len(BASELINES)) + "|"]
        for r in rows:
            head = f"| {r['arch']} | {r['workload']} | {r['images']} | {r['tokens']} | {r['system']} |"
            if "error" in r:
                lines.append(f"{head} error: {r['error'].replace('|', '/')} |" + " |" * (5 + len(BASELINES)))
                continue
            ratios = r.get("ratios", {})
            lines.append(
                f"{head} {1e3 * r['median_s']:.1f} | {r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['tflops']:.1f} | {_pct(r['mfu'])} | {_fmt(r['fwd_mem_gib'], '.2f')} |"
                + "".join(f" {_fmt(ratios.get(b), '.2f')} |" for b in BASELINES)
            )
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# CLI


def run_benchmark(opts: Options) -> dict:
    """Run the suite with `opts`; prints the tables, writes the JSON (and a .md table beside it)."""
    for name in [*opts.archs, *opts.correctness_archs, *opts.sweep_archs]:
        if name not in ARCHS:
            raise ValueError(f"arch: unknown DINOv3 architecture {name!r}; expected one of {sorted(ARCHS)}")
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections: unknown {sorted(unknown)}; expected some of {list(SECTIONS)}")
    if not opts.smoke:
        return Run(opts).run()
    opts.compile = False
    # Tiny matmuls: threads only contend (on a loaded 2-core runner one thread is 30x faster than two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Run(opts).run()
    finally:
        torch.set_num_threads(threads)
