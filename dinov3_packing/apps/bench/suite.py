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
                     Triton varlen kernel, see attention.AUTO_TRITON_INFERENCE)
    packed-compiled  the same through `compile.compile_model` (compilation happens in the warm-up)
    hf-loop          Hugging Face `DINOv3ViTModel` (sdpa), one image per call (mixed sizes)
    hf-batched       Hugging Face, one `[B, 3, H, W]` call (uniform sizes)
    hf-compiled      Hugging Face under `torch.compile` (static shapes), one call (uniform sizes)
    timm-naflex      timm NaFlexViT built from the DINOv3 Eva config: mixed sizes padded to the longest
                     image with a patch-valid mask; uniform sizes as a plain `[B, 3, H, W]` batch

Timing: a warm-up call (two when fast; compiled systems always get one after compiling), then repeats
until about `target_s` of timed work (at least 3), each timed with CUDA events recorded around the call
(no host sync inside the timed region, one synchronize at the end); the median is reported. Peak memory
is `torch.cuda.max_memory_allocated` after a reset, over the timed repeats; `fwd_mem_gib` is that peak
minus what was allocated before (the forward's own activations and workspace, other resident models
excluded).

`--smoke` runs every code path on the CPU in seconds (tiny workloads, fp32, no compilation); the tests
run it so the suite never rots.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig

from ...model.archs import ARCHS, arch_config
from ...model.modeling import DINOv3ViTPackingModel
from ...packing import patchify
from ...weights.load import load_packing_model, random_packing_model, reference_model
from .options import DEFAULT_OUT, SECTIONS, SMOKE_OUT, Options

BASELINES = ("hf-loop", "hf-batched", "hf-compiled", "timm-naflex")
SMOKE_LAYERS = 2  # --smoke runs vits16 with this many blocks
SCALING_TOKENS = (4096, 8192, 16384, 32768, 65536, 131072)
# The HF loop costs the same per image at any pack size, and it is the slowest system by far: measure it
# on the smaller packs only.
HF_LOOP_MAX_TOKENS = 32768
MIN_COSINE = 0.999  # issue 3: bf16 packed vs fp32 Hugging Face on mixed-64
# Budget estimates (seconds, H100) for the items that are worth refusing up front rather than overrunning.
SWEEP_ESTIMATE_S = {"vits16": 40, "vitb16": 40, "vitl16": 60, "vith16plus": 60, "vit7b16": 90}
TIMM_MODELS = {
    "vits16": "vit_small_patch16_dinov3_qkvb",
    "vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "vitb16": "vit_base_patch16_dinov3_qkvb",
    "vitl16": "vit_large_patch16_dinov3_qkvb",
    "vith16plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "vit7b16": "vit_7b_patch16_dinov3",
}

FLOPS_DEFINITION = (
    "forward FLOPs = sum over segments of [2 * N_block * n + 2 * N_patch * hw + 4 * n^2 * D * L], "
    "n = tokens of the segment incl. CLS and registers, hw = its patch tokens, N_block = weights of every "
    "Linear in the blocks (q, k, v, o, MLP), N_patch = patch-embedding weights (D * p*p*C), D = width, "
    "L = layers; matmul FLOPs only (norms, biases, RoPE, softmax not counted); padding never counts"
)


# ---------------------------------------------------------------------------------------------------------
# Workloads and FLOPs


@dataclass(frozen=True)
class Workload:
    """A set of images, as pixel sizes `(H, W)`, run through every system as one batch."""

    name: str
    sizes: tuple[tuple[int, int], ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1

    def segments(self, patch_size: int) -> list[tuple[int, int]]:
        return [(h // patch_size, w // patch_size) for h, w in self.sizes]

    def tokens(self, config: DINOv3ViTConfig) -> int:
        prefix = 1 + config.num_register_tokens
        return sum(prefix + h * w for h, w in self.segments(config.patch_size))

    def describe(self, config: DINOv3ViTConfig) -> dict:
        segments = self.segments(config.patch_size)
        return {
            "images": len(self.sizes),
            "tokens": self.tokens(config),
            "patches": sum(h * w for h, w in segments),
            "max_seqlen": 1 + config.num_register_tokens + max(h * w for h, w in segments),
            "tflop": forward_flops(config, segments) / 1e12,
        }


def mixed_sizes(n: int, lo: int = 14, hi: int = 48, seed: int = 0, patch_size: int = 16) -> list[tuple[int, int]]:
    """The issue's mixed-size stream: `rng = random.Random(seed)`, then for each image in turn
    `(16 * rng.randint(lo, hi), 16 * rng.randint(lo, hi))` pixels (height, width)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not cryptography
    return [(patch_size * rng.randint(lo, hi), patch_size * rng.randint(lo, hi)) for _ in range(n)]


def pack_of_tokens(target: int, config: DINOv3ViTConfig, lo: int = 14, hi: int = 48) -> Workload:
    """The longest prefix of the mixed-size stream whose tokens (prefix included) stay within `target`
    (at least one image), so every pack is drawn from the mixed-64 distribution."""
    prefix, p = 1 + config.num_register_tokens, config.patch_size
    stream = mixed_sizes(4 * target // (prefix + lo * lo) + 1, lo, hi, patch_size=p)
    sizes, total = [], 0
    for h, w in stream:
        n = prefix + (h // p) * (w // p)
        if sizes and total + n > target:
            break
        sizes.append((h, w))
        total += n
    return Workload(f"pack-{target // 1024}k" if target >= 1024 else f"pack-{target}", tuple(sizes))


def workloads(config: DINOv3ViTConfig, smoke: bool) -> dict[str, list[Workload]]:
    """The workloads of each section; `smoke` gives tiny ones of the same shapes."""
    if smoke:
        return {
            "mixed": [Workload("mixed-6", tuple(mixed_sizes(6, 1, 4)))],
            "uniform": [Workload("uniform-4x32", ((32, 32),) * 4), Workload("uniform-2x64", ((64, 64),) * 2)],
            "scaling": [pack_of_tokens(t, config, 1, 4) for t in (64, 128)],
        }
    return {
        "mixed": [Workload("mixed-64", tuple(mixed_sizes(64)))],
        "uniform": [Workload("uniform-64x224", ((224, 224),) * 64), Workload("uniform-32x512", ((512, 512),) * 32)],
        "scaling": [pack_of_tokens(t, config) for t in SCALING_TOKENS],
    }


def matmul_params(config: DINOv3ViTConfig) -> tuple[int, int]:
    """`(N_block, N_patch)`: weights of all Linear layers in the blocks, and of the patch embedding."""
    d, i = config.hidden_size, config.intermediate_size
    mlp = (3 if config.use_gated_mlp else 2) * d * i
    n_block = config.num_hidden_layers * (4 * d * d + mlp)
    n_patch = d * config.patch_size**2 * config.num_channels
    return n_block, n_patch


def forward_flops(config: DINOv3ViTConfig, segments: Sequence[tuple[int, int]]) -> float:
    """Useful forward FLOPs of a packed batch, computed from the config alone (no model needed).

    forward FLOPs = sum over segments of [2 * N_block * n + 2 * N_patch * h*w + 4 * n^2 * D * L], where
    n = h*w + 1 + registers is the segment's token count, N_block the weights of every Linear in the blocks
    (q, k, v, o and the MLP's two or three), N_patch = D * p*p*C the patch embedding (applied to patch tokens
    only), D the width and L the layers; 4 * n^2 * D per layer is q k^T plus attn v. Biases, norms, RoPE
    and softmax are not counted. Padding is never counted, so a padded system's MFU is its useful MFU.
    ViT-L/16 on mixed-64 gives 43.31 TFLOP (the issue's 43.3).

    Args:
        config: the model's `DINOv3ViTConfig`.
        segments: `(h, w)` in patches of every segment (frame).
    """
    n_block, n_patch = matmul_params(config)
    prefix, d, layers = 1 + config.num_register_tokens, config.hidden_size, config.num_hidden_layers
    total = 0
    for h, w in segments:
        n = prefix + h * w
        total += 2 * n_block * n + 2 * n_patch * h * w + 4 * n * n * d * layers
    return float(total)


# ---------------------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    target_s: float = 0.5  # timed work per (workload, system)
    min_repeats: int = 3
    max_repeats: int = 20


def time_calls(fn: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Seconds taken by each of `n` back-to-back calls of `fn`.

    On CUDA each call sits between two recorded events and the host synchronizes once, after the last:
    an interval covers the call's GPU work and any host time that left the GPU idle.
    """
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(fn: Callable[[], object], device: torch.device, timing: Timing, compiled: bool = False) -> dict:
    """Warm `fn` up, then time repeats of it; returns the timings and the forward's peak memory."""
    first = time_calls(fn, 1, device)[0]  # includes compilation for compiled systems
    estimate = first
    if compiled or first < timing.target_s:
        estimate = time_calls(fn, 1, device)[0]
    repeats = max(timing.min_repeats, min(timing.max_repeats, math.ceil(timing.target_s / max(estimate, 1e-6))))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = time_calls(fn, repeats, device)
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
        "times_s": times,
        "first_call_s": first,
        "peak_alloc_gib": None,
        "fwd_mem_gib": None,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out["peak_alloc_gib"] = peak / 2**30
        out["fwd_mem_gib"] = (peak - before) / 2**30
    return out


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> dict:
    """Measured matmul peak: median over `repeats` `[n, n] @ [n, n]` products of random data, after warm-up."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    time_calls(lambda: torch.mm(a, b, out=c), 5, device)
    times = time_calls(lambda: torch.mm(a, b, out=c), repeats, device)
    median = statistics.median(times)
    return {
        "tflops": 2 * n**3 / median / 1e12,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "median_s": median,
    }


# ---------------------------------------------------------------------------------------------------------
# Inputs and systems


@dataclass
class Inputs:
    """One workload's inputs for every system, already on the device."""

    images: list[torch.Tensor]  # [1, C, H, W] each (HF loop)
    batch: torch.Tensor | None  # [B, C, H, W], uniform workloads only
    hidden_states: torch.Tensor  # [total_patches, p*p*C] (packed)
    grid_thw: torch.Tensor  # [B, 3] int64 on the CPU (host-side metadata)
    naflex: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # padded patches, coords, valid mask


def make_inputs(wl: Workload, patch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random normalized pixels for `wl`, in every layout the systems take, built outside any timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = [torch.randn(1, 3, h, w, device=device, generator=g).to(dtype) for h, w in wl.sizes]
    hidden_states = torch.cat([patchify(img[0], patch_size) for img in images])
    segments = wl.segments(patch_size)
    grid_thw = torch.tensor([(1, h, w) for h, w in segments], dtype=torch.long)
    if wl.uniform:
        return Inputs(images, torch.cat(images), hidden_states, grid_thw, None)
    # Pad to the longest image with a validity mask, as timm's NaFlex collator does.
    longest = max(h * w for h, w in segments)
    patches = hidden_states.new_zeros(len(segments), longest, hidden_states.shape[1])
    coords = torch.zeros(len(segments), longest, 2, dtype=torch.long, device=device)
    valid = torch.zeros(len(segments), longest, dtype=torch.bool, device=device)
    rows = hidden_states.split([h * w for h, w in segments])
    for i, ((h, w), r) in enumerate(zip(segments, rows, strict=True)):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        patches[i, : h * w] = r
        coords[i, : h * w] = torch.stack([ys.flatten(), xs.flatten()], -1)
        valid[i, : h * w] = True
    return Inputs(images, None, hidden_states, grid_thw, (patches, coords, valid))


def has_timm() -> bool:
    return importlib.util.find_spec("timm") is not None


def build_timm_naflex(arch: str, depth: int) -> torch.nn.Module:
    """timm's NaFlexViT with the DINOv3 architecture `arch` (Eva DINOv3 config, `use_naflex=True`: RoPE
    'dinov3', 4 registers, layer scale; CLS pooling, no head) and `depth` blocks, random weights, on the CPU."""
    import timm

    return timm.create_model(
        TIMM_MODELS[arch], pretrained=False, use_naflex=True, num_classes=0, global_pool="token", depth=depth
    )


def build_on_device(config: DINOv3ViTConfig, device: torch.device, dtype: torch.dtype) -> DINOv3ViTPackingModel:
    """Random weights of a released architecture, initialised directly on `device` by Hugging Face's own
    init, then cast: building vit7b16 on the CPU in fp32 would take minutes and 27 GB of host memory.
    Speed does not depend on the values (ViT-L mixed-64 on one H100: 92.94 ms with this init, 92.86 ms with
    `random:vitl16`, benchmarks/results/init_speed_h100.jsonl)."""
    with torch.device(device):
        model = DINOv3ViTPackingModel(config)
    return model.to(dtype=dtype).eval()


class ArchSystems:
    """Every system of one architecture, built on first use from one fp32 CPU model (same weights)."""

    def __init__(self, arch: str, base: DINOv3ViTPackingModel, device: torch.device, dtype: torch.dtype):
        self.arch, self.base, self.device, self.dtype = arch, base, device, dtype
        self.failed: set[str] = set()

    @cached_property
    def packed(self) -> DINOv3ViTPackingModel:
        return copy.deepcopy(self.base).to(self.device, self.dtype).eval()

    @cached_property
    def packed_compiled(self) -> DINOv3ViTPackingModel:
        from ...parallel.compile import compile_model

        return compile_model(copy.deepcopy(self.base).to(self.device, self.dtype).eval())

    @cached_property
    def hf(self) -> torch.nn.Module:
        ref = reference_model(self.base).to(self.device, self.dtype).eval()
        if ref.config._attn_implementation != "sdpa":
            ref.set_attn_implementation("sdpa")
        return ref

    @cached_property
    def hf_compiled(self) -> Callable:
        # Static shapes: each uniform workload gets its own graph, HF's best case.
        return torch.compile(self.hf, dynamic=False)

    @cached_property
    def timm(self) -> torch.nn.Module:
        depth = self.base.config.num_hidden_layers
        return build_timm_naflex(self.arch, depth).to(self.device, self.dtype).eval()

    def runner(self, system: str, x: Inputs) -> tuple[Callable[[], object], dict] | None:
        """`(call, details)` running `system` on `x`, or None where the system does not apply."""
        if system in ("packed", "packed-compiled"):
            model = self.packed if system == "packed" else self.packed_compiled
            backend = model.resolved_attn_backend(inference=True)
            return (lambda: model(x.hidden_states, x.grid_thw)), {"attn_backend": backend, "fused_mlp": model.fused_mlp}
        if system == "hf-loop":
            if x.batch is not None:
                return None
            hf = self.hf

            def loop():
                for img in x.images:
                    hf(pixel_values=img)

            return loop, {"attn": hf.config._attn_implementation}
        if system in ("hf-batched", "hf-compiled"):
            if x.batch is None:
                return None
            hf = self.hf if system == "hf-batched" else self.hf_compiled
            return (lambda: hf(pixel_values=x.batch)), {"attn": self.hf.config._attn_implementation}
        if system == "timm-naflex":
            m = self.timm
            details = {"timm_model": TIMM_MODELS[self.arch], "params": sum(p.numel() for p in m.parameters())}
            if x.naflex is None:
                return (lambda: m.forward_features(x.batch)), {**details, "input": "[B, 3, H, W] batch, no mask"}
            patches, coords, valid = x.naflex
            call = lambda: m.forward_features(patches, patch_coord=coords, patch_valid=valid)  # noqa: E731
            return call, {**details, "input": f"padded to {patches.shape[1]} patches + mask"}
        raise ValueError(f"system: unknown {system!r}")


# ---------------------------------------------------------------------------------------------------------
# The run


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
        return {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(self.device),
            "card": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30
            if self.device.type == "cuda"
            else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "smoke": self.opts.smoke,
            "smoke_layers": SMOKE_LAYERS if self.opts.smoke else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": _version("transformers"),
            "timm": _version("timm"),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "source_sha256": source_digest(),
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
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=1) + "\n")
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
        systems = ["packed", "packed-compiled", "hf-loop", "hf-batched", "hf-compiled", "timm-naflex"]
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
        graphs_before = _graph_count() if compiled else 0

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
                row["graphs_compiled"] = _graph_count() - graphs_before
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
            from ...parallel.compile import compile_model

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


def _graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest() -> str:
    """sha256 over the package's Python sources (path and bytes, sorted by path): identifies the code
    measured even where the checkout's git metadata is stale or the tree has uncommitted changes."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


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
