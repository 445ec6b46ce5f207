"""The `embed` output folder: the one source of truth about which image has which features.

Files:
    run.lock                         held (`flock`) by the run writing into the folder; names its holder
    run.json                         the settings that shape the features (a resumed run must match them)
    shard-RRR-<run>-NNNNNN.safetensors
                                     features of up to `shard_size` images of rank RRR: `cls` [n, D] and
                                     `mean` [n, D] float32, `patches` [sum h*w, D] with `patch_offsets`
                                     [n + 1]; its metadata holds a random `shard_id` and its row count
    manifest-RRR.jsonl               one line per image: path, status ("ok" or "error"), size (H, W after
                                     EXIF orientation), grid (t, h, w), shard, shard_id, row; or the reason

Guarantees:
    - One writer: a run holds an exclusive lock on `run.lock` (rank 0 for all ranks of a torchrun job)
      from its first check to its end; a second run is refused before it loads a model, `overwrite`
      included. The kernel drops the lock of a dead process, so a killed run never blocks the next one.
    - Nothing lost, nothing doubled: a shard is written to a temp name, fsynced and renamed, and only then
      are its manifest lines appended (fsynced). An image is done once its line exists.
    - Nothing served that is not there: shard names carry a random run id, so no name is ever written
      twice, and every manifest line names its shard's `shard_id`. Each start checks every shard the
      manifests reference (present, same id, row in range); the images of a shard that fails are taken
      out of the manifests, reported and embedded again. `EmbedReader` checks the same and refuses to open
      a folder that fails, naming the shard.
    - Skipped files are tried again by the next run; their old line goes once the retry has its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dinov3-packing-embed/2"
SHARD_BYTES = 1 << 30  # a shard is also closed when its patch maps reach 1 GiB
LOCK = "run.lock"
RUN = "run.json"
TEMPS = (".shard-*.tmp", ".manifest-*.tmp", f".{RUN}.tmp")  # written, fsynced, then renamed into place


def read_manifest(out: str | os.PathLike) -> dict[str, dict]:
    """All manifest records in `out`, by record key (an image's absolute path, `<shard>.tar/<member>` or
    `<file>.parquet/<row>`), as written (not checked against the shards;
    `EmbedReader` checks). Torn last lines (a killed run) are ignored."""
    return {r["path"]: r for _, r in _manifest_rows(Path(out))}


def _manifest_rows(out: Path) -> Iterable[tuple[Path, dict]]:
    for manifest in sorted(out.glob("manifest-*.jsonl")):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            yield manifest, record


def shard_problem(out: Path, shard: str, shard_id: str | None, rows: Iterable[int]) -> str | None:
    """Why the rows `rows` of `shard` cannot be served (None when they can)."""
    try:
        with safe_open(str(out / shard), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        return "is missing"
    except (SafetensorError, OSError) as e:
        return f"cannot be read ({e})"
    if meta.get("shard_id") != shard_id:
        return f"is not the shard the manifest names (id {meta.get('shard_id')!r}, expected {shard_id!r})"
    count = int(meta.get("rows", 0))
    outside = [row for row in rows if not 0 <= row < count]
    if outside:
        return f"holds {count} rows, the manifest names row {outside[0]}"
    return None


def bad_shards(out: Path, records: Iterable[dict]) -> dict[str, str]:
    """shard name -> problem, for every shard that `records` (manifest lines) reference and cannot serve."""
    ids: dict[str, set[str | None]] = {}
    rows: dict[str, list[int]] = {}
    for r in records:
        if r.get("status") == "ok":
            ids.setdefault(r["shard"], set()).add(r.get("shard_id"))
            rows.setdefault(r["shard"], []).append(r["row"])
    problems = {}
    for shard, named in ids.items():
        if len(named) > 1:
            problems[shard] = "is named with different ids in the manifests"
        elif (problem := shard_problem(out, shard, next(iter(named)), rows[shard])) is not None:
            problems[shard] = problem
    return problems


@dataclass
class Repair:
    """What a start found wrong in the folder and took out of the manifests.

    Attributes:
        shards: shard name -> problem, for each shard whose images were dropped.
        held: shard name -> the images it held (they are embedded again).
    """

    shards: dict[str, str] = field(default_factory=dict)
    held: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lost(self) -> dict[str, str]:
        """Image path -> why its features were dropped."""
        return {p: f"shard {s!r} {self.shards[s]}" for s, paths in self.held.items() for p in paths}

    def lines(self, first: int = 5) -> list[str]:
        """One line per bad shard: the problem, how many images it held and the first few of them."""
        out = []
        for shard, paths in self.held.items():
            more = f" and {len(paths) - first} more" if len(paths) > first else ""
            listed = ", ".join(paths[:first])
            out.append(f"embedding {len(paths)} images again: shard {shard!r} {self.shards[shard]} ({listed}{more})")
        return out


class OutputFolder:
    """One run's handle on its output folder: checks, the lock, repairs and the shard writers.

    Rank 0 calls `acquire` (checks, lock, settings), then `prepare` (start over or repair); every rank then
    reads `done()` and writes through `writer(rank, ...)`; rank 0 calls `release` at the end.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self._lock_fd: int | None = None

    def acquire(self, settings: dict, overwrite: bool) -> None:
        """Create the folder if needed, take its lock and check that its results were made with `settings`.

        Raises:
            ValueError: `out` is a file, cannot be created or written, is held by another run, or holds a
                run with other settings (unless `overwrite`).
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {str(out)!r} is a file; expected a folder (created when missing)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"out: cannot write into folder {str(out)!r} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ValueError(
                f"out: {str(out)!r} is being written by another embed run ({_describe(holder)}); wait for it to "
                "end or use another folder"
            ) from None
        self._lock_fd = fd
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        if not overwrite:
            self._check_settings(settings)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _check_settings(self, settings: dict) -> None:
        run_file = self.out / RUN
        if run_file.exists():
            try:
                previous = json.loads(run_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"out: {str(run_file)!r} is not valid JSON ({e}); pass overwrite=True to start over"
                ) from None
            if previous != settings:
                keys = [*settings, *(k for k in previous if k not in settings)]  # a setting either side lacks too
                diff = {k: (previous.get(k), settings.get(k)) for k in keys if previous.get(k) != settings.get(k)}
                raise ValueError(
                    f"out: {str(self.out)!r} holds results of a run with other settings ({diff}); pass overwrite=True "
                    "to start over, or use another folder"
                )
        elif self._ours():
            raise ValueError(
                f"out: {str(self.out)!r} holds shards or manifests but no {RUN}; pass overwrite=True to start over"
            )

    def _ours(self) -> list[Path]:
        out = self.out
        return [*out.glob("shard-*.safetensors"), *out.glob("manifest-*.jsonl"), *self._temps()]

    def _temps(self) -> list[Path]:
        return [p for pattern in TEMPS for p in self.out.glob(pattern)]

    def prepare(self, settings: dict, overwrite: bool) -> Repair:
        """Rank 0, under the lock, before any rank reads: start over (`overwrite`), or repair what a kill or a
        fault left behind. Changes a file only when something is wrong with it.

        Args:
            settings: written to run.json when the folder has none.
            overwrite: delete the previous results first.

        Returns:
            `Repair`: the images whose shard failed the check. Their lines are gone, as are the lines of
            skipped files, so all of them are to do.
        """
        if overwrite:
            for p in self._ours():
                p.unlink()
            (self.out / RUN).unlink(missing_ok=True)
        if not (self.out / RUN).exists():
            _write_atomic(self.out / RUN, json.dumps(settings, indent=1) + "\n")
        for tmp in self._temps():
            tmp.unlink()
        rows = list(_manifest_rows(self.out))
        latest = {r["path"]: r for _, r in rows}  # a path's last line is its state
        bad = bad_shards(self.out, latest.values())
        repair = Repair(shards=bad)
        keep: set[int] = set()  # ids of the line objects that stay: verified "ok" lines, one per path
        for r in latest.values():
            if r.get("status") != "ok":
                continue  # a skipped file: tried again
            if r["shard"] in bad:
                repair.held.setdefault(r["shard"], []).append(r["path"])
            else:
                keep.add(id(r))
        for manifest in sorted(self.out.glob("manifest-*.jsonl")):
            new = "".join(json.dumps(r) + "\n" for m, r in rows if m == manifest and id(r) in keep)
            if new != manifest.read_text(encoding="utf-8"):
                _write_atomic(manifest, new)
        referenced = {r["shard"] for r in latest.values() if id(r) in keep}
        for shard in self.out.glob("shard-*.safetensors"):
            if shard.name not in referenced:  # renamed but killed before its lines, or its lines were dropped
                shard.unlink()
        return repair

    def done(self) -> dict[str, dict]:
        """Manifest records by path (after `prepare`, every "ok" record's shard has passed the check)."""
        return read_manifest(self.out)

    def writer(self, rank: int, save: Sequence[str], patch_dtype: torch.dtype, shard_size: int) -> ShardWriter:
        return ShardWriter(self.out, rank, tuple(save), patch_dtype, shard_size)


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder not recorded yet"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class PackFeatures:
    """One pack's results as the model gave them: `features` holds one tensor per saved feature for the whole
    pack (`cls`, `mean`: `[n, D]`, row i the i-th image's; `patches`: `[sum(counts), D]`, the images' patch
    rows one after another, `counts[i]` of them for image i); `paths` and `fields` (its manifest line's
    `size` and `grid`) are per image."""

    paths: list[str]
    features: dict[str, torch.Tensor]
    counts: list[int]
    fields: list[dict]

    def __post_init__(self):
        n = len(self.paths)
        if len(self.counts) != n or len(self.fields) != n:
            raise ValueError(f"PackFeatures: {n} paths, {len(self.counts)} counts, {len(self.fields)} fields")
        # the shard's offsets come from `counts`: shapes that disagree would store rows under other images
        for name, t in self.features.items():
            rows = sum(self.counts) if name == "patches" else n
            if t.ndim != 2 or t.shape[0] != rows:
                raise ValueError(f"PackFeatures: {name!r} of shape {tuple(t.shape)}, expected [{rows}, D]")

    def records(self) -> Iterable[tuple[str, dict[str, torch.Tensor], dict]]:
        """`(path, features, fields)` per image, its features views into the pack's tensors."""
        per = {k: v.split(self.counts) if k == "patches" else v.unbind(0) for k, v in self.features.items()}
        for i, path in enumerate(self.paths):
            yield path, {k: v[i] for k, v in per.items()}, self.fields[i]


class ShardWriter:
    """Buffers one rank's features and commits them shard by shard (temp name, fsync, rename, then the
    manifest lines). Skipped files go to the manifest at once.

    `add_pack(pack)` takes a pack's `PackFeatures`: a few tensor operations per pack and feature, none per
    image (in `embed` this runs in the writer thread, and each torch call there is a moment the main loop,
    launching the next pack, may wait for the interpreter lock). A pack crossing a shard's end is split there.
    `add(path, features, **fields)` takes one image's features (`cls`, `mean`: `[D]`; `patches`: `[h*w, D]`)
    and the fields of its manifest line (`size`, `grid`).
    """

    def __init__(self, out: Path, rank: int, save: tuple[str, ...], patch_dtype: torch.dtype, shard_size: int):
        self.out, self.rank, self.save, self.patch_dtype, self.shard_size = out, rank, save, patch_dtype, shard_size
        self.manifest = out / f"manifest-{rank:03d}.jsonl"
        # A name is never written twice, even after a crash lost a shard: the manifests of earlier runs
        # may still name it.
        self.run = uuid.uuid4().hex[:12]
        self.next_index = 0
        self._reset()

    def _reset(self) -> None:
        self._records: list[dict] = []
        # per feature, pieces of packs (`cls`, `mean`: [k, D]; `patches`: [rows, D]), copied off the pack
        self._tensors: dict[str, list[torch.Tensor]] = {k: [] for k in self.save}
        self._counts: list[int] = []  # patch rows per image, in order
        self._bytes = 0

    def add(self, path: str, features: dict[str, torch.Tensor], **fields) -> None:
        """One image (a pack of one)."""
        one = {k: v if k == "patches" else v[None] for k, v in features.items()}
        counts = [features["patches"].shape[0] if "patches" in features else 1]
        self.add_pack(PackFeatures([path], one, counts, [fields]))

    def add_pack(self, pack: PackFeatures) -> None:
        start, n = 0, len(pack.paths)
        row_bytes = 0
        if "patches" in self.save:
            patches = pack.features["patches"]
            row_bytes = patches.shape[1] * patches.element_size()
        while start < n:
            # the images up to the one that fills this shard (shard_size images, or SHARD_BYTES of patches)
            end, rows = start, 0
            while end < n:
                rows += pack.counts[end]
                end += 1
                if len(self._records) + end - start >= self.shard_size or self._bytes + rows * row_bytes >= SHARD_BYTES:
                    break
            first_row = sum(pack.counts[:start])
            for name in self.save:
                whole = pack.features[name]
                piece = whole[first_row : first_row + rows] if name == "patches" else whole[start:end]
                # a copy: the pack's tensor (pinned memory on CUDA) is not held until the shard is written
                self._tensors[name].append(piece.clone())
            self._records.extend({"path": pack.paths[i], **pack.fields[i]} for i in range(start, end))
            self._counts.extend(pack.counts[start:end])
            self._bytes += rows * row_bytes
            if len(self._records) >= self.shard_size or self._bytes >= SHARD_BYTES:
                self.flush()
            start = end

    def skip(self, path: str, reason: str) -> None:
        self._append([{"path": path, "status": "error", "reason": reason}])

    def flush(self) -> None:
        if not self._records:
            return
        name = f"shard-{self.rank:03d}-{self.run}-{self.next_index:06d}.safetensors"
        shard_id = uuid.uuid4().hex
        tensors = {}
        if "cls" in self.save:
            tensors["cls"] = torch.cat(self._tensors["cls"])
        if "mean" in self.save:
            tensors["mean"] = torch.cat(self._tensors["mean"])
        if "patches" in self.save:
            tensors["patches"] = torch.cat(self._tensors["patches"]).to(self.patch_dtype)
            tensors["patch_offsets"] = torch.tensor([0, *self._counts]).cumsum(0)
        final, tmp = self.out / name, self.out / f".{name}.tmp"
        metadata = {"format": FORMAT, "shard_id": shard_id, "rows": str(len(self._records))}
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._append(
            [{**r, "status": "ok", "shard": name, "shard_id": shard_id, "row": i} for i, r in enumerate(self._records)]
        )
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


class EmbedReader:
    """Loads `embed` results back by record key: an image's path, `<shard>.tar/<member>` for a tar member,
    `<file>.parquet/<row>` for a parquet row (relative paths are taken from the working directory).

    >>> r = EmbedReader("features/")
    >>> r.get("photos/cat.jpg")            # [D] CLS (also "mean"; "patches" gives [h, w, D])
    >>> r.get("shards/000.tar/000123.jpg") # a tar member
    >>> paths, x = r.stack("mean")         # every embedded image, [N, D]

    Opening checks every shard the manifests reference (present, the id the manifest names, rows in range).

    Attributes:
        settings: the run's settings (run.json).
        paths: embedded images (absolute paths), sorted.
        skipped: path -> reason for files that could not be read.

    Raises:
        ValueError: no results in `out`, or a shard fails the check (named; running `embed` again on the
            folder embeds its images again).
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        if not (self.out / RUN).exists():
            raise ValueError(f"out: {str(out)!r} holds no embed results (no {RUN})")
        self.settings = json.loads((self.out / RUN).read_text())
        if self.settings.get("format") != FORMAT:
            raise ValueError(
                f"out: {str(out)!r} was written in format {self.settings.get('format')!r}, this reader reads "
                f"{FORMAT!r} (shards with ids); embed it again with overwrite=True"
            )
        self.records = read_manifest(self.out)
        bad = bad_shards(self.out, self.records.values())
        if bad:
            shard, problem = next(iter(bad.items()))
            count = sum(1 for r in self.records.values() if r.get("shard") == shard)
            others = f" ({len(bad) - 1} more shards fail too)" if len(bad) > 1 else ""
            raise ValueError(
                f"out: shard {shard!r} in {str(self.out)!r} {problem}; it holds {count} images{others}. Run "
                "embed again on this folder to embed them again"
            )
        self.paths = sorted(p for p, r in self.records.items() if r["status"] == "ok")
        self.skipped = {p: r["reason"] for p, r in sorted(self.records.items()) if r["status"] == "error"}
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str | os.PathLike) -> bool:
        return self.records.get(os.path.abspath(path), {}).get("status") == "ok"

    def record(self, path: str | os.PathLike) -> dict:
        """The manifest record of one image (path, status, size, grid, shard, shard_id, row or reason)."""
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
