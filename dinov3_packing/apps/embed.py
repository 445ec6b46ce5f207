"""`embed`: folders of image files -> DINOv3 features on disk, resumable, on one or many processes.

Data flow:
    list_images(src) -> skip what finished shards already hold -> this rank's share (files[rank::world])
    -> DataLoader workers decode and preprocess each file into packed rows (pinned memory)
    -> TokenBudgetPacker groups images into packs of <= batch_tokens tokens -> one packed forward per pack
    -> features buffered -> a shard is written (temp name, fsync, rename) -> its manifest lines appended

Output folder:
    run.json                         the settings that shape the features (a resumed run must match them)
    shard-RRR-NNNNNN.safetensors     `cls` [n, D] and `mean` [n, D] float32, `patches` [sum h*w, D] (chosen
                                     dtype) with `patch_offsets` [n + 1]: whatever `save` asked for
    manifest-RRR.jsonl               one line per image: path, status ("ok" or "error"), size (H, W after
                                     EXIF orientation), grid (t, h, w), shard, row; or the reason it was skipped

Nothing lost, nothing doubled: an image is done once its manifest line exists, and a line is only appended
after its shard has been renamed into place. A killed run leaves at most a temp file, shards no manifest
line points to, and a torn last line; the next run removes those and embeds exactly the images without a
line. `overwrite=True` deletes the previous results (only files of the names above) and starts over.

Multi-process: under `torchrun`, every rank embeds its share and writes its own shards and manifest; the
reader merges them. CUDA ranks use NCCL on `cuda:LOCAL_RANK`, CPU ranks gloo.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..compat.seed import default_dtype
from ..data.budget import OVERSIZE, TokenBudgetPacker, segment_tokens
from ..data.files import list_images
from ..data.preprocess import POLICIES, Preprocessor
from ..weights.load import DEFAULT_CKPT, load_packing_model, parse_device, resolve_alias

FORMAT = "dinov3-packing-embed/1"
SAVE_CHOICES = ("cls", "mean", "patches")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 1 << 30  # a shard is also closed when its patch maps reach 1 GiB
_DECODE_CHUNK = 8  # images per DataLoader item: amortizes inter-process overhead


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
    """

    total: int
    embedded: int
    skipped: dict[str, str] = field(default_factory=dict)
    new: int = 0
    tokens: int = 0
    seconds: float = 0.0

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
    ckpt: str = DEFAULT_CKPT,
    *,
    save: Sequence[str] = ("cls", "mean"),
    patch_dtype: torch.dtype = torch.float16,
    policy: str = "native",
    size: int = 224,
    min_tokens: int | None = None,
    max_tokens: int | None = 1024,
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
    """Embed every image `src` names into `out` (see the module docstring for the files written).

    Args:
        src: a folder (recursive), a list file or a glob (`images.list_images`).
        out: output folder (created).
        ckpt: checkpoint (`checkpoints.py`); its name also picks the normalization.
        save: any of "cls" (final-norm CLS token), "mean" (mean of the final-norm patch tokens), "patches"
            (the `[h, w, D]` patch map).
        patch_dtype: storage dtype of the patch maps.
        policy, size, min_tokens, max_tokens: resizing, as in `preprocess.Preprocessor`; max_tokens bounds
            the patches of one image.
        batch_tokens: token budget of one forward (prefix tokens included), see `budget.py`.
        oversize: "own" or "error" for an image above `batch_tokens`.
        device, dtype: default CUDA (`cuda:LOCAL_RANK`) in bf16 when available, else CPU in fp32.
        attn_backend, fused_mlp: the model's (`DINOv3ViTPackingModel`); `fused_mlp=False` keeps cuBLAS + GELU
            in the MLPs instead of the fused Triton kernel.
        workers: DataLoader decoding processes per rank (0: decode in the main process).
        shard_size: images per shard (a shard also closes at 1 GiB of patch maps).
        overwrite: delete earlier results in `out` first instead of resuming.
        limit: embed at most this many of the images still to do (then stop; a later call resumes).
        progress: show a progress bar (rank 0).

    Returns:
        `EmbedSummary`.

    Raises:
        ValueError / TypeError: bad arguments, or `out` holds a run with different settings.
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
    paths = list_images(src)
    out = Path(out)

    rank, world, owns_group, device = _init_distributed(device)
    try:
        dtype = dtype or default_dtype(device)
        model = load_packing_model(ckpt, device, dtype, attn_backend, fused_mlp)
        preprocessor = Preprocessor.for_checkpoint(
            resolve_alias(ckpt),
            patch_size=model.patch_size,
            policy=policy,
            size=size,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
        )
        settings = {
            "format": FORMAT,
            "ckpt": ckpt,
            "dtype": str(dtype).removeprefix("torch."),
            "policy": policy,
            "size": size if policy == "fixed" else None,
            "min_tokens": min_tokens if policy == "native" else None,
            "max_tokens": max_tokens if policy == "native" else None,
            "mean": list(preprocessor.mean),
            "std": list(preprocessor.std),
            "save": list(save),
            "patch_dtype": str(patch_dtype).removeprefix("torch.") if "patches" in save else None,
        }
        _check_out(out, settings, overwrite)  # on every rank, so that a refusal stops all of them
        _barrier(world)
        if rank == 0:
            _prepare_out(out, settings, overwrite)
        _barrier(world)
        done = read_manifest(out)
        todo = [p for p in paths if p not in done]
        if limit is not None:
            todo = todo[:limit]
        mine = todo[rank::world]

        writer = ShardWriter(out, rank, save, patch_dtype, shard_size)
        runner = _PackRunner(model, writer, save)
        packer = TokenBudgetPacker(batch_tokens, oversize=oversize)
        loader = DataLoader(
            ImageFiles(mine, preprocessor),
            batch_size=_DECODE_CHUNK,
            collate_fn=_as_list,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        bar = tqdm(total=len(mine), unit="img", disable=not progress or rank != 0, dynamic_ncols=True, smoothing=0.05)
        with torch.inference_mode():
            for batch in loader:
                for record in batch:
                    if "error" in record:
                        writer.skip(record["path"], record["error"])
                        bar.update(1)
                        continue
                    tokens = segment_tokens(record["grid"], model.num_prefix_tokens)
                    for pack in packer.add(record, tokens):
                        bar.update(runner.run(pack.items, pack.tokens))
                        _show_rate(bar, runner.tokens, start)
            for pack in packer.flush():
                bar.update(runner.run(pack.items, pack.tokens))
            bar.update(runner.finish())
        writer.close()
        bar.close()
        _barrier(world)
        records = read_manifest(out)
        return EmbedSummary(
            total=len(paths),
            embedded=sum(1 for p in paths if records.get(p, {}).get("status") == "ok"),
            skipped={p: records[p]["reason"] for p in paths if records.get(p, {}).get("status") == "error"},
            new=len(mine),
            tokens=runner.tokens,
            seconds=time.perf_counter() - start,
        )
    finally:
        if owns_group:
            dist.destroy_process_group()


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
        patch_maps = features["patches"].split(counts) if "patches" in features else [None] * len(records)
        for i, record in enumerate(records):
            self.writer.add(
                record,
                cls=features["cls"][i] if "cls" in features else None,
                mean=features["mean"][i] if "mean" in features else None,
                patches=patch_maps[i],
            )
        return len(records)


class ShardWriter:
    """Buffers one rank's features and commits them shard by shard (temp name, fsync, rename, then the
    manifest lines). Skipped files go to the manifest at once."""

    def __init__(self, out: Path, rank: int, save: tuple[str, ...], patch_dtype: torch.dtype, shard_size: int):
        self.out, self.rank, self.save, self.patch_dtype, self.shard_size = out, rank, save, patch_dtype, shard_size
        self.manifest = out / f"manifest-{rank:03d}.jsonl"
        taken = [int(p.stem.rsplit("-", 1)[1]) for p in out.glob(f"shard-{rank:03d}-*.safetensors")]
        self.next_index = max(taken, default=-1) + 1
        self._reset()

    def _reset(self) -> None:
        self._records: list[dict] = []
        self._tensors: dict[str, list[torch.Tensor]] = {k: [] for k in self.save}
        self._bytes = 0

    def add(self, record: dict, cls=None, mean=None, patches=None) -> None:
        h, w = record["grid"]
        self._records.append({"path": record["path"], "size": list(record["size"]), "grid": [1, h, w]})
        for name, value in (("cls", cls), ("mean", mean), ("patches", patches)):
            if name in self.save:
                self._tensors[name].append(value.clone())
        if patches is not None:
            self._bytes += patches.numel() * patches.element_size()
        if len(self._records) >= self.shard_size or self._bytes >= SHARD_BYTES:
            self.flush()

    def skip(self, path: str, reason: str) -> None:
        self._append([{"path": path, "status": "error", "reason": reason}])

    def flush(self) -> None:
        if not self._records:
            return
        name = f"shard-{self.rank:03d}-{self.next_index:06d}.safetensors"
        tensors = {}
        if "cls" in self.save:
            tensors["cls"] = torch.stack(self._tensors["cls"])
        if "mean" in self.save:
            tensors["mean"] = torch.stack(self._tensors["mean"])
        if "patches" in self.save:
            maps = self._tensors["patches"]
            tensors["patches"] = torch.cat(maps)
            tensors["patch_offsets"] = torch.tensor([0] + [m.shape[0] for m in maps]).cumsum(0)
        final, tmp = self.out / name, self.out / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        _fsync(tmp)
        os.replace(tmp, final)
        self._append([{**r, "status": "ok", "shard": name, "row": i} for i, r in enumerate(self._records)])
        self.next_index += 1
        self._reset()

    def close(self) -> None:
        self.flush()

    def _append(self, lines: list[dict]) -> None:
        text = "".join(json.dumps(line) + "\n" for line in lines)
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_manifest(out: str | os.PathLike) -> dict[str, dict]:
    """All manifest records in `out`, by absolute image path. Torn last lines (a killed run) are ignored."""
    records: dict[str, dict] = {}
    for manifest in sorted(Path(out).glob("manifest-*.jsonl")):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["path"]] = record
    return records


def _our_files(out: Path) -> list[Path]:
    return [*out.glob("shard-*.safetensors"), *out.glob(".shard-*.tmp"), *out.glob("manifest-*.jsonl")]


def _check_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix results of different settings in one folder (read only)."""
    if overwrite or not out.exists():
        return
    run_file = out / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != settings:
            diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
            raise ValueError(
                f"out: {str(out)!r} holds results of a run with other settings ({diff}); pass --overwrite "
                "to start over, or another --out"
            )
    elif _our_files(out):
        raise ValueError(f"out: {str(out)!r} holds shards or manifests but no run.json; pass --overwrite")


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Rank 0, before anyone reads: start over, or clear what a kill left behind."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if overwrite:
        for p in _our_files(out):
            p.unlink()
        run_file.unlink(missing_ok=True)
    run_file.write_text(json.dumps(settings, indent=1) + "\n")
    for tmp in out.glob(".shard-*.tmp"):
        tmp.unlink()
    for manifest in out.glob("manifest-*.jsonl"):
        text = manifest.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # torn last line
            manifest.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    referenced = {r.get("shard") for r in read_manifest(out).values()}
    for shard in out.glob("shard-*.safetensors"):
        if shard.name not in referenced:  # renamed, but killed before its manifest lines
            shard.unlink()


def _init_distributed(device: torch.device | str | None) -> tuple[int, int, bool, torch.device]:
    """(rank, world size, whether we created the process group, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if world <= 1:
        return 0, 1, False, device
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), owns, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class EmbedReader:
    """Loads `embed` results back by image path.

    >>> r = EmbedReader("features/")
    >>> r.get("photos/cat.jpg")            # [D] CLS (also "mean"; "patches" gives [h, w, D])
    >>> paths, x = r.stack("mean")         # every embedded image, [N, D]

    Attributes:
        settings: the run's settings (run.json).
        paths: embedded images (absolute paths), sorted.
        skipped: path -> reason for files that could not be read.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        if not (self.out / "run.json").exists():
            raise ValueError(f"out: {str(out)!r} holds no embed results (no run.json)")
        self.settings = json.loads((self.out / "run.json").read_text())
        self.records = read_manifest(self.out)
        self.paths = sorted(p for p, r in self.records.items() if r["status"] == "ok")
        self.skipped = {p: r["reason"] for p, r in sorted(self.records.items()) if r["status"] == "error"}
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str | os.PathLike) -> bool:
        return self.records.get(os.path.abspath(path), {}).get("status") == "ok"

    def record(self, path: str | os.PathLike) -> dict:
        """The manifest record of one image (path, status, size, grid, shard, row or reason)."""
        key = os.path.abspath(path)
        if key not in self.records:
            raise KeyError(f"path: {str(path)!r} is not in {str(self.out)!r}")
        return self.records[key]

    def get(self, path: str | os.PathLike, kind: str = "cls") -> torch.Tensor:
        """One image's feature: "cls" / "mean" `[D]` float32, or "patches" `[h, w, D]`."""
        if kind not in self.settings["save"]:
            raise ValueError(f"kind: expected one of the saved {self.settings['save']}, got {kind!r}")
        record = self.record(path)
        if record["status"] != "ok":
            raise KeyError(f"path: {str(path)!r} was skipped ({record['reason']})")
        f = self._file(record["shard"])
        row = record["row"]
        if kind != "patches":
            return f.get_slice(kind)[row : row + 1][0]
        start, stop = f.get_slice("patch_offsets")[row : row + 2].tolist()
        _, h, w = record["grid"]
        return f.get_slice("patches")[start:stop].reshape(h, w, -1)

    def stack(
        self, kind: str = "cls", paths: Sequence[str | os.PathLike] | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """`(paths, [N, D])` for "cls" or "mean", of `paths` (default: every embedded image, sorted)."""
        if kind == "patches":
            raise ValueError("kind: patch maps differ in size; use get(path, 'patches') per image")
        paths = self.paths if paths is None else [os.path.abspath(p) for p in paths]
        return list(paths), torch.stack([self.get(p, kind) for p in paths])

    def _file(self, shard: str):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.out / shard), framework="pt")
        return self._files[shard]
