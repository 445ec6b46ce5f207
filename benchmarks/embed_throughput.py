"""End-to-end `embed` throughput against its stages, on the issue's data sets, with trustworthy stage figures.

Data sets (`--set`), built from the bundled photographs into `--data` (reused when already there):
    camera   (a) 2,000 camera-size JPEGs, 4032x3024 and 3024x4032 alternating, quality 90
    small    (b) 10,000 small JPEGs around 500x375 (either orientation, sides +-10%), quality 90
    shards   (c) set (b) as 10 WebDataset tar shards, read through `{000..009}.tar`
Each image is a random crop of a bundled photograph resized to its size, plus Gaussian grain (sigma 3
levels), so that files have a camera's entropy (a smooth upscale compresses several times better than a
photograph, and the entropy decoding is part of the cost). `--n` overrides the count (smoke runs).

How each figure is measured (images/s over the whole set; every stage sees the same files, warm page cache):
    decode   `embed`'s own decode side, no model: the same DataLoader (`job.decode_loader`: workers, units,
             chunks, uint8 pixels and pinning on CUDA) read through the same main-loop step
             (`job.decoded_chunks`: unpacking, and with `--decode gpu` the nvJPEG step on the side stream).
             One untimed pass first (page cache), then a fresh loader, as `embed` makes one, timed from the
             arrival of its first chunk to the device's last work (worker start-up left out as `embed`'s
             first packs are; the tail, where workers run out of units, kept as in `embed`). An earlier
             version timed a second pass of persistent workers from the iterator's restart, and fed it
             float32 rows: it read below `embed` end to end.
    embed    `embed()` end to end (decode, packing, copies, forwards, shards written). Timed from the host's
             return from a pack's forward call to embed's return, the pack being the first after which
             both `WARM_PACKS` packs and twice the loader's queue (workers x `job.prefetch_chunks()` x
             `job.DECODE_CHUNK` images) have gone through: worker start, model load, compilation and
             first-call kernel tuning fall in those first packs and are left out, with their images, and so
             are the images the workers decoded ahead while the model compiled (a full queue drains at the
             model's speed; counting it made the 2,000-image camera set read 492 img/s end to end against
             313 for decoding alone on the H200, 2026-12-01). (On CUDA the call returns once launched, so the
             rest of that pack's GPU work falls inside the interval while its images do not: the figure errs
             low, by at most one pack.) `embed_last_half` in the JSON: the rate over the last half of the
             packs only, as a check that the queue had drained.
    model    the compiled model alone on the SAME packs the embed run was timed on (their grids recorded at
             each forward, replayed in order, pixel rows of the same shapes already on the device), forwards
             only. The model is the embed run's own instance, warm; `timing.measure` then times whole
             passes over all packs (one more warm-up pass, the median of at least three).
`embed / model` is the share of the model's speed that `embed` reaches (the issue's target: >= 90%);
the bound is the one `embed` reports (`apps/embed/progress.py`: "model" only when the device was busy on
forwards >= 90% of the time, measured with CUDA events; else the largest of the main loop's decode and write
waits and its own work, "host"), printed with the device-busy share it rests on.

    python benchmarks/embed_throughput.py --set camera --ckpt random:vitl16 --max-tokens 1024
    python benchmarks/embed_throughput.py --set shards --ckpt random:vitl16 --decode gpu
    python benchmarks/embed_throughput.py --set shards --n 60 --ckpt random:vits16 --device cpu --max-tokens 64 \\
        --batch-tokens 512 --workers 1  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import gzip
import json
import os
import pstats
import random
import sys
import tarfile
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from dinov3_packing.apps.bench.timing import Timing, device_gaps, measure, run_metadata, write_report
from dinov3_packing.apps.embed import embed, job
from dinov3_packing.apps.embed.progress import Meter
from dinov3_packing.data.budget import segment_tokens
from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.data.gpu_decode import DECODE_CHOICES, GpuJpegDecoder, resolve_decode
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.data.sources import open_source, work_units
from dinov3_packing.model.archs import normalization_for
from dinov3_packing.parallel.compile import compile_stats
from dinov3_packing.weights.load import resolve_alias

SETS = {"camera": 2000, "small": 10000, "shards": 10000}
WARM_PACKS = 3
TRACE_PACKS = 4
TRACE_FROM = 30
SHARDS = 10


def make_photo(job_: tuple[int, str, str]) -> None:
    seed, folder, kind = job_
    r = random.Random(seed)
    photos = sample_image_paths()
    source = Image.open(photos[seed % len(photos)]).convert("RGB")
    if kind == "camera":
        w, h = (4032, 3024) if seed % 2 == 0 else (3024, 4032)
    else:
        w, h = round(500 * r.uniform(0.9, 1.1)), round(375 * r.uniform(0.9, 1.1))
        w, h = (w, h) if r.random() < 0.5 else (h, w)
    cw, ch = r.randint(source.width // 2, source.width), r.randint(source.height // 2, source.height)
    x, y = r.randint(0, source.width - cw), r.randint(0, source.height - ch)
    pixels = np.asarray(source.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels += grain_for(seed, h, w)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(f"{folder}/{seed:06d}.jpg", quality=90)


GRAIN_TILE = 1024
_grain: np.ndarray | None = None


def grain_for(seed: int, h: int, w: int) -> np.ndarray:
    """Gaussian grain (sigma 3 levels, rounded) of shape `[h, w, 3]`: a 1024 x 1024 tile drawn once per
    process, rolled by a per-image offset and repeated. Drawing 36 M normals for every 12 MP image took
    most of a camera image's build time; JPEG's 8 x 8 blocks cannot see the tile's period."""
    global _grain
    if _grain is None:
        tile = np.random.default_rng(0).normal(0, 3, (GRAIN_TILE, GRAIN_TILE, 3))
        _grain = np.rint(tile).astype(np.int16)
    r = np.random.default_rng(seed)
    tile = np.roll(_grain, (int(r.integers(GRAIN_TILE)), int(r.integers(GRAIN_TILE))), axis=(0, 1))
    reps = (-(-h // GRAIN_TILE), -(-w // GRAIN_TILE), 1)
    return np.tile(tile, reps)[:h, :w]


def build_set(name: str, n: int, root: Path, procs: int) -> str:
    """Make the data set under `root` (once; a `.done` marker says it is complete); returns the `src`."""
    kind = "camera" if name == "camera" else "small"
    folder = root / f"{kind}-{n}"
    if not (folder / ".done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with Pool(procs) as pool:
            pool.map(make_photo, [(i, str(folder), kind) for i in range(n)], chunksize=8)
        (folder / ".done").touch()
        print(f"made {n} {kind} JPEGs in {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    if name != "shards":
        return str(folder)
    shards = root / f"shards-{n}"
    if not (shards / ".done").exists():
        shards.mkdir(parents=True, exist_ok=True)
        files = sorted(folder.glob("*.jpg"))
        per = -(-len(files) // SHARDS)
        for s in range(SHARDS):
            with tarfile.open(shards / f"{s:03d}.tar", "w") as tar:
                for f in files[s * per : (s + 1) * per]:
                    tar.add(f, arcname=f.name)
        (shards / ".done").touch()
    return str(shards / f"{{000..{SHARDS - 1:03d}}}.tar")


def decode_pass(units, pre, device, workers, gpu, cpu_share=0.0) -> tuple[int, int, float]:
    """One pass of `embed`'s decode side over `units` on a fresh loader: (images, images after the first
    chunk, seconds from that chunk's arrival to the device's last decoding work)."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def side_stream():
        return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()

    loader = job.decode_loader(units, pre, device, workers, gpu=gpu is not None, cpu_share=cpu_share)
    images, first, start = 0, 0, None
    # As in embed: the model's device is current while the loader runs (its pin-memory thread pins for it).
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with current, torch.inference_mode():
        for chunk in job.decoded_chunks(loader, Meter(), gpu, pre, side_stream):
            images += len(chunk)
            if start is None:
                first, start = len(chunk), time.perf_counter()
    if side is not None:
        side.synchronize()
    return images, images - first, time.perf_counter() - start


def first_timed_pack(grids: list[torch.Tensor], workers: int) -> int:
    """The index of the first pack `embed` is timed from: after `WARM_PACKS` packs and twice the images
    the loader can hold decoded ahead (module docstring); len(grids) when there are not that many."""
    queue = max(1, workers) * job.prefetch_chunks() * job.DECODE_CHUNK
    seen = 0
    for i, grid in enumerate(grids):
        if i >= WARM_PACKS and seen >= 2 * queue:
            return i
        seen += len(grid)
    return len(grids)


class PackRecorder:
    """Wraps `job.load_checkpoint` for one `embed` call: keeps its model and, at each forward, the pack's
    `grid_thw` and the host time after the forward was launched."""

    def __init__(
        self,
        trace: str | None = None,
        trace_from: int = 0,
        trace_stack: bool = False,
        cprofile: cProfile.Profile | None = None,
    ):
        self.cprofile = cprofile  # enabled at pack `trace_from` (after compiling and recording), disabled at exit
        self.model, self.grids, self.times, self.calls, self.graphs = None, [], [], [], []
        self._load = job.load_checkpoint
        self.trace, self.trace_from, self.trace_stack, self._profiler = trace, trace_from, trace_stack, None
        self.traced, self._stopped = False, None  # whether packs ran under the profiler; the one to export
        self.gaps: dict | None = None  # `device_gaps` of the trace
        self.gc: dict[int, list[float]] = {}  # generation -> durations of its collections (s) during embed
        self._gc_start = 0.0

    def __enter__(self):
        def load(*args, **kwargs):
            loaded = self._load(*args, **kwargs)
            self.model = model = loaded.model
            forward = model.forward

            def recorded(hidden_states, grid_thw, *rest, **options):
                self._step_trace()
                called = time.perf_counter()
                out = forward(hidden_states, grid_thw, *rest, **options)
                self.grids.append(grid_thw.clone())
                self.times.append(time.perf_counter())
                self.calls.append(self.times[-1] - called)
                self.graphs.append(compile_stats()["unique_graphs"])
                return out

            model.forward = recorded
            return loaded

        job.load_checkpoint = load
        gc.callbacks.append(self._on_gc)
        return self

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc.setdefault(info["generation"], []).append(time.perf_counter() - self._gc_start)

    def _step_trace(self) -> None:
        """`--trace`: torch.profiler (CPU ops of every thread, CUDA kernels) over `TRACE_PACKS` packs from
        pack `trace_from` on, the chrome trace written to `trace`."""
        n = len(self.grids)
        if self.cprofile is not None and n == self.trace_from:
            self.cprofile.enable()
        if self.trace is None:
            return
        if n == self.trace_from:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, with_stack=self.trace_stack)
            self._profiler.start()
            self.traced = True
        elif n == self.trace_from + TRACE_PACKS and self._profiler is not None:
            self._stop_trace()

    def _stop_trace(self) -> None:
        profiler, self._profiler = self._profiler, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.stop()
        self._stopped = profiler  # written after the run (`__exit__`), outside embed's timed interval

    def __exit__(self, *exc):
        if self.cprofile is not None:
            self.cprofile.disable()
        gc.callbacks.remove(self._on_gc)
        if self._profiler is not None:
            self._stop_trace()
        if self._stopped is not None:
            Path(self.trace).parent.mkdir(parents=True, exist_ok=True)
            self._stopped.export_chrome_trace(self.trace)
            self._stopped = None
            opener = gzip.open if self.trace.endswith(".gz") else open
            with opener(self.trace, "rt") as f:
                self.gaps = device_gaps(json.load(f)["traceEvents"])
        job.load_checkpoint = self._load
        if self.model is not None:
            del self.model.forward  # the class's forward again: the model-only passes are not recorded


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="camera", help=f"data set(s), comma-separated, of {list(SETS)} (see above)")
    ap.add_argument("--n", type=int, default=None, help="images (default: the set's size)")
    ap.add_argument("--data", default=None, help="where the sets are built and kept (default: a temp folder)")
    ap.add_argument("--build-only", action="store_true", help="build the sets under --data and stop")
    ap.add_argument("--ckpt", default="random:vitl16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(job.DTYPES), default=None, help="default bfloat16 on CUDA, else float32")
    ap.add_argument("--decode", default="cpu", help=f"decoder(s), comma-separated, of {list(DECODE_CHOICES)}")
    ap.add_argument("--no-compile", action="store_true", help="eager model (default: compiled on CUDA)")
    ap.add_argument(
        "--no-cuda-graphs", action="store_true", help="no CUDA graphs (default: embed's, on with the compiled model)"
    )
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: embed's, cores - 1)")
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run, seconds (Python's default 0.005): how long a thread wanting "
        "the GIL waits before the holder is asked to drop it (the main loop against the pin-memory and writer threads)",
    )
    ap.add_argument(
        "--cprofile",
        default=None,
        help="profile the main thread of the embed call with cProfile from pack --trace-from to its end (warm-up, "
        "compiling and recording outside it) and write its top functions to this text "
        "file (one per set and decoder, as --json): where the host's time per pack goes. Slows the run: its "
        "figures are not comparable (the JSON says profiled)",
    )
    ap.add_argument(
        "--trace",
        default=None,
        help="write a torch.profiler chrome trace (CPU ops of every thread, CUDA kernels) of 4 packs of the "
        "embed run, from pack --trace-from on, to this file (one per set and decoder, as --json; .json.gz compresses): "
        "what the host does while the device waits. Slows those packs: the JSON says traced",
    )
    ap.add_argument(
        "--pin-thread",
        choices=("on", "off"),
        default="on",
        help="A/B: chunks pinned by the DataLoader's pin-memory thread (on, embed's default) or copied to the "
        "device from the workers' shared memory by the main loop (off; job.PIN_THREAD)",
    )
    ap.add_argument(
        "--decode-chunk",
        type=int,
        default=None,
        help=f"A/B: images per DataLoader item and work unit (job.DECODE_CHUNK, default {job.DECODE_CHUNK})",
    )
    ap.add_argument(
        "--cpu-decode-share",
        default=None,
        help="with --decode gpu: the share(s), comma-separated, of JPEGs the workers decode on the CPU instead "
        f"(embed's cpu_decode_share, default {job.CPU_DECODE_SHARE}); each is a run of its own",
    )
    ap.add_argument("--trace-stack", action="store_true", help="--trace with Python's calls (slower still)")
    ap.add_argument(
        "--trace-from",
        type=int,
        default=TRACE_FROM,
        help=f"--trace: the pack the trace starts at (default {TRACE_FROM}, before the timed interval with 15 "
        "workers; past the first timed pack, the traced packs slow the timed run)",
    )
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--save", default="cls,mean")
    ap.add_argument(
        "--json",
        default=None,
        help="also write the figures and run metadata to this JSON file; with several sets or decoders, one "
        "file each, named PATH's stem + _SET_DECODE",
    )
    args = ap.parse_args()
    args.sets = args.set.split(",")
    args.decodes = args.decode.split(",")
    if not set(args.sets) <= set(SETS):
        ap.error(f"--set: expected a comma-separated subset of {list(SETS)}, got {args.set!r}")
    if args.trace_from < 0:
        ap.error(f"--trace-from: expected a pack index >= 0, got {args.trace_from}")
    if args.decode_chunk is not None and args.decode_chunk < 1:
        ap.error(f"--decode-chunk: expected an int >= 1, got {args.decode_chunk}")
    if args.switch_interval is not None and not args.switch_interval > 0:
        ap.error(f"--switch-interval: expected seconds > 0, got {args.switch_interval}")
    try:
        text = str(job.CPU_DECODE_SHARE) if args.cpu_decode_share is None else args.cpu_decode_share
        args.shares = [float(x) for x in text.split(",")]
    except ValueError:
        args.shares = None
    if not args.shares or not all(0 <= x <= 1 for x in args.shares):
        ap.error(f"--cpu-decode-share: expected comma-separated numbers from 0 to 1, got {args.cpu_decode_share!r}")
    if not set(args.decodes) <= set(DECODE_CHOICES):
        ap.error(f"--decode: expected a comma-separated subset of {list(DECODE_CHOICES)}, got {args.decode!r}")
    return args


def main() -> int:
    """Every (set, decoder) in one process: the compiled model's kernels are reused after the first."""
    args = parse()
    workers = job.default_workers() if args.workers is None else args.workers
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    job.PIN_THREAD = args.pin_thread == "on"
    if args.decode_chunk is not None:
        job.DECODE_CHUNK = args.decode_chunk
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        for name in args.sets:
            build_set(name, args.n or SETS[name], root, max(1, workers))
        if args.build_only:
            return 0
        combos = [
            (name, decode, share)
            for name in args.sets
            for decode in args.decodes
            for share in (args.shares if decode != "cpu" else [0.0])
        ]
        for name, decode, share in combos:
            paths = (args.json, args.cprofile, args.trace)
            if len(combos) > 1:
                tag = f"_{name}_{decode}" + (f"_cpu{share:g}" if len(args.shares) > 1 and decode != "cpu" else "")
                paths = tuple(suffixed(p, tag) if p else None for p in paths)
            try:
                run_one(args, name, decode, root, workers, *paths, cpu_share=share)
            except Exception:  # one combination's failure is printed and the next still runs
                failed += 1
                traceback.print_exc()
    return 1 if failed else 0


def suffixed(path: str, tag: str) -> str:
    """`path` with `tag` before its suffixes: `a/b.json.gz` -> `a/b_tag.json.gz`."""
    p = Path(path)
    suffixes = "".join(p.suffixes)
    return str(p.with_name(p.name[: len(p.name) - len(suffixes)] + tag + suffixes))


def run_one(
    args: argparse.Namespace,
    set_name: str,
    decode_choice: str,
    root: Path,
    workers: int,
    json_path,
    profile_path,
    trace_path,
    cpu_share: float = 0.0,
) -> None:
    device = torch.device(args.device)
    dtype = job.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = args.n or SETS[set_name]
    compile_ = False if args.no_compile else None

    with tempfile.TemporaryDirectory() as tmp:
        src = build_set(set_name, n, root, max(1, workers))
        records = open_source(src)
        mean, std = normalization_for(resolve_alias(args.ckpt))
        pre = Preprocessor(mean=mean, std=std, max_tokens=args.max_tokens)
        decode = resolve_decode(decode_choice, device, pre.exact)
        # decode: embed's decode side, one warm pass, then one timed pass on a fresh loader
        gpu = GpuJpegDecoder(pre, device) if decode == "gpu" else None
        gpu_backend = gpu.backend if gpu is not None else None
        units = work_units(records, max_records=job.DECODE_CHUNK)
        share = cpu_share if decode == "gpu" else 0.0
        assert decode_pass(units, pre, device, workers, gpu, share)[0] == len(records)
        total, decoded, decode_s = decode_pass(units, pre, device, workers, gpu, share)
        assert total == len(records)
        gpu = None

        # embed end to end, its packs recorded
        profiler = cProfile.Profile() if profile_path else None
        with PackRecorder(trace_path, args.trace_from, args.trace_stack, profiler) as rec:
            summary = embed(
                src,
                Path(tmp) / "features",
                args.ckpt,
                save=args.save,
                max_tokens=args.max_tokens,
                batch_tokens=args.batch_tokens,
                device=device,
                dtype=dtype,
                decode=decode,
                cpu_decode_share=share,
                compile=compile_,
                cuda_graphs=False if args.no_cuda_graphs else None,
                workers=workers,
                progress=False,
            )
            end = time.perf_counter()
        if profiler is not None:
            Path(profile_path).parent.mkdir(parents=True, exist_ok=True)
            with open(profile_path, "w") as f:
                f.write(
                    f"# cProfile of embed's main thread from pack {args.trace_from} to the end: {set_name}, "
                    f"decode {decode}, {args.ckpt}\n"
                )
                for key in ("tottime", "cumulative"):
                    pstats.Stats(profiler, stream=f).sort_stats(key).print_stats(45)
        assert summary.embedded == len(records) and not summary.skipped, summary.line()
        first = first_timed_pack(rec.grids, workers)
        if len(rec.grids) - first < max(3, len(rec.grids) // 3):
            raise RuntimeError(  # main() reports it and runs the next combination
                f"{len(rec.grids)} packs, too few to time after the first {first} (warm-up and the loader's "
                "queue): raise --n or lower --batch-tokens"
            )
        embed_s = end - rec.times[first - 1]
        timed = rec.grids[first:]  # the packs embed was timed on
        images = sum(len(g) for g in timed)
        half = len(rec.grids) - len(timed) // 2
        last_half = sum(len(g) for g in rec.grids[half:]) / (end - rec.times[half - 1])

        # model: the same packs, in order, inputs on the device
        patch_dim = rec.model.patch_size**2 * 3
        rows = torch.randn(max(int((g[:, 1] * g[:, 2]).sum()) for g in timed), patch_dim, device=device)
        packs = [(rows[: int((g[:, 1] * g[:, 2]).sum())], g) for g in timed]

        def model_pass() -> None:
            for x, g in packs:
                rec.model(x, g)

        with torch.inference_mode():
            stats = measure(model_pass, device, Timing(target_s=2.0, min_repeats=3, max_repeats=5), compiled=True)
            # the host's time in each forward call when nothing else runs (one more pass, no sync inside)
            replay_calls = []
            for x, g in packs:
                called = time.perf_counter()
                rec.model(x, g)
                replay_calls.append(time.perf_counter() - called)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # ... and with the device idle before each call: the cost of launching a forward, nothing queued
            idle_calls = []
            for x, g in packs[:50]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                called = time.perf_counter()
                rec.model(x, g)
                idle_calls.append(time.perf_counter() - called)
        model_s = stats["median_s"]
        intervals = np.diff(rec.times[first - 1 :])
        typical = float(np.median(intervals))
        longest = np.argsort(intervals)[::-1][:5]
        host = {
            "forward_call_ms_embed": 1e3 * float(np.median(rec.calls[first:])),
            "forward_call_ms_model": 1e3 * float(np.median(replay_calls)),
            "pack_interval_ms_embed": 1e3 * float(np.median(np.diff(rec.times[first - 1 :]))),
            "pack_ms_model": 1e3 * model_s / len(packs),
            "forward_call_ms_idle": 1e3 * float(np.median(idle_calls)),
            # where embed's timed interval went beyond its typical pack: stalls, with the packs they ended
            "pack_interval_ms_p90_p99_max": [1e3 * float(q) for q in np.quantile(intervals, [0.9, 0.99, 1.0])],
            "stall_s": float(np.maximum(intervals - typical, 0).sum()),
            "longest_packs": [(first + int(i), round(1e3 * float(intervals[i]), 2)) for i in longest],
            # packs after which Dynamo had compiled a new graph (a recompilation inside the run)
            "compiled_at_pack": [i for i in range(1, len(rec.graphs)) if rec.graphs[i] > rec.graphs[i - 1]],
            "gc": {g: (len(d), round(1e3 * sum(d), 2), round(1e3 * max(d), 2)) for g, d in sorted(rec.gc.items())},
        }
        traced = rec.traced
        if trace_path is not None and not traced:
            print(f"no trace: the run had {len(rec.grids)} packs, the trace starts at pack {args.trace_from}")
        if rec.gaps is not None:
            g = rec.gaps
            print(
                f"trace: device busy {g['busy_us'] / 1e3:.1f} of {g['span_us'] / 1e3:.1f} ms, {g['gaps']} gaps; "
                f"largest {[(x['gap_us'], x['before'][:30], x['after'][:30]) for x in g['largest'][:3]]}"
            )

    prefix = rec.model.num_prefix_tokens
    tokens = sum(segment_tokens(tuple(row.tolist()), prefix) for g in timed for row in g)
    rates = {"decode": decoded / decode_s, "model": images / model_s, "embed": images / embed_s}
    rates["embed_last_half"] = last_half
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fill = tokens / (len(packs) * args.batch_tokens)
    print(f"device {name}, {os.cpu_count()} cores, {args.ckpt} {str(dtype).removeprefix('torch.')}, set {set_name}")
    print(f"{len(records)} images; timed: {images} images in {len(packs)} packs, {tokens / images:.0f} tokens/image")
    print(f"pack fill {fill:.1%}")
    compiled = device.type == "cuda" if compile_ is None else compile_
    graphs = getattr(rec.model, "stack_graphs", None)
    share_text = f" (CPU share {share:g})" if share else ""
    print(
        f"workers {workers}, decode {decode}{share_text}, compiled {compiled}, CUDA graphs recorded "
        f"{graphs and graphs.recorded}"
    )
    print(f"decode only : {rates['decode']:8.1f} images/s  (embed's decode side, after its first chunk)")
    print(f"model only  : {rates['model']:8.1f} images/s  ({tokens / model_s:,.0f} tokens/s, same packs, median)")
    print(
        f"embed e2e   : {rates['embed']:8.1f} images/s  (after its first {first} packs; last half of the packs "
        f"{last_half:.1f})"
    )
    print(
        f"host, median per pack: forward call {host['forward_call_ms_embed']:.2f} ms in embed, "
        f"{host['forward_call_ms_model']:.2f} ms alone; embed's pack interval {host['pack_interval_ms_embed']:.2f} "
        f"ms, the model alone {host['pack_ms_model']:.2f} ms per pack"
    )
    print(
        f"stalls: {host['stall_s']:.2f} s beyond the median pack interval; longest packs (index, ms) "
        f"{host['longest_packs']}; graphs compiled at packs {host['compiled_at_pack']}; "
        f"gc (generation: collections, total ms, max ms) {host['gc']}; forward launch on an idle device "
        f"{host['forward_call_ms_idle']:.2f} ms"
    )
    print(
        f"embed/model : {rates['embed'] / rates['model']:8.1%}   bound reported by embed: {summary.bound} "
        f"(device busy {summary.device_busy:.0%} of its run, main loop waiting on it {summary.device_wait:.0%})"
    )
    if json_path:
        info = {"set": set_name, "n": len(records), "timed_images": images, "timed_tokens": tokens}
        info |= {"timed_packs": len(packs), "fill": fill}
        graphs = getattr(rec.model, "stack_graphs", None)
        info |= {
            "workers": workers,
            "decode": decode,
            "compiled": compiled,
            "cuda_graphs_recorded": None if graphs is None else graphs.recorded,
            "bound": summary.bound,
        }
        info |= {"stage_s": summary.stage_seconds, "device_busy": summary.device_busy}
        info |= {"device_wait": summary.device_wait, "first_timed_pack": first, "profiled": profiler is not None}
        info |= {"trace_gaps": rec.gaps}
        info |= {"host": host, "traced": traced, "decode_chunk": job.DECODE_CHUNK, "pin_thread": job.PIN_THREAD}
        info |= {"gpu_decoder": gpu_backend, "gpu_decode_thread": job.GPU_DECODE_THREAD, "cpu_decode_share": share}
        report = {
            "meta": run_metadata(device),
            **vars(args),
            **info,
            "decode_asked": decode_choice,
            "images_per_s": rates,
            "model_timing": stats,
        }
        write_report(json_path, report)


if __name__ == "__main__":
    sys.exit(main())
