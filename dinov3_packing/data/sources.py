"""Where the images come from: folders, list files, globs, WebDataset `.tar` shards, parquet files.

    records = open_source("shards/{000..099}.tar")   # names, tar headers and parquet metadata only
    for unit in work_units(records):                 # picklable: hand units to DataLoader workers
        for record, data in read_records(unit):      # the encoded bytes (or why they could not be read)
            ...

`open_source` lists every image of a source as a `Record` with a stable, unique `key` (the manifest path):

    loose file       its absolute path                      /data/photos/cat.jpg
    tar member       the shard's absolute path, "/", the    /data/shards/000007.tar/000123.jpg
                     member's name in the shard
    parquet row      the file's absolute path, "/", the     /data/train-00000.parquet/4711
                     row's 0-based index in the file

No key can be a real file's path (nothing lies below a regular file), so the three forms never collide.

Tar shards follow the WebDataset convention: the members of one sample share a key, the member name up to
the first dot of its base name (`000123.jpg`, `000123.json`, `000123.cls` form sample `000123`); every
image member (by extension) is a record, with its sample key in `TarRecord.sample`; other members (text,
json, class labels) are ignored. Shards must be uncompressed tar (what WebDataset and img2dataset write), so
that a member is read by seeking to it; nothing is extracted to disk.

Parquet: the image column (`image_column`, default "image") holds the encoded bytes, either as a binary
column or as Hugging Face's `{"bytes": ..., "path": ...}` struct (`datasets.Image`). Rows are read a batch
at a time from one row group, and only that column.

Records and work units are frozen dataclasses of strings and ints: they pickle, so DataLoader worker
processes (or ranks) can take whole units and read them themselves.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import IMAGE_SUFFIXES, LIST_SUFFIXES, list_images, read_list_file

TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
_BATCH_ROWS = 64  # parquet rows turned into Python bytes at a time: bounds memory for rows of large images


@dataclass(frozen=True)
class FileRecord:
    """An image file on disk; `key` is its absolute path."""

    key: str

    def read(self) -> bytes:
        return Path(self.key).read_bytes()


@dataclass(frozen=True)
class TarRecord:
    """A regular member of an uncompressed tar shard: its data is `size` bytes at `offset` in `shard`."""

    key: str
    shard: str
    sample: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            return self._read_from(f)

    def _read_from(self, f) -> bytes:
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.key}: the shard ends {self.size - len(data)} bytes into this member (truncated)")
        return data


@dataclass(frozen=True)
class ParquetRecord:
    """Row `row` (0-based, in the file) of a parquet file, in row group `row_group`, image in `column`."""

    key: str
    file: str
    row_group: int
    row: int
    column: str

    def read(self) -> bytes:
        ((_, data),) = read_records([self])
        if isinstance(data, Exception):
            raise data
        return data


Record = FileRecord | TarRecord | ParquetRecord


def open_source(src: str | os.PathLike, image_column: str = "image") -> list[Record]:
    """Every image `src` names, as records in a stable order, keys unique (module docstring: the key forms).

    `src` is one of, or a brace list of (`shards/{000..099}.tar`, `{a,b}/*.jpg`: `expand_braces`):
        a folder            its image files, searched recursively, sorted by path (tar and parquet files in
                            it are not read: img2dataset puts metadata-only parquet files beside its shards)
        a list file         `.txt` / `.lst` / `.list`, one path a line (see `files.read_list_file`); images
                            need not exist (the read reports them), shards and parquet files must
        a glob pattern      (`*`, `?`, `[`; `**` recursive): the image, `.tar` and `.parquet` files it
                            matches, sorted; anything else it matches is ignored
        a `.tar` shard, a `.parquet` file or one image file

    Reads file names, tar headers (seeking over the data) and parquet metadata, no image data.

    Raises:
        TypeError: `src` or `image_column` of the wrong type.
        ValueError: naming the file or `src`: a path that does not exist, a brace list with a missing file,
            a `.tar` that is not an uncompressed tar, a parquet file that cannot be read or has no
            `image_column` of binary or `{"bytes", "path"}` type, or no image at all.
    """
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src: expected a folder, list file, glob, .tar or .parquet path, got {type(src).__name__}")
    if not isinstance(image_column, str) or not image_column:
        raise TypeError(f"image_column: expected a column name (a non-empty string), got {image_column!r}")
    records: dict[str, Record] = {}
    for item in expand_braces(os.fspath(src)):
        for record in _records_of(item, image_column):
            records.setdefault(record.key, record)
    if not records:
        raise ValueError(f"src: no images ({', '.join(IMAGE_SUFFIXES)}) in {os.fspath(src)!r}")
    return list(records.values())


def work_units(records: Sequence[Record], max_records: int = 256) -> list[tuple[Record, ...]]:
    """Split records (in order) into units to read one at a time: runs of consecutive records from one file
    or shard, at most `max_records` long, except that the records of one parquet row group stay in one unit
    (the row group is decoded once for all of them). Give whole units to workers or ranks, not every n-th
    record, or every worker reads every row group."""
    if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1:
        raise ValueError(f"max_records: expected a positive int, got {max_records!r}")
    units: list[tuple[Record, ...]] = []
    current: list[Record] = []
    for record in records:
        if current and (_container(record) != _container(current[-1]) or _full(current, record, max_records)):
            units.append(tuple(current))
            current = []
        current.append(record)
    if current:
        units.append(tuple(current))
    return units


def read_records(records: Iterable[Record]) -> Iterator[tuple[Record, bytes | Exception]]:
    """`(record, bytes)` for each record in order, reading consecutive records of one shard through one open
    file and those of one parquet row group from one pass over it. A record that cannot be read comes with
    the exception instead of its bytes (`OSError` for a missing or truncated file, `ValueError` for a
    parquet row without bytes), so one bad record never ends a stream of millions."""
    shard_path, shard = None, None
    pending: list[ParquetRecord] = []
    try:
        for record in records:
            if pending and (not isinstance(record, ParquetRecord) or _container(record) != _container(pending[0])):
                yield from _read_parquet(pending)
                pending = []
            if isinstance(record, ParquetRecord):
                pending.append(record)
                continue
            try:
                if isinstance(record, TarRecord):
                    if record.shard != shard_path:
                        if shard is not None:
                            shard.close()
                        shard_path, shard = record.shard, open(record.shard, "rb")
                    data = record._read_from(shard)
                else:
                    data = record.read()
            except OSError as e:
                data = e
            yield record, data
        if pending:
            yield from _read_parquet(pending)
    finally:
        if shard is not None:
            shard.close()


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `a{b,c}d` -> `abd`, `acd`; `{000..099}` -> `000` ... `099` (an end
    written with a leading zero sets the width; a range may count down); several groups multiply, in
    order; groups nest. A group with neither a top-level comma nor a range (`{x}`) stays as written.

    Raises:
        ValueError: a `{` without its `}`.
    """
    start = pattern.find("{")
    while start != -1:
        end, commas = _group(pattern, start)
        body = pattern[start + 1 : end]
        bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if commas or bounds:
            if bounds:
                options = _count(*bounds.groups())
            else:
                cuts = [start, *commas, end]
                options = [pattern[a + 1 : b] for a, b in itertools.pairwise(cuts)]
            head, tail = pattern[:start], pattern[end + 1 :]
            return [out for option in options for out in expand_braces(head + option + tail)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _group(pattern: str, start: int) -> tuple[int, list[int]]:
    """The index of the `}` closing the `{` at `start`, and of the commas directly inside that group."""
    depth, commas = 0, []
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                return i, commas
        elif pattern[i] == "," and depth == 1:
            commas.append(i)
    raise ValueError(f"src: the brace at position {start} of {pattern!r} is never closed")


def _count(first: str, last: str) -> list[str]:
    a, b = int(first), int(last)
    padded = (len(first) > 1 and first[0] == "0") or (len(last) > 1 and last[0] == "0")
    width = max(len(first), len(last)) if padded else 0
    step = 1 if b >= a else -1
    return [str(n).zfill(width) for n in range(a, b + step, step)]


def _records_of(item: str, image_column: str) -> list[Record]:
    path = Path(item).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_SUFFIXES:
            return [r for line in read_list_file(path) for r in _named(line, image_column, listed=True)]
        return _named(str(path), image_column, listed=False)
    if path.is_dir():
        return [FileRecord(p) for p in list_images(path)]
    if glob.has_magic(item):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        wanted = (*IMAGE_SUFFIXES, TAR_SUFFIX, PARQUET_SUFFIX)
        files = (m for m in matches if m.lower().endswith(wanted) and Path(m).is_file())
        return [r for m in files for r in _named(m, image_column, listed=False)]
    raise ValueError(
        f"src: {item!r} does not exist (expected a folder, a list file ({', '.join(LIST_SUFFIXES)}), a glob, "
        f"an image, a {TAR_SUFFIX} shard or a {PARQUET_SUFFIX} file)"
    )


def _named(name: str, image_column: str, listed: bool) -> list[Record]:
    """The records of one named file: a shard, a parquet file or an image (one that may be missing when a
    list file names it)."""
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in (TAR_SUFFIX, PARQUET_SUFFIX) and not path.is_file():
        raise ValueError(f"src: {name!r} (named in the source) is not a file")
    if suffix == TAR_SUFFIX:
        return _tar_records(path)
    if suffix == PARQUET_SUFFIX:
        return _parquet_records(path, image_column)
    if listed or path.is_file():
        return [FileRecord(os.path.abspath(path))]
    return []


def _tar_records(path: Path) -> list[Record]:
    shard = os.path.abspath(path)
    records: dict[str, TarRecord] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed only, members found by seeking
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if member.issparse():
                    raise ValueError(f"src: {shard!r}: member {member.name!r} is a sparse file; expected regular")
                name = member.name.removeprefix("./")
                base = name.rsplit("/", 1)[-1]
                sample = name[: len(name) - len(base)] + base.split(".", 1)[0]
                # a name stored twice: the later copy wins, as when the shard is extracted
                records[name] = TarRecord(f"{shard}/{name}", shard, sample, member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ValueError(f"src: {shard!r} is not an uncompressed tar shard ({e})") from None
    return list(records.values())


def _parquet_records(path: Path, column: str) -> list[Record]:
    pq = _pyarrow_parquet()
    file = os.path.abspath(path)
    try:
        meta = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses that name nothing of ours
        raise ValueError(f"src: {file!r} is not a readable parquet file ({e})") from None
    with meta:
        schema = meta.schema_arrow
        if column not in schema.names:
            raise ValueError(
                f"image_column: {file!r} has no column {column!r} (its columns: {', '.join(schema.names)})"
            )
        if not _is_image_type(schema.field(column).type):
            raise ValueError(
                f"image_column: column {column!r} of {file!r} is {schema.field(column).type}; expected binary "
                'bytes or a {"bytes", "path"} struct'
            )
        records: list[Record] = []
        row = 0
        for group in range(meta.metadata.num_row_groups):
            for _ in range(meta.metadata.row_group(group).num_rows):
                records.append(ParquetRecord(f"{file}/{row}", file, group, row, column))
                row += 1
    return records


def _is_image_type(kind) -> bool:
    import pyarrow as pa

    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
    if any(is_type(kind) for is_type in binary):
        return True
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return any(is_type(kind.field("bytes").type) for is_type in binary)
    return False


def _read_parquet(records: list[ParquetRecord]) -> Iterator[tuple[Record, bytes | Exception]]:
    """Records of one row group of one file, in their order, from one pass over the row group."""
    import pyarrow as pa

    pq = _pyarrow_parquet()
    records = list(records)
    first, wanted = records[0], {r.row: r for r in records}
    values: dict[int, bytes | Exception] = {}
    try:
        with pq.ParquetFile(first.file) as f:
            row = sum(f.metadata.row_group(g).num_rows for g in range(first.row_group))
            batches = f.iter_batches(batch_size=_BATCH_ROWS, row_groups=[first.row_group], columns=[first.column])
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if row in wanted:
                        values[row] = _row_bytes(wanted[row], value)
                    row += 1
                while records and records[0].row in values:  # each one out as soon as it and those before are in
                    record = records.pop(0)
                    yield record, values.pop(record.row)
    except (OSError, pa.ArrowException) as e:
        for record in records:
            yield record, OSError(f"{record.key}: {e}")
        return
    for record in records:
        yield record, ValueError(f"{record.key}: the row group has no such row (the file changed since it was listed)")


def _row_bytes(record: ParquetRecord, value) -> bytes | Exception:
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None:
        return ValueError(f"{record.key}: column {record.column!r} holds no image bytes in this row")
    return data


def _container(record: Record) -> tuple:
    if isinstance(record, TarRecord):
        return ("tar", record.shard)
    if isinstance(record, ParquetRecord):
        return ("parquet", record.file, record.row_group)
    return ("files",)


def _full(unit: list[Record], record: Record, max_records: int) -> bool:
    return len(unit) >= max_records and not isinstance(record, ParquetRecord)


def _pyarrow_parquet():
    import pyarrow.parquet as pq  # imported on first use: listing folders and shards does not load Arrow

    return pq
