"""Sources (`data/sources.py`): folders, list files, globs, WebDataset tar shards and parquet files, built here
from the bundled photos with tarfile and pyarrow. Reference: the same images as loose files in a folder."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.data.sources import (
    FileRecord,
    ParquetRecord,
    TarRecord,
    expand_braces,
    open_source,
    read_records,
    work_units,
)

DATA = Path(__file__).parent / "data"
# the bundled photos plus the test photos of other formats and modes (PNG palette / RGBA / 16-bit, CMYK, EXIF)
IMAGES = [
    *sample_image_paths(),
    DATA / "coffee_rgba.png",
    DATA / "more" / "camera_16bit.png",
    DATA / "more" / "rocket_exif6.jpg",
]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    (root / "nested").mkdir(parents=True)
    for i, path in enumerate(IMAGES):
        shutil.copy(path, root / ("nested" if i % 3 == 0 else "") / f"{i:06d}{path.suffix}")
    return root


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two WebDataset shards: each sample an image with a caption and a class beside it; a directory entry
    and a stray readme that no sample owns."""
    root = tmp_path / "shards"
    root.mkdir()
    for shard in range(2):
        with tarfile.open(root / f"{shard:03d}.tar", "w") as tar:
            tar.addfile(_directory("meta"))
            add_member(tar, "meta/README.md", b"not an image")
            for i in range(shard * 4, min(len(IMAGES), shard * 4 + 4)):
                key = f"{i:06d}"
                add_member(tar, f"{key}.txt", f"caption {i}".encode())
                add_member(tar, key + IMAGES[i].suffix, IMAGES[i].read_bytes())
                add_member(tar, f"{key}.cls", str(i).encode())
    return root


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.fixture
def parquet(tmp_path) -> Path:
    """Hugging Face's layout: an `image` struct {bytes, path} column beside a label, 3 rows per row group."""
    path = tmp_path / "train.parquet"
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in IMAGES]
    table = pa.table({"label": list(range(len(IMAGES))), "image": images})
    pq.write_table(table, path, row_group_size=3)
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """image index -> bytes, from the loose files"""
    return {int(Path(r.key).stem): r.read() for r in open_source(folder)}


def test_same_images_give_the_same_bytes_and_rows_from_every_source(folder, shards, parquet):
    reference = folder_bytes(folder)
    assert sorted(reference) == list(range(len(IMAGES)))
    from_tar = {int(r.sample.rsplit("/", 1)[-1]): data for r, data in read_records(open_source(shards / "*.tar"))}
    from_parquet = {i: data for i, (_, data) in enumerate(read_records(open_source(parquet)))}
    assert from_tar == reference and from_parquet == reference
    pre = Preprocessor(max_tokens=256)
    for r in open_source(folder):
        rows, grid, size = pre.rows(r.key)
        data = reference[int(Path(r.key).stem)]
        rows_from_bytes, grid_from_bytes, size_from_bytes = pre.rows(data, name="bytes")
        assert torch.equal(rows_from_bytes, rows) and (grid_from_bytes, size_from_bytes) == (grid, size)


def test_keys_are_stable_unambiguous_paths(folder, shards, parquet):
    files = open_source(folder)
    assert all(isinstance(r, FileRecord) and Path(r.key).is_file() for r in files)
    assert [r.key for r in files] == sorted(os.path.abspath(p) for p in folder.rglob("*") if p.is_file())
    tar = open_source(shards / "000.tar")
    shard = os.path.abspath(shards / "000.tar")
    assert [r.key for r in tar] == [f"{shard}/{i:06d}{IMAGES[i].suffix}" for i in range(4)]
    rows = open_source(parquet)
    assert [r.key for r in rows] == [f"{os.path.abspath(parquet)}/{i}" for i in range(len(IMAGES))]
    assert [(r.row_group, r.row) for r in rows][:4] == [(0, 0), (0, 1), (0, 2), (1, 3)]
    assert open_source(shards / "000.tar") == tar  # same listing every time
    everything = open_source(str(shards / "*.tar")) + files + rows
    assert len({r.key for r in everything}) == len(everything)


def test_tar_members_grouped_by_sample_and_non_images_ignored(shards):
    records = open_source(shards / "{000..001}.tar")
    assert all(isinstance(r, TarRecord) for r in records)
    assert [r.sample.rsplit("/", 1)[-1] for r in records] == [f"{i:06d}" for i in range(len(IMAGES))]
    assert not any(r.key.endswith((".txt", ".cls", ".md", "/meta")) for r in records)
    with tarfile.open(shards / "000.tar") as tar:
        assert {m.name for m in tar} >= {"meta", "meta/README.md", "000000.txt", "000000.cls"}


def test_webdataset_keys_with_folders_and_dots(tmp_path):
    path = tmp_path / "s.tar"
    photo = IMAGES[0].read_bytes()
    with tarfile.open(path, "w") as tar:
        add_member(tar, "./train/cat.0001.jpg", photo)  # sample key: base name up to its first dot
        add_member(tar, "./train/cat.0001.seg.png", IMAGES[5].read_bytes())
        add_member(tar, "./train/cat.0001.json", b"{}")
    records = open_source(path)
    assert [r.key.rsplit("s.tar/", 1)[1] for r in records] == ["train/cat.0001.jpg", "train/cat.0001.seg.png"]
    assert {r.sample for r in records} == {"train/cat"}
    assert records[0].read() == photo


def test_shard_patterns_agree(shards):
    braces = open_source(str(shards / "{000..001}.tar"))
    assert open_source(shards / "*.tar") == braces
    assert open_source(str(shards / "{000,001}.tar")) == braces
    assert open_source(shards / "000.tar") + open_source(shards / "001.tar") == braces


def test_list_file_and_glob_mix_images_shards_and_parquet(tmp_path, folder, shards, parquet):
    image = next(folder.glob("*.jpg"))
    listing = tmp_path / "sources.txt"
    listing.write_text(f"# mixed\n{image}\nshards/001.tar\n\n{parquet.name}\nmissing.jpg\n")
    records = open_source(listing)
    kinds = [type(r).__name__ for r in records]
    assert kinds == ["FileRecord"] + ["TarRecord"] * 4 + ["ParquetRecord"] * len(IMAGES) + ["FileRecord"]
    assert records[-1].key == str(tmp_path / "missing.jpg")  # listed images need not exist: reported on read
    globbed = open_source(str(tmp_path / "**" / "*"))
    assert {type(r) for r in globbed} == {FileRecord, TarRecord, ParquetRecord}
    assert sum(isinstance(r, FileRecord) for r in globbed) == len(IMAGES)  # the list file itself is no image


def test_parquet_binary_column_and_image_column(tmp_path):
    path = tmp_path / "img2dataset.parquet"
    pq.write_table(pa.table({"jpg": [p.read_bytes() for p in IMAGES], "caption": ["x"] * len(IMAGES)}), path)
    records = open_source(path, image_column="jpg")
    assert [data for _, data in read_records(records)] == [p.read_bytes() for p in IMAGES]
    assert records[2].read() == IMAGES[2].read_bytes()
    large = tmp_path / "large.parquet"
    pq.write_table(pa.table({"image": pa.array([IMAGES[0].read_bytes()], pa.large_binary())}), large)
    assert open_source(large)[0].read() == IMAGES[0].read_bytes()


def read_unit(unit):
    return list(read_records(unit))


def test_records_and_units_pickle_and_read_in_dataloader_workers(folder, shards, parquet):
    """Real worker processes: each takes whole units and reads them itself."""
    records = open_source(folder) + open_source(shards / "*.tar") + open_source(parquet)
    units = work_units(records, max_records=3)
    assert pickle.loads(pickle.dumps(units)) == units  # noqa: S301 (our own bytes)
    loader = DataLoader(units, batch_size=None, num_workers=2, collate_fn=read_unit)
    read = [(record.key, data) for unit in loader for record, data in unit]
    assert read == [(r.key, r.read()) for r in records]


def test_work_units_follow_containers(folder, shards, parquet):
    records = open_source(folder) + open_source(shards / "*.tar") + open_source(parquet)
    units = work_units(records, max_records=3)
    assert [r for unit in units for r in unit] == records
    for unit in units:
        containers = {(type(r), getattr(r, "shard", None), getattr(r, "file", None)) for r in unit}
        assert len(containers) == 1
        if isinstance(unit[0], ParquetRecord):
            assert len({r.row_group for r in unit}) == 1
        else:
            assert len(unit) <= 3
    groups = [unit for unit in units if isinstance(unit[0], ParquetRecord)]
    assert [len(unit) for unit in groups] == [3, 3, 2]  # one unit per row group
    with pytest.raises(ValueError, match="max_records"):
        work_units(records, max_records=0)


def test_unreadable_records_come_with_their_error(tmp_path, shards):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"image": [IMAGES[0].read_bytes(), None, IMAGES[1].read_bytes()]}), path)
    listing = tmp_path / "list.txt"
    listing.write_text("gone.jpg\n")
    shard = tmp_path / "cut.tar"
    shutil.copy(shards / "000.tar", shard)
    records = open_source(path) + open_source(listing) + open_source(shard)
    shard.write_bytes(shard.read_bytes()[: records[-1].offset + 10])  # truncated after it was listed
    results = list(read_records(records))
    assert [r for r, _ in results] == records
    errors = {r.key.rsplit("/", 1)[-1]: data for r, data in results if isinstance(data, Exception)}
    assert isinstance(errors["1"], ValueError) and "holds no image bytes" in str(errors["1"])
    assert isinstance(errors["gone.jpg"], FileNotFoundError)
    assert isinstance(errors["000003.jpg"], OSError) and "truncated" in str(errors["000003.jpg"])
    assert results[0][1] == IMAGES[0].read_bytes() and results[2][1] == IMAGES[1].read_bytes()
    assert results[-2][1] == IMAGES[2].read_bytes()  # the members before the cut still read


def _bad_inputs(tmp: Path, shards: Path, parquet: Path) -> list:
    (tmp / "noise.tar").write_bytes(os.urandom(3000))
    (tmp / "zipped.tar").write_bytes(gzip.compress((shards / "000.tar").read_bytes()))
    (tmp / "noise.parquet").write_bytes(b"PAR1 but not really")
    pq.write_table(pa.table({"label": [1, 2]}), tmp / "labels.parquet")
    return [
        (tmp / "missing", ValueError, "missing' does not exist"),
        (str(shards / "{000..002}.tar"), ValueError, "002.tar"),
        (tmp / "noise.tar", ValueError, "noise.tar' is not an uncompressed tar"),
        (tmp / "zipped.tar", ValueError, "zipped.tar' is not an uncompressed tar"),
        (tmp / "noise.parquet", ValueError, "noise.parquet' is not a readable parquet file"),
        (
            tmp / "labels.parquet",
            ValueError,
            r"image_column: .*labels.parquet' has no column 'image' \(its columns: label\)",
        ),
        (str(tmp / "{a,b.tar"), ValueError, "never closed"),
        (str(tmp / "*.nothing"), ValueError, "src: no images"),
        (3, TypeError, "src"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_inputs_name_the_file(tmp_path, shards, parquet, case):
    src, error, message = _bad_inputs(tmp_path, shards, parquet)[case]
    with pytest.raises(error, match=message):
        open_source(src)


def test_bad_image_column(tmp_path, parquet):
    with pytest.raises(ValueError, match=r"column 'label' of .*train.parquet' is int64; expected binary"):
        open_source(parquet, image_column="label")
    with pytest.raises(TypeError, match="image_column"):
        open_source(parquet, image_column="")


def test_expand_braces():
    assert expand_braces("s/{000..003}.tar") == [f"s/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}{1,2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{x}/{,y}") == ["{x}/", "{x}/y"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="never closed"):
        expand_braces("a{b")
