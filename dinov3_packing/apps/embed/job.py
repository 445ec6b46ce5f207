"""The `embed` job: images from any source -> DINOv3 features in an output folder (`store.py`), on one or many
processes.

Data flow:
    open_source(src) (folders, list files, globs, tar shards, parquet: `data.sources`) -> the folder checked
    and locked -> records without a verified manifest line -> work units (runs of one file, shard or
    parquet row group) -> this rank's units (units[rank::world])
    -> DataLoader workers, each on whole units: read the bytes, decode and resize; on CUDA an image leaves
       the worker as uint8 rows (its pixels patchified, `Preprocessor.patchify8`; converted and normalized
       a whole pack at once on the device, `_PackRunner`), on the CPU as float32 rows; with GPU decoding,
       JPEGs leave as bytes plus a plan (`data.gpu_decode`) and are decoded in the main process on the
       device. A chunk's tensors travel as one flat buffer per dtype
       (`pack_chunk`): one shared-memory segment and one pinned copy per chunk, not one per image
    -> TokenBudgetPacker groups images into packs of <= batch_tokens tokens
    -> one packed forward per pack (compiled by default on CUDA), its input copied on a side stream while
       the previous pack computes
    -> features handed by record key to the shard writer thread (`writer.py`), which commits shards

Everything that can refuse the run (arguments, the device, the output folder, its lock, the settings of the
results already there) is checked before the model loads.

Multi-process: under `torchrun`, rank 0 takes the folder's lock for the whole job and repairs the folder;
every rank then embeds its units and writes its own shards and manifest; the reader merges them. CUDA ranks
use NCCL on `cuda:LOCAL_RANK`, CPU ranks gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import os
import queue
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ...compat.seed import default_dtype
from ...data.budget import OVERSIZE, TokenBudgetPacker, segment_tokens
from ...data.decode import DEFAULT_MAX_PIXELS, check_max_pixels
from ...data.gpu_decode import GpuJpegDecoder, JpegJob, plan_jpeg, resolve_decode
from ...data.preprocess import POLICIES, Preprocessor
from ...data.sources import Record, open_source, read_records, work_units
from ...model.archs import normalization_for
from ...parallel.compile import compile_model, compile_stats
from ...parallel.graphs import enable_cuda_graphs
from ...weights.load import load_checkpoint, parse_device, resolve_alias
from .progress import Meter
from .store import FORMAT, OutputFolder, PackFeatures
from .writer import BackgroundWriter

SAVE_CHOICES = ("cls", "mean", "patches")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Records per DataLoader item and per work unit of loose files and tar members: amortizes inter-process
# overhead while a unit's decoded images stay small (8 camera photos at 1024 patches: 6 MB of uint8 pixels).
DECODE_CHUNK = 8
PREFETCH_IMAGES = 32
"""Images each decode worker may have ready ahead of the main loop, in whole chunks (`prefetch_chunks`): 4
chunks of `DECODE_CHUNK` 8, 2 (the least that keeps a worker busy while one waits) from 16 images a chunk."""
PIN_THREAD = True
"""On CUDA, chunks cross into pinned memory in the DataLoader's pin-memory thread (True, the default), or
stay in the workers' shared memory and the main loop copies them to the device from there (False: no
helper thread takes the interpreter lock per chunk, while the copies from pageable memory stage through the
driver on the main thread's time). An A/B switch for `benchmarks/embed_throughput.py --pin-thread off`: the
H200 traces of 2026-12-02 show the pin thread busy while the main thread's launches slowed down."""
GPU_DECODE_THREAD = True
"""With GPU decoding on CUDA, chunks are decoded on the device in a helper thread on its own stream, one
chunk ahead of the main loop (True, the default; `GPU_DECODE_AHEAD` chunks at most), so the decoder's host
calls (a batched hardware decode returns when its images are decoded) do not hold up the launch of the next
pack; False decodes in the main loop, on the side stream (the earlier behaviour, an A/B switch)."""
GPU_DECODE_AHEAD = 2
CPU_DECODE_SHARE = 0.35
"""`embed(cpu_decode_share=None)` with GPU decoding: the share of JPEGs the workers decode on the CPU. The
best of 0, 0.35 and 0.5 on the H200 (16 vCPUs) with ViT-L on 12 MP camera photos, 2026-12-03: 55.6%, 85.2%
and 72.3% of the model alone; on 6,000 photos (ninth session) 0.35 gave 91.4% and 90.6%, 0.4-0.45 with 32
images a chunk 84-85% (benchmarks/results/RESULTS.md)."""
WORKER_NICENESS = 10
"""Added to each decode worker's nice value: with a worker per core, the main process's threads (launching
packs, pinning chunks, writing shards) would otherwise queue behind the decoders for CPU time."""
_SPANS = "_spans"  # a packed record's tensors: field -> (dtype, offset, shape) in its chunk's buffers
T = TypeVar("T")


@dataclass
class EmbedSummary:
    """What an `embed` call ended with (counted over all ranks and earlier runs into the same folder).

    Attributes:
        total: images (records) named by `src`.
        embedded: images with features in `out`.
        skipped: record key -> reason, for images that could not be read.
        new: images handled by this call on this rank (embedded or skipped).
        tokens: tokens this call's forwards ran on this rank (prefix tokens included).
        seconds: wall time of this call.
        lost: key -> why, for images whose features this call found missing or mismatched in `out`
            (embedded again; counted in `new`).
        oversize: key -> tokens, for this rank's images above `batch_tokens` that ran in a pack of their own.
        bound: what limited this rank's main loop: one of `progress.BOUNDS` ("decode", "model", "write",
            "host"; `progress.py` says how), measured from the loop's start to the writer's close (the
            barrier with the other ranks and the final manifest read left out); None when no pack ran
            (nothing left to embed, or only unreadable images): no device time to judge it by.
        stage_seconds: stage -> seconds the main loop spent in it (waiting for decoded images, running the
            model, handing results to the writer).
        device_busy: share of that loop's time the device spent on forwards (`progress.Meter.device_busy`
            adds it up, `Meter.shares` divides); 0.0 when no pack ran.
        device_wait: share of that loop's time it was blocked on the device's results: the host's slack
            ("model" is the bound only with some, `progress.py`); 0.0 when no pack ran.
    """

    total: int
    embedded: int
    skipped: dict[str, str] = field(default_factory=dict)
    new: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lost: dict[str, str] = field(default_factory=dict)
    oversize: dict[str, int] = field(default_factory=dict)
    bound: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device_busy: float = 0.0
    device_wait: float = 0.0

    def line(self) -> str:
        rate = f"{self.new / self.seconds:.1f} images/s, {self.tokens / self.seconds:,.0f} tokens/s"
        waits = ", ".join(f"{k} {v / self.seconds:.0%}" for k, v in self.stage_seconds.items() if k != "model")
        head = (
            f"{self.embedded} of {self.total} images embedded, {len(self.skipped)} skipped; this run: {self.new} "
            f"images in {self.seconds:.1f} s ({rate}); "
        )
        if self.bound is None:
            return head + "bound: none (no pack ran)"
        return head + (
            f"bound: {self.bound} (waited on {waits or 'nothing'}; device busy {self.device_busy:.0%}, "
            f"device wait {self.device_wait:.0%})"
        )


class DecodedUnits(IterableDataset):
    """Reads and decodes whole work units; DataLoader worker k takes units k, k + n, ... of n workers, so a
    parquet row group or a run of a shard is read by one worker, once. Yields chunks of at most
    `DECODE_CHUNK` records packed for the trip to the main process (`pack_chunk`; `unpack_chunk` gives the
    records back): `{"path", "rows", "grid", "size"}`, `{"path", "rows8", "grid", "size"}` with `rows8`
    (uint8 `[h*w, p*p*3]`: the pixels at the target size in patchify's order, `Preprocessor.patchify8`;
    `normalize_rows8_` finishes them) for an 8-bit image on the fast path, `{"path", "error"}` for an image
    that cannot be read (one corrupt file never stops a run of millions), or `{"path", "job"}` for a JPEG
    left to the GPU (`gpu`).

    `pixels`: hand 8-bit images over as uint8 rows (what `embed` does on CUDA, where the device does the float
    arithmetic for nothing and a quarter of the bytes cross shared memory, pinning and the bus); False:
    float32 rows made here, in parallel (on the CPU the main process also runs the model).
    """

    def __init__(
        self,
        units: Sequence[tuple[Record, ...]],
        preprocessor: Preprocessor,
        gpu: bool = False,
        pixels: bool = False,
        cpu_share: float = 0.0,
    ):
        self.units, self.preprocessor, self.gpu, self.pixels = list(units), preprocessor, gpu, pixels
        self.cpu_share = cpu_share

    def __iter__(self):
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id :: info.num_workers]
        chunk = []
        for unit in units:
            for record, data in read_records(unit):
                chunk.append(self.decoded(record.key, data))
                if len(chunk) == DECODE_CHUNK:
                    yield pack_chunk(chunk, shared=info is not None)
                    chunk = []
        if chunk:
            yield pack_chunk(chunk, shared=info is not None)

    def decoded(self, key: str, data: bytes | Exception) -> dict:
        if isinstance(data, Exception):
            return {"path": key, "error": _reason(data)}
        if self.gpu and not takes_cpu_share(key, self.cpu_share):
            if (job := plan_jpeg(data, key, self.preprocessor)) is not None:
                return {"path": key, "job": job}
        return _cpu_rows(self.preprocessor, key, data, self.pixels)


def takes_cpu_share(key: str, share: float) -> bool:
    """Whether the record `key` is among the `share` of JPEGs decoded on the CPU although the GPU decodes
    (`embed(cpu_decode_share=...)`): a hash of the key against the share, so a rerun or a resume picks the
    same records and a record's features do not depend on which worker or when it was read."""
    if share <= 0:
        return False
    return share >= 1 or zlib.crc32(key.encode("utf-8", "surrogateescape")) < share * 2**32


def _cpu_rows(preprocessor: Preprocessor, key: str, data: bytes, pixels: bool = False) -> dict:
    try:
        x, grid, size = (preprocessor.rows_or_pixels if pixels else preprocessor.rows)(data, name=key)
    except Exception as e:  # any decoder failure (PIL, OS, truncated data, ImageTooLarge) is a skipped file
        return {"path": key, "error": _reason(e)}
    if x.dtype == torch.uint8 and pixels:
        return {"path": key, "rows8": preprocessor.patchify8(x), "grid": grid, "size": size}
    return {"path": key, "rows": x, "grid": grid, "size": size}


def pack_chunk(records: list[dict], shared: bool = False) -> dict:
    """Records with every tensor (pixels, rows, a job's JPEG bytes) moved into one flat buffer per dtype:
    `{"records", "buffers": {dtype name: 1-D tensor}}`. Each tensor crossing from a worker costs a
    shared-memory segment, a file descriptor passed over a socket, a mapping and a pinned copy in the main
    process's one pin-memory thread; a chunk pays that once per dtype instead of once per image.
    `shared`: allocate the buffers in shared memory at once (in a worker), so that sending them copies
    nothing more."""
    tensors = [(i, name, t) for i, r in enumerate(records) for name, t in _tensors(r)]
    sizes: dict[torch.dtype, int] = {}
    for _, _, t in tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    buffers = {dtype: torch.empty(n, dtype=dtype) for dtype, n in sizes.items()}
    if shared:
        for buffer in buffers.values():
            buffer.share_memory_()
    offsets = dict.fromkeys(sizes, 0)
    out = [dict(r) for r in records]
    for i, name, t in tensors:
        start = offsets[t.dtype]
        buffers[t.dtype][start : start + t.numel()].copy_(t.reshape(-1))
        offsets[t.dtype] += t.numel()
        spans = out[i].setdefault(_SPANS, {})
        spans[name] = (str(t.dtype).removeprefix("torch."), start, tuple(t.shape))
        if name == "job":
            out[i]["job"] = dataclasses.replace(out[i]["job"], data=_NO_DATA)
        else:
            del out[i][name]
    return {"records": out, "buffers": {str(d).removeprefix("torch."): b for d, b in buffers.items()}}


def unpack_chunk(chunk: dict) -> list[dict]:
    """The records of a `pack_chunk` chunk, their tensors views into its (possibly pinned) buffers."""
    records = []
    for record in chunk["records"]:
        record = dict(record)
        for name, (dtype, start, shape) in record.pop(_SPANS, {}).items():
            flat = chunk["buffers"][dtype]
            view = flat[start : start + math.prod(shape)].view(shape)
            if name == "job":
                record["job"] = dataclasses.replace(record["job"], data=view)
            else:
                record[name] = view
        records.append(record)
    return records


_NO_DATA = torch.empty(0, dtype=torch.uint8)  # a packed job's bytes: in the chunk's buffer instead


def _tensors(record: dict):
    for name in ("rows8", "rows"):
        if name in record:
            yield name, record[name]
    if "job" in record:
        yield "job", record["job"].data


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def default_workers() -> int:
    """Decoding processes per rank: the cores this process may run on, shared by the ranks of this host
    (`LOCAL_WORLD_SIZE` under torchrun), less one for the rank's own process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        cores = os.cpu_count() or 1
    return max(0, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


def embed(
    src: str | os.PathLike,
    out: str | os.PathLike,
    ckpt: str,
    *,
    image_column: str = "image",
    save: Sequence[str] = ("cls", "mean"),
    patch_dtype: torch.dtype = torch.float16,
    policy: str = "native",
    size: int = 224,
    min_tokens: int | None = None,
    max_tokens: int | None = 1024,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exact: bool | None = None,
    decode: str = "cpu",
    cpu_decode_share: float | None = None,
    batch_tokens: int = 16384,
    oversize: str = "own",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
    fused_mlp: bool | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    workers: int | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every image `src` names into `out` (see `store.py` for the folder and what it guarantees).

    Args:
        src: a folder (recursive), a list file, a glob, a WebDataset `.tar` shard, a `.parquet` file, or a
            brace list of those (`shards/{000..099}.tar`): `data.sources.open_source`. Each image's key in
            the manifests (and for `EmbedReader.get`) is its absolute path, `<shard>.tar/<member>` or
            `<file>.parquet/<row>`.
        out: output folder (created). One run at a time: a second run on the same folder is refused.
        ckpt: checkpoint (`weights.load`); its name also picks the normalization. `random:<arch>` gives
            seeded random weights (features that mean nothing, for tests).
        image_column: the parquet column holding the encoded images (bytes or `{"bytes", "path"}`).
        save: any of "cls" (final-norm CLS token), "mean" (mean of the final-norm patch tokens), "patches"
            (the `[h, w, D]` patch map).
        patch_dtype: storage dtype of the patch maps.
        policy, size, min_tokens, max_tokens: resizing, as in `preprocess.Preprocessor`; max_tokens bounds
            the patches of one image.
        max_pixels: files with more pixels (read from the header, before decoding) are skipped with the
            reason; default 64 MP (`data.decode.DEFAULT_MAX_PIXELS`), None: only Pillow's own limit.
        exact: the pixel path (`Preprocessor`): None (default) fast for "native", exact for "fixed".
        decode: "cpu" (default: Pillow in the DataLoader workers), "gpu" (JPEGs through nvJPEG on the model's
            CUDA device, other files and failures on the CPU; needs torchvision), "auto" (the GPU where it
            can run, else the CPU). The exact path always decodes on the CPU.
        cpu_decode_share: with GPU decoding, the fraction of JPEGs (0 to 1) the DataLoader workers decode on
            the CPU instead, to put the cores the GPU path leaves idle to work (`takes_cpu_share`: picked by
            a hash of the key, the same records on every run). The two paths' pixels differ slightly (how far
            each moves the features from the exact path: docs/preprocess.md); run.json records the share,
            and a resume must use the same. None (default): `CPU_DECODE_SHARE` with GPU decoding.
        batch_tokens: token budget of one forward (prefix tokens included), see `budget.py`.
        oversize: an image above `batch_tokens`: "own" runs it in a pack of its own and reports it (key and
            tokens, once), "error" stops the run with a ValueError naming it.
        device, dtype: default CUDA (`cuda:LOCAL_RANK`) in bf16 when available, else CPU in fp32.
        attn_backend, fused_mlp: the model's (`DINOv3ViTPackingModel`); `fused_mlp=False` keeps cuBLAS + GELU
            in the MLPs instead of the fused Triton kernel.
        compile: compile the model (`parallel.compile.compile_model`); None (default): on CUDA only.
        cuda_graphs: replay the block stack as CUDA graphs, one per padded pack shape
            (`parallel.graphs.enable_cuda_graphs`: one launch per pack instead of hundreds); None (default):
            on CUDA with the compiled model. True off CUDA raises ValueError.
        workers: DataLoader decoding processes per rank (0: decode in the main process); None (default):
            `default_workers()`, the cores this process may use (shared by the ranks on this host) less one.
        shard_size: images per shard (a shard also closes at 1 GiB of patch maps).
        overwrite: delete earlier results in `out` first instead of resuming (never another run's).
        limit: embed at most this many of the images still to do (then stop; a later call resumes).
        progress: show a progress bar (rank 0): images decoded (it moves from the first one), images
            embedded, images/s, tokens/s, an ETA and the bound.

    Returns:
        `EmbedSummary`.

    Raises:
        ValueError / TypeError: bad arguments, an unusable device, an unreadable source, an `out` that is a
            file, cannot be created or written, is in use by another run or holds a run with different
            settings; with `oversize="error"`, an image above `batch_tokens`.
        OSError: writing a shard or a manifest failed (what was committed before stays valid).
    """
    start = time.perf_counter()
    save = _check_save(save)
    if patch_dtype not in DTYPES.values():
        raise ValueError(f"patch_dtype: expected one of {list(DTYPES)}, got {patch_dtype!r}")
    workers = default_workers() if workers is None else workers
    for arg, value, low in (("batch_tokens", batch_tokens, 1), ("shard_size", shard_size, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")
    if oversize not in OVERSIZE:
        raise ValueError(f"oversize: expected one of {OVERSIZE}, got {oversize!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    for arg, value in (("compile", compile), ("cuda_graphs", cuda_graphs)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{arg}: expected True, False or None, got {value!r}")
    check_max_pixels(max_pixels)
    if cpu_decode_share is None:
        cpu_decode_share = CPU_DECODE_SHARE
    if not isinstance(cpu_decode_share, (int, float)) or isinstance(cpu_decode_share, bool):
        raise TypeError(f"cpu_decode_share: expected a number from 0 to 1, got {cpu_decode_share!r}")
    if not 0 <= cpu_decode_share <= 1:
        raise ValueError(f"cpu_decode_share: expected a number from 0 to 1, got {cpu_decode_share!r}")
    if not isinstance(ckpt, str):
        raise TypeError(f"ckpt: expected a checkpoint name or path, got {type(ckpt).__name__}")
    # Checks the resizing arguments before the model loads; the real one takes the model's patch size.
    exact = Preprocessor(
        policy=policy, size=size, min_tokens=min_tokens, max_tokens=max_tokens, exact=exact, max_pixels=max_pixels
    ).exact
    records = open_source(src, image_column=image_column)
    store = OutputFolder(out)

    rank, world, owns_group, device = _init_distributed(device)
    try:
        decode = resolve_decode(decode, device, exact)
        dtype = dtype or default_dtype(device)
        # Resolved once: the settings (checked before the model loads) and the load use the same name.
        name = resolve_alias(ckpt)
        mean, std = normalization_for(name)
        settings = {
            "format": FORMAT,
            "ckpt": ckpt,
            "dtype": str(dtype).removeprefix("torch."),
            "policy": policy,
            "size": size if policy == "fixed" else None,
            "min_tokens": min_tokens if policy == "native" else None,
            "max_tokens": max_tokens if policy == "native" else None,
            # the pixel path and its limit shape the features: a resume never mixes fast and exact pixels
            "exact": exact,
            "max_pixels": max_pixels,
            "decode": decode,
            "mean": list(mean),
            "std": list(std),
            "save": list(save),
            "patch_dtype": str(patch_dtype).removeprefix("torch.") if "patches" in save else None,
        }
        cpu_share = float(cpu_decode_share) if decode == "gpu" else 0.0
        if cpu_share:  # only when set: run folders made before the option still resume
            settings["cpu_decode_share"] = cpu_share
        # Rank 0 holds the lock for every rank of the job; a refusal there stops all of them.
        _on_rank0(world, rank, lambda: store.acquire(settings, overwrite))
        model = load_checkpoint(name, device, dtype, attn_backend, fused_mlp).model
        compiled = device.type == "cuda" if compile is None else compile
        if compiled:
            compile_model(model)
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, the model runs on {str(device)!r}")
        if compiled and device.type == "cuda" if cuda_graphs is None else cuda_graphs:
            enable_cuda_graphs(model)
        preprocessor = Preprocessor(
            patch_size=model.patch_size,
            mean=mean,
            std=std,
            policy=policy,
            size=size,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            exact=exact,
            max_pixels=max_pixels,
        )
        repair = _on_rank0(world, rank, lambda: store.prepare(settings, overwrite))
        if rank == 0:
            for line in repair.lines():
                tqdm.write(line, file=sys.stderr)
        done = store.done()
        todo = [r for r in records if done.get(r.key, {}).get("status") != "ok"]
        if limit is not None:
            todo = todo[:limit]
        # Whole units to each rank: a parquet row group or a run of one shard is read once, by one process.
        mine = work_units(todo, max_records=DECODE_CHUNK)[rank::world]
        count = sum(len(unit) for unit in mine)

        gpu = GpuJpegDecoder(preprocessor, device) if decode == "gpu" else None
        writer = BackgroundWriter(store.writer(rank, save, patch_dtype, shard_size))
        packer = TokenBudgetPacker(batch_tokens, oversize="own")
        alone: dict[str, int] = {}
        loader = decode_loader(mine, preprocessor, device, workers, gpu=gpu is not None, cpu_share=cpu_share)
        bar = tqdm(total=count, unit="img", disable=not progress or rank != 0, dynamic_ncols=True, smoothing=0.05)
        meter = Meter()  # from here on the main loop's time is accounted stage by stage
        runner = _PackRunner(model, preprocessor, writer, save, meter)
        # The bar is closed before an error or Ctrl-C propagates, so that their message starts a line.
        # The model's device is the current one for the loop: the pin-memory thread (`iter(loader)`), GPU
        # decoding and anything else that takes the current device use it, not cuda:0 (one process, cuda:1).
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        try:
            with bar, on_device, torch.inference_mode():
                for chunk in decoded_chunks(loader, meter, gpu, preprocessor, runner.side_stream):
                    for record in chunk:
                        if "error" in record:
                            with meter.stage("write"):
                                writer.skip(record["path"], record["error"])
                            continue
                        tokens = segment_tokens(record["grid"], model.num_prefix_tokens)
                        if tokens > batch_tokens:
                            _oversize(record, tokens, batch_tokens, max_tokens, oversize)
                            alone[record["path"]] = tokens
                        for pack in packer.add(record, tokens):
                            runner.run(pack.items, pack.tokens)
                    meter.decoded += len(chunk)
                    bar.update(len(chunk))
                    if not bar.disable:
                        bar.set_postfix_str(meter.postfix(), refresh=False)
                for pack in packer.flush():
                    runner.run(pack.items, pack.tokens)
                runner.finish()
                if not bar.disable:  # the last packs ran after the last chunk: the bar's line ends on them
                    bar.set_postfix_str(meter.postfix(), refresh=True)
                with meter.stage("write"):
                    writer.close()
            # The loop's own shares, taken before the barrier: a rank waiting there for slower ranks, or the
            # manifest read below, is neither host work feeding the device nor a wait on a stage.
            ran = meter.tokens > 0
            bound = meter.bound() if ran else None
            shares = meter.shares()
            device_busy = shares["device"] if ran else 0.0
            device_wait = shares["device wait"] if ran else 0.0
        except BaseException:
            writer.abort()
            raise
        finally:
            runner.heap.release()
        _barrier(world)
        done = store.done()
        return EmbedSummary(
            total=len(records),
            embedded=sum(1 for r in records if done.get(r.key, {}).get("status") == "ok"),
            skipped={r.key: done[r.key]["reason"] for r in records if done.get(r.key, {}).get("status") == "error"},
            new=count,
            tokens=meter.tokens,
            seconds=time.perf_counter() - start,
            lost=repair.lost,
            oversize=alone,
            bound=bound,
            stage_seconds=dict(meter.seconds),
            device_busy=device_busy,
            device_wait=device_wait,
        )
    finally:
        store.release()
        if owns_group:
            dist.destroy_process_group()


def decode_loader(
    units: Sequence[tuple[Record, ...]],
    preprocessor: Preprocessor,
    device: torch.device,
    workers: int,
    gpu: bool,
    cpu_share: float = 0.0,
) -> DataLoader:
    """The DataLoader `embed` reads its chunks from (`benchmarks/embed_throughput.py` times this one too):
    8-bit images as uint8 rows on CUDA, float32 rows on the CPU (`DecodedUnits`), pinned on CUDA (unless
    `PIN_THREAD` is off)."""
    cuda = device.type == "cuda"
    return DataLoader(
        DecodedUnits(units, preprocessor, gpu=gpu, pixels=cuda, cpu_share=cpu_share),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda and PIN_THREAD,
        prefetch_factor=prefetch_chunks() if workers else None,
        in_order=False,  # a chunk is used as soon as any worker has one: features do not depend on order
        worker_init_fn=lower_priority,
    )


def prefetch_chunks() -> int:
    """The chunks each decode worker may have ready ahead: `PREFETCH_IMAGES` in chunks of `DECODE_CHUNK`, at
    least 2."""
    return max(2, -(-PREFETCH_IMAGES // DECODE_CHUNK))


def lower_priority(worker_id: int) -> None:
    """A decode worker's start: yield the CPU to the main process (`WORKER_NICENESS`)."""
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # no nice() on this OS, or the limit reached: decoding runs regardless
        pass


def decoded_chunks(
    loader: DataLoader,
    meter: Meter,
    gpu: GpuJpegDecoder | None,
    preprocessor: Preprocessor,
    side_stream: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[list[dict]]:
    """The decode side of the main loop: each chunk from `loader` unpacked, its JPEG jobs decoded on the
    device (in `side_stream()`, or in a helper thread: `GPU_DECODE_THREAD`), the time it waited for and
    spent on them counted as stage "decode"."""
    if gpu is not None and GPU_DECODE_THREAD:
        yield from _decoded_in_thread(loader, meter, gpu, preprocessor, side_stream)
        return
    for item in meter.timed("decode", iter(loader)):
        chunk = unpack_chunk(item)
        if gpu is not None:
            with meter.stage("decode"), side_stream():
                chunk = decode_on_device(gpu, preprocessor, chunk)
        yield chunk


_DONE = object()


def _decoded_in_thread(
    loader: DataLoader,
    meter: Meter,
    gpu: GpuJpegDecoder,
    preprocessor: Preprocessor,
    side_stream: Callable[[], contextlib.AbstractContextManager],
) -> Iterator[list[dict]]:
    """`decoded_chunks` with the device decoding in a helper thread: it reads `loader`, decodes each chunk's
    jobs on a stream of its own and records an event; the main loop makes the side stream (where the next
    pack's rows are assembled) wait for that event and marks the decoded tensors as used there, so the
    allocator does not hand their memory back to the thread before the side stream is done with them. An
    exception in the thread reaches the main loop; stopping the main loop stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=GPU_DECODE_AHEAD)
    stop = threading.Event()
    cuda = gpu.device.type == "cuda"  # the CPU runs the same thread without streams (the tests do)
    stream = torch.cuda.Stream(gpu.device) if cuda else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with contextlib.ExitStack() as on_device, torch.inference_mode():
                if cuda:
                    on_device.enter_context(torch.cuda.device(gpu.device))
                    on_device.enter_context(torch.cuda.stream(stream))
                for item in loader:
                    chunk = decode_on_device(gpu, preprocessor, unpack_chunk(item))
                    done = None
                    if cuda:
                        done = torch.cuda.Event()
                        done.record(stream)
                    if not put((chunk, done)):
                        return
            put(_DONE)
        except BaseException as e:  # handed to the main loop, which raises it
            put(e)

    thread = threading.Thread(target=work, name="embed-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            with meter.stage("decode"):
                item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            chunk, done = item
            if done is None:
                yield chunk
                continue
            with side_stream():
                side = torch.cuda.current_stream(gpu.device)
                side.wait_event(done)
                for record in chunk:
                    rows = record.get("rows")
                    if rows is not None and rows.is_cuda:
                        rows.record_stream(side)
            yield chunk
    finally:
        stop.set()
        thread.join(timeout=60)  # it stops at its next chunk; a loader stuck on a dead worker raises there


def decode_on_device(gpu: GpuJpegDecoder, preprocessor: Preprocessor, chunk: list[dict]) -> list[dict]:
    """A chunk with its JPEG jobs decoded on the device; a job the device cannot decode takes the CPU path
    here, in the main process (it is rare: the header already looked like a JPEG the GPU takes)."""
    jobs: list[JpegJob] = [r["job"] for r in chunk if "job" in r]
    decoded = iter(gpu.decode(jobs))
    out = []
    for record in chunk:
        if "job" not in record:
            out.append(record)
            continue
        job, result = record["job"], next(decoded)
        if isinstance(result, Exception):
            out.append(_cpu_rows(preprocessor, job.key, job.data.numpy().tobytes()))
        else:
            rows, grid = result
            out.append({"path": job.key, "rows": rows, "grid": grid, "size": job.original})
    return out


def _oversize(record: dict, tokens: int, batch_tokens: int, max_tokens: int | None, oversize: str) -> None:
    """Report (once per image) or refuse an image whose tokens exceed the budget of a forward."""
    (h, w), (height, width) = record["grid"], record["size"]
    what = f"{record['path']!r} ({width}x{height} px, {h}x{w} patches) needs {tokens} tokens"
    if oversize == "error":
        lower = f"lower max_tokens={max_tokens}" if max_tokens is not None else "bound max_tokens=N"
        raise ValueError(
            f"oversize: {what}, more than batch_tokens={batch_tokens}; raise that, {lower} or pass oversize=own "
            "to run such an image in a pack of its own"
        )
    tqdm.write(f"{what}, more than the budget of {batch_tokens} per forward: runs in a pack of its own", sys.stderr)


def _check_save(save: Sequence[str]) -> tuple[str, ...]:
    if isinstance(save, str):
        save = [s.strip() for s in save.split(",") if s.strip()]
    if not save or any(s not in SAVE_CHOICES for s in save):
        raise ValueError(f"save: expected a non-empty subset of {SAVE_CHOICES}, got {save!r}")
    return tuple(s for s in SAVE_CHOICES if s in save)


FREEZE_PACKS = 4
"""`_FrozenHeap` freezes the heap after each of a run's first packs and after any pack that compiled."""


class _FrozenHeap:
    """Keeps Python's cyclic garbage collector off what the model's compilation left behind.

    `torch.compile` leaves millions of objects (graphs, guards, generated code) on the heap; each collection
    of the oldest generation walks all of them, and on the H200 (2026-12-02) that was 330-450 ms of the main
    loop four times in 10,000 images (12% of a ViT-L run). After each of the first `FREEZE_PACKS` packs and
    after any pack during which Dynamo compiled a graph, `gc.freeze()` moves everything alive to the
    permanent generation, which collections skip; objects are still freed by their reference counts as
    usual. Before the freeze after the first pack and after a compilation, one full collection frees the
    cycles already unreachable (a frozen cycle would stay until `release`, with whatever tensors it holds).
    `release()` (at the end of `embed`) unfreezes the permanent generation, also anything another thread
    froze meanwhile. Nothing is done when the process had already frozen objects: that state is its owner's.
    """

    def __init__(self):
        self.active = gc.get_freeze_count() == 0
        self.packs, self.graphs = 0, compile_stats()["unique_graphs"]
        self.frozen = False

    def after_pack(self) -> None:
        if not self.active:
            return
        self.packs += 1
        graphs = compile_stats()["unique_graphs"]
        compiled = graphs != self.graphs
        if self.packs <= FREEZE_PACKS or compiled:
            if self.packs == 1 or compiled:
                gc.collect()
            self.frozen = True  # before the freeze: an interrupt between the two still releases
            gc.freeze()
        self.graphs = graphs

    def release(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


class _PackRunner:
    """Runs packs through the model, one pack ahead of the results.

    On CUDA, a pack's images are copied to the device on a side stream (non-blocking, from the pinned
    chunk buffers: uint8 rows, one copy per image into one uint8 block, then converted and normalized as
    one pack by `Preprocessor.normalize_rows8_`; float32 rows copied over their slots after that) while
    the previous pack computes, and the compute stream waits for that work only. The main process's
    torch calls per image are kept to that one copy (the H200 runs of 2026-12-01 found its host work per
    pack, not the device, setting the pace);
    the pack's features come back to the host with non-blocking copies and an event that is waited on
    one pack later, when the next pack is already queued. Two timing events bracket each pack on the
    compute stream: the device's busy time, for the bound (`Meter.device_busy`; a launch gap inside a pack
    counts as busy, `progress.py`). Streams and events are taken on the model's device explicitly, never
    the current device's (one process on cuda:1 has cuda:0 current). On the CPU the same steps run in
    order.
    """

    def __init__(
        self, model, preprocessor: Preprocessor, writer: BackgroundWriter, save: tuple[str, ...], meter: Meter
    ):
        self.model, self.preprocessor, self.writer, self.save, self.meter = model, preprocessor, writer, save, meter
        self.device = model.device
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._in_flight: tuple | None = None
        self.heap = _FrozenHeap()

    def side_stream(self):
        """Where work for the next pack goes (copies, GPU decoding): the side stream on CUDA."""
        return torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext()

    def _upload(self, records: list[dict], counts: list[int]) -> torch.Tensor:
        patch_dim = self.preprocessor.patch_size**2 * 3
        nonblocking = self.device.type == "cuda"
        spans = list(zip(records, itertools.accumulate([0, *counts]), counts, strict=False))
        with self.side_stream():
            rows = torch.empty(sum(counts), patch_dim, dtype=torch.float32, device=self.device)
            if any("rows8" in record for record in records):
                block = torch.empty(sum(counts), patch_dim, dtype=torch.uint8, device=self.device)
                for record, start, n in spans:
                    if "rows8" in record:
                        block[start : start + n].copy_(record["rows8"], non_blocking=nonblocking)
                self.preprocessor.normalize_rows8_(rows.copy_(block))
            for record, start, n in spans:  # float32 rows (exact path, 16-bit images) over their slots
                if "rows" in record:
                    rows[start : start + n].copy_(record["rows"], non_blocking=nonblocking)
                elif "rows8" not in record:
                    raise ValueError(f"{record['path']!r}: a record without rows reached the model")
        if self.copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            rows.record_stream(compute)  # allocated on the side stream, freed after the compute stream's use
        return rows

    def run(self, records: list[dict], tokens: int) -> None:
        """Launch one pack and hand the previous pack's features to the writer."""
        with self.meter.stage("model"):
            grid = torch.tensor([(1, *r["grid"]) for r in records], dtype=torch.long)
            counts = [h * w for h, w in (r["grid"] for r in records)]
            rows = self._upload(records, counts)
            nonblocking = self.device.type == "cuda"
            start = compute = None
            if nonblocking:  # after the compute stream's wait for the upload: the interval is the pack's own work
                compute = torch.cuda.current_stream(self.device)  # where the forward's kernels go
                start = torch.cuda.Event(enable_timing=True)
                start.record(compute)
            out = self.model(rows, grid)
            self.heap.after_pack()
            patches = out.last_hidden_state
            features = {}
            if "cls" in self.save:
                features["cls"] = out.pooler_output.float()
            if "mean" in self.save:
                # Each record is one single-frame image, its patch tokens one contiguous run of `patches`:
                # a segment sum, deterministic (an index_add_ adds with atomics on CUDA, in an order that
                # changes from run to run: the same pack gave means differing in the last bits). The
                # lengths reach the device through pinned memory, non-blocking: a copy from pageable
                # memory could wait for the queued forward and the next pack would not be launched ahead.
                lengths = torch.tensor(counts, dtype=torch.long)
                if nonblocking:
                    lengths = lengths.pin_memory().to(self.device, non_blocking=True)
                # unsafe=True: the lengths are the packer's own counts (they sum to the pack's patches); the
                # checked variant verifies them with two `.item()` calls, which wait for the forward.
                sums = torch.segment_reduce(patches.float(), "sum", lengths=lengths, axis=0, unsafe=True)
                features["mean"] = sums / lengths.to(torch.float32)[:, None]
            if "patches" in self.save:
                features["patches"] = patches.to(self.writer.patch_dtype)
            features = {k: v.to("cpu", non_blocking=nonblocking) for k, v in features.items()}
            event = None
            if nonblocking:
                event = torch.cuda.Event(enable_timing=True)
                event.record(compute)
        self.meter.tokens += tokens
        self.finish()
        self._in_flight = (records, counts, features, start, event)

    def finish(self) -> None:
        """Hand the features of the pack in flight to the writer."""
        if self._in_flight is None:
            return
        records, counts, features, start, event = self._in_flight
        self._in_flight = None
        if event is not None:
            with self.meter.waiting_on_device():
                event.synchronize()
            self.meter.device_busy(start.elapsed_time(event) / 1e3)
        # The pack's tensors go to the writer whole: no torch call per record here or in the writer thread
        # (each is a moment this loop may wait there for the interpreter lock).
        fields = [{"size": list(r["size"]), "grid": [1, *r["grid"]]} for r in records]
        pack = PackFeatures([r["path"] for r in records], features, counts, fields)
        with self.meter.stage("write"):
            self.writer.add_pack(pack)
        self.meter.embedded += len(records)


def usable_device(device: torch.device | str | None) -> torch.device:
    """`parse_device`, then a real allocation there, so that a device this torch cannot use (a CPU-only
    build asked for CUDA, a missing GPU index) is one ValueError naming it instead of a deep traceback."""
    device = parse_device(device)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device: {str(device)!r} cannot be used here ({reason}); pass device=cpu") from None
    return device


def _init_distributed(device: torch.device | str | None) -> tuple[int, int, bool, torch.device]:
    """(rank, world size, whether we created the process group, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    device = usable_device(device)
    if world <= 1:
        return 0, 1, False, device
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), owns, device


def _on_rank0(world: int, rank: int, step: Callable[[], T]) -> T | None:
    """Run `step` on rank 0 while the other ranks wait; a ValueError there is raised on every rank (so that a
    refusal stops the whole job). Returns the step's result on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = step()
        except ValueError as e:
            if world <= 1:
                raise
            error = str(e)
    if world <= 1:
        return result
    box = [result, error]
    dist.broadcast_object_list(box, src=0)
    result, error = box
    if error is not None:
        raise ValueError(error)
    return result


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
