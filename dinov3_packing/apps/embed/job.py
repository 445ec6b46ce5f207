"""The `embed` job: image files -> DINOv3 features in an output folder (`store.py`), on one or many processes.

Data flow:
    list_images(src) -> the folder checked and locked -> images without a verified manifest line
    -> this rank's share (files[rank::world])
    -> DataLoader workers decode and preprocess each file into packed rows (pinned memory)
    -> TokenBudgetPacker groups images into packs of <= batch_tokens tokens -> one packed forward per pack
    -> features handed to the store's `ShardWriter` by path

Everything that can refuse the run (arguments, the device, the output folder, its lock, the settings of the
results already there) is checked before the model loads.

Multi-process: under `torchrun`, rank 0 takes the folder's lock for the whole job and repairs the folder;
every rank then embeds its share and writes its own shards and manifest; the reader merges them. CUDA ranks
use NCCL on `cuda:LOCAL_RANK`, CPU ranks gloo.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ...compat.seed import default_dtype
from ...data.budget import OVERSIZE, TokenBudgetPacker, segment_tokens
from ...data.decode import DEFAULT_MAX_PIXELS, check_max_pixels
from ...data.files import list_images
from ...data.preprocess import POLICIES, Preprocessor
from ...model.archs import normalization_for
from ...weights.load import load_packing_model, parse_device, resolve_alias
from .store import FORMAT, OutputFolder, ShardWriter

SAVE_CHOICES = ("cls", "mean", "patches")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DECODE_CHUNK = 8  # images per DataLoader item: amortizes inter-process overhead
T = TypeVar("T")


@dataclass
class EmbedSummary:
    """What an `embed` call ended with (counted over all ranks and earlier runs into the same folder).

    Attributes:
        total: images named by `src`.
        embedded: images with features in `out`.
        skipped: path -> reason, for files that could not be read.
        new: images handled by this call on this rank (embedded or skipped).
        tokens: tokens this call's forwards ran on this rank (prefix tokens included).
        seconds: wall time of this call.
        lost: path -> why, for images whose features this call found missing or mismatched in `out`
            (embedded again; counted in `new`).
        oversize: path -> tokens, for this rank's images above `batch_tokens` that ran in a pack of their own.
    """

    total: int
    embedded: int
    skipped: dict[str, str] = field(default_factory=dict)
    new: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lost: dict[str, str] = field(default_factory=dict)
    oversize: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = f"{self.new / self.seconds:.1f} images/s, {self.tokens / self.seconds:,.0f} tokens/s"
        return (
            f"{self.embedded} of {self.total} images embedded, {len(self.skipped)} skipped; this run: {self.new} "
            f"images in {self.seconds:.1f} s ({rate})"
        )


class ImageFiles(Dataset):
    """Decodes and preprocesses one file per item. A file that cannot be read becomes a record with the
    reason, so one corrupt file never stops a run of millions."""

    def __init__(self, paths: Sequence[str], preprocessor: Preprocessor):
        self.paths, self.preprocessor = list(paths), preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            rows, grid, size = self.preprocessor.rows(path, name=path)
        except Exception as e:  # any decoder failure (PIL, OS, truncated data) is a skipped file
            return {"path": path, "error": f"{type(e).__name__}: {e}".strip()}
        return {"path": path, "rows": rows, "grid": grid, "size": size}


def _as_list(batch: list) -> list:
    return batch


def embed(
    src: str | os.PathLike,
    out: str | os.PathLike,
    ckpt: str,
    *,
    save: Sequence[str] = ("cls", "mean"),
    patch_dtype: torch.dtype = torch.float16,
    policy: str = "native",
    size: int = 224,
    min_tokens: int | None = None,
    max_tokens: int | None = 1024,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_tokens: int = 16384,
    oversize: str = "own",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str = "auto",
    fused_mlp: bool | None = None,
    workers: int = 4,
    shard_size: int = 1000,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every image `src` names into `out` (see `store.py` for the folder and what it guarantees).

    Args:
        src: a folder (recursive), a list file or a glob (`data.files.list_images`).
        out: output folder (created). One run at a time: a second run on the same folder is refused.
        ckpt: checkpoint (`weights.load`); its name also picks the normalization. `random:<arch>` gives
            seeded random weights (features that mean nothing, for tests).
        save: any of "cls" (final-norm CLS token), "mean" (mean of the final-norm patch tokens), "patches"
            (the `[h, w, D]` patch map).
        patch_dtype: storage dtype of the patch maps.
        policy, size, min_tokens, max_tokens: resizing, as in `preprocess.Preprocessor`; max_tokens bounds
            the patches of one image.
        max_pixels: files with more pixels (read from the header, before decoding) are skipped with the
            reason; default 64 MP (`data.decode.DEFAULT_MAX_PIXELS`), None: only Pillow's own limit.
        batch_tokens: token budget of one forward (prefix tokens included), see `budget.py`.
        oversize: an image above `batch_tokens`: "own" runs it in a pack of its own and reports it (path and
            tokens, once), "error" stops the run with a ValueError naming it.
        device, dtype: default CUDA (`cuda:LOCAL_RANK`) in bf16 when available, else CPU in fp32.
        attn_backend, fused_mlp: the model's (`DINOv3ViTPackingModel`); `fused_mlp=False` keeps cuBLAS + GELU
            in the MLPs instead of the fused Triton kernel.
        workers: DataLoader decoding processes per rank (0: decode in the main process).
        shard_size: images per shard (a shard also closes at 1 GiB of patch maps).
        overwrite: delete earlier results in `out` first instead of resuming (never another run's).
        limit: embed at most this many of the images still to do (then stop; a later call resumes).
        progress: show a progress bar (rank 0).

    Returns:
        `EmbedSummary`.

    Raises:
        ValueError / TypeError: bad arguments, an unusable device, an `out` that is a file, cannot be
            created or written, is in use by another run or holds a run with different settings; with
            `oversize="error"`, an image above `batch_tokens`.
    """
    start = time.perf_counter()
    save = _check_save(save)
    if patch_dtype not in DTYPES.values():
        raise ValueError(f"patch_dtype: expected one of {list(DTYPES)}, got {patch_dtype!r}")
    for arg, value, low in (("batch_tokens", batch_tokens, 1), ("shard_size", shard_size, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")
    if oversize not in OVERSIZE:
        raise ValueError(f"oversize: expected one of {OVERSIZE}, got {oversize!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    check_max_pixels(max_pixels)
    if not isinstance(ckpt, str):
        raise TypeError(f"ckpt: expected a checkpoint name or path, got {type(ckpt).__name__}")
    paths = list_images(src)
    store = OutputFolder(out)

    rank, world, owns_group, device = _init_distributed(device)
    try:
        dtype = dtype or default_dtype(device)
        mean, std = normalization_for(resolve_alias(ckpt))
        settings = {
            "format": FORMAT,
            "ckpt": ckpt,
            "dtype": str(dtype).removeprefix("torch."),
            "policy": policy,
            "size": size if policy == "fixed" else None,
            "min_tokens": min_tokens if policy == "native" else None,
            "max_tokens": max_tokens if policy == "native" else None,
            "mean": list(mean),
            "std": list(std),
            "save": list(save),
            "patch_dtype": str(patch_dtype).removeprefix("torch.") if "patches" in save else None,
        }
        # Rank 0 holds the lock for every rank of the job; a refusal there stops all of them.
        _on_rank0(world, rank, lambda: store.acquire(settings, overwrite))
        model = load_packing_model(ckpt, device, dtype, attn_backend, fused_mlp)
        preprocessor = Preprocessor(
            patch_size=model.patch_size,
            mean=mean,
            std=std,
            policy=policy,
            size=size,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            max_pixels=max_pixels,
        )
        repair = _on_rank0(world, rank, lambda: store.prepare(settings, overwrite))
        if rank == 0:
            for line in repair.lines():
                tqdm.write(line, file=sys.stderr)
        done = store.done()
        todo = [p for p in paths if done.get(p, {}).get("status") != "ok"]
        if limit is not None:
            todo = todo[:limit]
        mine = todo[rank::world]

        writer = store.writer(rank, save, patch_dtype, shard_size)
        runner = _PackRunner(model, writer, save)
        packer = TokenBudgetPacker(batch_tokens, oversize="own")
        alone: dict[str, int] = {}
        loader = DataLoader(
            ImageFiles(mine, preprocessor),
            batch_size=_DECODE_CHUNK,
            collate_fn=_as_list,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        bar = tqdm(total=len(mine), unit="img", disable=not progress or rank != 0, dynamic_ncols=True, smoothing=0.05)
        # The bar is closed before an error or Ctrl-C propagates, so that their message starts a line.
        with bar, torch.inference_mode():
            for batch in loader:
                for record in batch:
                    if "error" in record:
                        writer.skip(record["path"], record["error"])
                        bar.update(1)
                        continue
                    tokens = segment_tokens(record["grid"], model.num_prefix_tokens)
                    if tokens > batch_tokens:
                        _oversize(record, tokens, batch_tokens, max_tokens, oversize)
                        alone[record["path"]] = tokens
                    for pack in packer.add(record, tokens):
                        bar.update(runner.run(pack.items, pack.tokens))
                        _show_rate(bar, runner.tokens, start)
            for pack in packer.flush():
                bar.update(runner.run(pack.items, pack.tokens))
            bar.update(runner.finish())
            writer.close()
        _barrier(world)
        records = store.done()
        return EmbedSummary(
            total=len(paths),
            embedded=sum(1 for p in paths if records.get(p, {}).get("status") == "ok"),
            skipped={p: records[p]["reason"] for p in paths if records.get(p, {}).get("status") == "error"},
            new=len(mine),
            tokens=runner.tokens,
            seconds=time.perf_counter() - start,
            lost=repair.lost,
            oversize=alone,
        )
    finally:
        store.release()
        if owns_group:
            dist.destroy_process_group()


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


def _show_rate(bar: tqdm, tokens: int, start: float) -> None:
    if not bar.disable:
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s", refresh=False)


def _check_save(save: Sequence[str]) -> tuple[str, ...]:
    if isinstance(save, str):
        save = [s.strip() for s in save.split(",") if s.strip()]
    if not save or any(s not in SAVE_CHOICES for s in save):
        raise ValueError(f"save: expected a non-empty subset of {SAVE_CHOICES}, got {save!r}")
    return tuple(s for s in SAVE_CHOICES if s in save)


class _PackRunner:
    """Runs packs through the model. On CUDA the copy of pack k's features to the host is overlapped with
    the forward of pack k + 1: results are fetched with non-blocking copies and an event, one pack late."""

    def __init__(self, model, writer: ShardWriter, save: tuple[str, ...]):
        self.model, self.writer, self.save = model, writer, save
        self.device = model.device
        self.tokens = 0
        self._in_flight: tuple | None = None

    def run(self, records: list[dict], tokens: int) -> int:
        """Launch one pack; returns how many images finished (those of the previous pack)."""
        grid = torch.tensor([(1, *r["grid"]) for r in records], dtype=torch.long)
        rows = torch.cat([r["rows"].to(self.device, non_blocking=True) for r in records])
        out = self.model(rows, grid)
        patches = out.last_hidden_state
        counts = [h * w for h, w in (r["grid"] for r in records)]
        features = {}
        if "cls" in self.save:
            features["cls"] = out.pooler_output.float()
        if "mean" in self.save:
            # Each record is one single-frame image, so its segment id is its index; the layout already
            # holds it per token on the device (no size to sync on).
            segment = out.layout.token_segment[out.layout.patch_index]
            sums = torch.zeros(len(records), patches.shape[1], device=self.device).index_add_(
                0, segment, patches.float()
            )
            features["mean"] = sums / sums.new_tensor(counts)[:, None]
        if "patches" in self.save:
            features["patches"] = patches.to(self.writer.patch_dtype)
        nonblocking = self.device.type == "cuda"
        features = {k: v.to("cpu", non_blocking=nonblocking) for k, v in features.items()}
        event = None
        if nonblocking:
            event = torch.cuda.Event()
            event.record()
        self.tokens += tokens
        finished = self.finish()
        self._in_flight = (records, counts, features, event)
        return finished

    def finish(self) -> int:
        """Hand the features of the pack in flight to the writer; returns its image count."""
        if self._in_flight is None:
            return 0
        records, counts, features, event = self._in_flight
        self._in_flight = None
        if event is not None:
            event.synchronize()
        if "patches" in features:
            features["patches"] = features["patches"].split(counts)
        for i, record in enumerate(records):
            h, w = record["grid"]
            self.writer.add(
                record["path"], {k: v[i] for k, v in features.items()}, size=list(record["size"]), grid=[1, h, w]
            )
        return len(records)


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
