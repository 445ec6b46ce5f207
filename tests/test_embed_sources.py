"""`embed` on the sources people have: WebDataset tar shards (one file, a brace list, a glob) and parquet files
(Hugging Face's `{"bytes", "path"}` struct and a plain binary column), built here with tarfile and pyarrow
from the test photographs (every colour mode, EXIF, a corrupt file).

Reference: the same images as loose files in a folder, embedded by the same call (tiny random model, fp32,
CPU). Tolerance: conftest's 1e-5 relative: an image's features depend on its pack partners only through
summation order, while an image served under another's key is off by O(1).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_close
from test_embed import DATA, manifest_lines, tiny_ckpt  # noqa: F401  (tiny_ckpt: fixture)

from dinov3_packing.apps.embed import EmbedReader, embed, read_manifest
from dinov3_packing.cli import main
from dinov3_packing.data.files import list_images
from dinov3_packing.data.sources import open_source

FAST = dict(workers=0, progress=False, device="cpu", save=("cls", "mean", "patches"), patch_dtype=torch.float32)
IMAGES = sorted(Path(p) for p in list_images(DATA))  # 8 photographs of every mode and format, one corrupt JPEG
CORRUPT = DATA / "more" / "corrupt.jpg"


def names() -> list[str]:
    """A sample name per image: what the folder, the tar members and the parquet `path` field call it."""
    return [f"{i:06d}{p.suffix}" for i, p in enumerate(IMAGES)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, count: int = 2) -> list[Path]:
    """The images as WebDataset samples (image, caption, class) over `count` shards, in order."""
    root.mkdir(parents=True, exist_ok=True)
    shards = [root / f"{s:03d}.tar" for s in range(count)]
    per = -(-len(IMAGES) // count)
    for s, shard in enumerate(shards):
        with tarfile.open(shard, "w") as tar:
            for i in range(s * per, min(len(IMAGES), (s + 1) * per)):
                key = names()[i].split(".")[0]
                add_member(tar, f"{key}.txt", f"caption {i}".encode())
                add_member(tar, names()[i], IMAGES[i].read_bytes())
                add_member(tar, f"{key}.cls", str(i).encode())
    return shards


def write_parquet(path: Path, struct: bool = True) -> Path:
    """The images as parquet rows, row groups of 3, with a label column beside the image column."""
    data = [p.read_bytes() for p in IMAGES]
    if struct:  # what `datasets.Image` writes
        column = pa.array([{"bytes": d, "path": n} for d, n in zip(data, names(), strict=True)])
    else:
        column = pa.array(data, type=pa.binary())
    table = pa.table({"label": list(range(len(data))), "image" if struct else "jpeg": column})
    pq.write_table(table, path, row_group_size=3)
    return path


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_ckpt):  # noqa: F811
    """The reference: the images as loose files, key -> (name)."""
    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder"
    folder.mkdir()
    for name, path in zip(names(), IMAGES, strict=True):
        shutil.copy(path, folder / name)
    summary = embed(folder, root / "folder-out", tiny_ckpt, batch_tokens=300, shard_size=3, **FAST)
    assert summary.embedded == len(IMAGES) - 1 and len(summary.skipped) == 1
    return root, EmbedReader(root / "folder-out"), {name: str(folder / name) for name in names()}


def assert_same_as_folder(out: Path, keys: dict[str, str], folder_run) -> None:
    """Every image of the source once in the manifests, each with the folder run's features, grid, size and
    skip status; `keys` maps sample names to the source's record keys."""
    _, ref, ref_keys = folder_run
    lines = manifest_lines(out)
    assert sorted(line["path"] for line in lines) == sorted(keys.values()), "an image is missing or recorded twice"
    got = EmbedReader(out)
    for name, key in keys.items():
        ref_key = ref_keys[name]
        if ref_key in ref.skipped:
            assert key in got.skipped and got.skipped[key].split(":")[0] == ref.skipped[ref_key].split(":")[0]
            continue
        assert got.record(key)["grid"] == ref.record(ref_key)["grid"]
        assert got.record(key)["size"] == ref.record(ref_key)["size"]
        for kind in ("cls", "mean", "patches"):
            assert_close(got.get(key, kind), ref.get(ref_key, kind))


@pytest.mark.parametrize("form", ["one", "brace", "glob"])
def test_tar_shards_give_the_folder_features(tmp_path, tiny_ckpt, folder_run, form):  # noqa: F811
    shards = write_shards(tmp_path / "shards", count=1 if form == "one" else 3)
    src = {"one": shards[0], "brace": tmp_path / "shards" / "{000..002}.tar", "glob": tmp_path / "shards" / "*.tar"}
    out = tmp_path / "out"
    summary = embed(src[form], out, tiny_ckpt, batch_tokens=300, shard_size=3, **FAST)
    keys = {r.key.rsplit("/", 1)[1]: r.key for r in open_source(src[form])}
    assert sorted(keys) == sorted(names()) and summary.total == len(IMAGES)
    assert_same_as_folder(out, keys, folder_run)
    # the key is the shard and the member, as `EmbedReader.get` takes it
    member = next(n for n, p in zip(names(), IMAGES, strict=True) if p.name == "astronaut_rgb.jpg")
    shard = next(s for s in shards if member in tarfile.open(s).getnames())
    reader = EmbedReader(out)
    assert_close(reader.get(f"{shard}/{member}"), folder_run[1].get(folder_run[2][member]))


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_gives_the_folder_features(tmp_path, tiny_ckpt, folder_run, struct):  # noqa: F811
    path = write_parquet(tmp_path / "train-00000.parquet", struct=struct)
    out = tmp_path / "out"
    column = "image" if struct else "jpeg"
    summary = embed(path, out, tiny_ckpt, image_column=column, batch_tokens=300, shard_size=3, **FAST)
    keys = {name: f"{path}/{row}" for row, name in enumerate(names())}
    assert summary.total == len(IMAGES)
    assert_same_as_folder(out, keys, folder_run)
    assert EmbedReader(out).record(f"{path}/0")["status"] == "ok"


def test_parquet_and_shards_through_the_cli_with_workers(tmp_path, tiny_ckpt, folder_run):  # noqa: F811
    """Several worker processes over whole units (tar runs, parquet row groups): still each image once."""
    write_shards(tmp_path / "data", count=2)
    write_parquet(tmp_path / "data" / "rows.parquet")
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "data" / "*"), "--ckpt", tiny_ckpt, "--out", str(out), "--workers", "2"]
    args += ["--save", "cls,mean,patches", "--patch-dtype", "float32", "--batch-tokens", "300", "--no-progress"]
    assert main([*args, "--device", "cpu", "--allow-skipped"]) == 0
    records = open_source(tmp_path / "data" / "*")
    assert len(records) == 2 * len(IMAGES)
    tar_keys = {r.key.rsplit("/", 1)[1]: r.key for r in records if ".tar/" in r.key}
    assert_same_as_folder_subset(out, tar_keys, folder_run)
    parquet_keys = {name: str(tmp_path / "data" / "rows.parquet") + f"/{row}" for row, name in enumerate(names())}
    assert_same_as_folder_subset(out, parquet_keys, folder_run)
    assert sorted(line["path"] for line in manifest_lines(out)) == sorted(r.key for r in records)


def assert_same_as_folder_subset(out: Path, keys: dict[str, str], folder_run) -> None:
    _, ref, ref_keys = folder_run
    got = EmbedReader(out)
    for name, key in keys.items():
        if ref_keys[name] in ref.skipped:
            assert key in got.skipped
        else:
            assert_close(got.get(key, "patches"), ref.get(ref_keys[name], "patches"))


def test_resume_after_sigkill_on_shards(tmp_path, tiny_ckpt):  # noqa: F811
    """A real kill of the CLI mid-run over tar shards (one image per result shard, so commits are frequent),
    then the same command again: every record once, each equal to a fresh run's."""
    root = tmp_path / "shards"
    root.mkdir()
    photos = [p for p in IMAGES if p != CORRUPT]
    for s in range(4):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for i in range(10):
                photo = photos[(s * 10 + i) % len(photos)]
                add_member(tar, f"{s}{i:05d}{photo.suffix}", photo.read_bytes())
                add_member(tar, f"{s}{i:05d}.json", b"{}")
    src = str(root / "{000..003}.tar")
    keys = [r.key for r in open_source(src)]
    assert len(keys) == 40
    fresh = tmp_path / "fresh"
    embed(src, fresh, tiny_ckpt, shard_size=1, batch_tokens=200, **FAST)
    out = tmp_path / "out"
    options = ["--ckpt", tiny_ckpt, "--workers", "0", "--shard-size", "1", "--batch-tokens", "200", "--no-progress"]
    options += ["--save", "cls,mean,patches", "--patch-dtype", "float32", "--device", "cpu"]
    cmd = [sys.executable, "-m", "dinov3_packing", "embed", src, "--out", str(out), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_manifest(out)) < 3 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(read_manifest(out)) < 40
    assert main(["embed", src, "--out", str(out), *options]) == 0
    lines = manifest_lines(out)
    assert sorted(line["path"] for line in lines) == sorted(keys)
    assert {line["shard"] for line in lines} == {p.name for p in out.glob("shard-*.safetensors")}
    got, ref = EmbedReader(out), EmbedReader(fresh)
    assert got.paths == ref.paths == sorted(keys)
    for key in keys:
        for kind in ("cls", "mean", "patches"):
            assert_close(got.get(key, kind), ref.get(key, kind))


def test_a_parquet_without_the_column_is_refused_naming_the_flag(tmp_path, capfd):
    path = write_parquet(tmp_path / "rows.parquet")
    args = ["embed", str(path), "--ckpt", "/no/such/ckpt", "--out", str(tmp_path / "out"), "--image-column", "img"]
    assert main(args) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: --image-column: ") and "no column 'img'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
