"""The `embed` output folder (`apps/embed/store.py`) says only what it holds: one run at a time, shard names
never reused, every shard checked before its rows are served, skipped files retried.

Reference for features: a fresh single run of the same command into an empty folder (tiny random model, fp32,
CPU). Tolerance: 1e-6 relative (`assert_close`): an image's features do not depend on its pack partners
beyond summation order, while a row served from the wrong shard is another image's feature, off by O(1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from test_embed import DATA, assert_complete, manifest_lines, tiny_ckpt  # noqa: F401  (tiny_ckpt: fixture)

from dinov3_packing.apps.embed import EmbedReader, embed, read_manifest
from dinov3_packing.apps.embed.store import LOCK, OutputFolder
from dinov3_packing.cli import main
from dinov3_packing.data.files import list_images

FAST = dict(workers=0, progress=False, device="cpu", save=("cls", "mean", "patches"), patch_dtype=torch.float32)
CHATTR = shutil.which("chattr")
PHOTOS = ["astronaut_rgb.jpg", "camera_gray.png", "coffee_rgba.png", "coffee_palette.png"]


def photo_folder(root: Path, n: int) -> Path:
    """`n` readable photographs (copies of the test photographs under distinct names)."""
    src = root / "src"
    src.mkdir()
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        shutil.copy(DATA / name, src / f"{i:03d}_{name}")
    return src


def assert_same_features(out: Path, fresh: Path) -> None:
    got, ref = EmbedReader(out), EmbedReader(fresh)
    assert got.paths == ref.paths
    for path in ref.paths:
        for kind in ("cls", "mean", "patches"):
            assert_close(got.get(path, kind), ref.get(path, kind), rel_tol=1e-6)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_ckpt):  # noqa: F811
    """A finished run over 7 photographs, 3 images per shard (3 shards), and a copy made by a fresh run."""
    root = tmp_path_factory.mktemp("finished")
    src = photo_folder(root, 7)
    embed(src, root / "fresh", tiny_ckpt, shard_size=3, **FAST)
    return src, root / "fresh"


def test_reader_refuses_a_folder_of_another_format(tmp_path, finished):
    out = tmp_path / "out"
    shutil.copytree(finished[1], out)
    settings = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**settings, "format": "dinov3-packing-embed/1"}))
    with pytest.raises(ValueError, match="format 'dinov3-packing-embed/1'"):
        EmbedReader(out)


def _damage_missing(out: Path, shard: Path, other: Path) -> None:
    shard.unlink()


def _damage_replaced(out: Path, shard: Path, other: Path) -> None:
    shutil.copy(other, shard)  # a real shard, of another run, under this shard's name


def _damage_truncated(out: Path, shard: Path, other: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _damage_row_out_of_range(out: Path, shard: Path, other: Path) -> None:
    manifest = out / "manifest-000.jsonl"
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    for line in lines:
        if line.get("shard") == shard.name and line["row"] == 0:
            line["row"] = 99
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_damage_missing, "is missing"),
        (_damage_replaced, "is not the shard the manifest names"),
        (_damage_truncated, "cannot be read"),
        (_damage_row_out_of_range, "holds 3 rows, the manifest names row 99"),
    ],
)
def test_damaged_shard_is_refused_by_the_reader_and_embedded_again(tmp_path, finished, tiny_ckpt, damage, problem):  # noqa: F811
    src, fresh = finished
    out = tmp_path / "out"
    shutil.copytree(fresh, out)
    shards = sorted(out.glob("shard-*.safetensors"))
    victim = shards[1]
    held = sorted(line["path"] for line in manifest_lines(out) if line.get("shard") == victim.name)
    assert len(held) == 3
    damage(out, victim, shards[0])
    with pytest.raises(ValueError, match=rf"shard '{victim.name}'.*{problem}"):
        EmbedReader(out)
    args = ["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(out), "--workers", "0", "--no-progress"]
    args += ["--shard-size", "3", "--save", "cls,mean,patches", "--patch-dtype", "float32", "--device", "cpu"]
    summary = embed(src, out, tiny_ckpt, shard_size=3, **FAST)
    assert sorted(summary.lost) == held and summary.new == 3  # exactly the images of the damaged shard
    assert all(victim.name in why and problem in why for why in summary.lost.values())
    assert summary.embedded == summary.total == 7
    assert_complete(out, list_images(src))
    assert_same_features(out, fresh)
    assert main(args) == 0  # nothing left to do


def test_deleted_shard_of_a_finished_run_is_reported_and_embedded_again(tmp_path, finished, tiny_ckpt, capfd):  # noqa: F811
    """The issue's case through the CLI: delete one shard, run the same command: exit 0, the lost images
    are named on stderr, embedded again, and every image is served its own features."""
    src, fresh = finished
    out = tmp_path / "out"
    shutil.copytree(fresh, out)
    victim = sorted(out.glob("shard-*.safetensors"))[0]
    held = [line["path"] for line in manifest_lines(out) if line.get("shard") == victim.name]
    victim.unlink()
    args = ["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(out), "--workers", "0", "--no-progress"]
    args += ["--shard-size", "3", "--save", "cls,mean,patches", "--patch-dtype", "float32", "--device", "cpu"]
    capfd.readouterr()
    assert main(args) == 0
    err = capfd.readouterr().err
    assert f"embedding 3 images again: shard '{victim.name}' is missing" in err
    assert all(path in err for path in held)
    assert "7 of 7 images embedded" in err
    assert not victim.exists()
    assert_complete(out, list_images(src))
    assert_same_features(out, fresh)


def test_newest_shard_deleted_after_a_kill_is_never_served(tmp_path, tiny_ckpt):  # noqa: F811
    """The issue's case: SIGKILL a real run, delete the newest shard, resume. The resumed run's shards get
    new names, so the lines that named the deleted shard cannot point into a new one: those images are
    embedded again and every image matches a fresh run."""
    src = photo_folder(tmp_path, 24)
    fresh = tmp_path / "fresh"
    embed(src, fresh, tiny_ckpt, shard_size=1, **FAST)
    out = tmp_path / "out"
    args = ["--ckpt", tiny_ckpt, "--workers", "0", "--shard-size", "1", "--no-progress", "--device", "cpu"]
    args += ["--save", "cls,mean,patches", "--patch-dtype", "float32", "--batch-tokens", "200"]
    cmd = [sys.executable, "-m", "dinov3_packing", "embed", str(src), "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_manifest(out)) < 4 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = {line["shard"] for line in manifest_lines(out) if line["status"] == "ok"}
    newest = max(committed, key=lambda name: (out / name).stat().st_mtime_ns)
    lost = [line["path"] for line in manifest_lines(out) if line.get("shard") == newest]
    (out / newest).unlink()
    summary = embed(src, out, tiny_ckpt, shard_size=1, batch_tokens=200, **FAST)
    assert sorted(summary.lost) == sorted(lost)
    names = {p.name for p in out.glob("shard-*.safetensors")}
    assert newest not in names and len(names) == 24  # no name written twice
    assert_complete(out, list_images(src))
    assert_same_features(out, fresh)


def test_second_run_on_the_same_folder_is_refused_at_once(tmp_path, tiny_ckpt, capfd):  # noqa: F811
    """Two runs on one --out: the second one (plain, then with --overwrite) exits 2 with one line naming the
    folder and the holder, and the first run finishes complete and untouched."""
    src = photo_folder(tmp_path, 40)
    out = tmp_path / "out"
    args = ["--ckpt", tiny_ckpt, "--workers", "0", "--shard-size", "1", "--no-progress", "--device", "cpu"]
    cmd = [sys.executable, "-m", "dinov3_packing", "embed", str(src), "--out", str(out), *args]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not read_manifest(out) and first.poll() is None:
        time.sleep(0.005)
    assert first.poll() is None, f"the first run ended too soon: {first.stderr.read()[-2000:]}"
    capfd.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["embed", str(src), "--out", str(out), *args, *extra]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --out: ")
        assert repr(str(out)) in err and f"pid {first.pid}" in err and "another embed run" in err
        assert first.poll() is None, "the refused run stopped the first one"
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert_complete(out, list_images(src))
    assert main(["embed", str(src), "--out", str(out), *args]) == 0  # the lock went with its holder


HOLD_LOCK = """
import sys, time
from dinov3_packing.apps.embed.store import OutputFolder
OutputFolder(sys.argv[1]).acquire({}, overwrite=True)
print("locked", flush=True)
time.sleep(600)
"""


def test_killed_holder_leaves_no_lock(tmp_path, tiny_ckpt):  # noqa: F811
    """A stale lock: the holder is SIGKILLed while holding it; the kernel drops the flock, so the next run
    takes over at once (the file still names the dead holder)."""
    src = photo_folder(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=rf"another embed run \(host .*, pid {holder.pid},"):
        embed(src, out, tiny_ckpt, **FAST)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (out / LOCK).read_text()
    summary = embed(src, out, tiny_ckpt, **FAST)
    assert summary.embedded == 2


RANK_OUTCOME = """
import os, sys
from dinov3_packing.apps.embed import embed
src, out, ckpt, record = sys.argv[1:]
try:
    embed(src, out, ckpt, workers=0, device="cpu", progress=False)
    outcome = "embedded"
except ValueError as e:
    outcome = f"ValueError: {e}"
with open(f"{record}-{os.environ['RANK']}", "w") as f:
    f.write(outcome)
"""


def test_torchrun_ranks_share_one_lock_and_a_refusal_stops_all(tmp_path, tiny_ckpt):  # noqa: F811
    """Ranks of one torchrun job share rank 0's lock (test_embed's 2-rank run writes from both ranks);
    against another holder every rank gets the refusal (none is left waiting at a collective)."""
    src = photo_folder(tmp_path, 4)
    out = tmp_path / "out"
    script = tmp_path / "rank_outcome.py"
    script.write_text(RANK_OUTCOME)
    other = OutputFolder(out)
    other.acquire({}, overwrite=True)
    try:
        cmd = [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(src),
            str(out),
            tiny_ckpt,
            str(tmp_path / "rank"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    finally:
        other.release()
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        outcome = (tmp_path / f"rank-{rank}").read_text()
        assert outcome.startswith("ValueError: out: ") and f"pid {os.getpid()}" in outcome, (rank, outcome)
    assert not list(out.glob("manifest-*.jsonl"))


def test_skipped_file_is_retried_and_leaves_the_list_once_fixed(tmp_path, tiny_ckpt):  # noqa: F811
    src = photo_folder(tmp_path, 3)
    broken, still = src / "broken.jpg", src / "still_broken.jpg"
    shutil.copy(DATA / "more" / "corrupt.jpg", broken)
    shutil.copy(DATA / "more" / "corrupt.jpg", still)
    out = tmp_path / "out"
    first = embed(src, out, tiny_ckpt, **FAST)
    assert sorted(first.skipped) == [str(broken), str(still)]
    shutil.copy(DATA / "astronaut_rgb.jpg", broken)  # fixed
    still.write_bytes(b"not an image at all")  # broken in another way
    second = embed(src, out, tiny_ckpt, **FAST)
    assert second.new == 2 and list(second.skipped) == [str(still)]
    assert "UnidentifiedImageError" in second.skipped[str(still)]  # the fresh reason, not the old one
    assert_complete(out, list_images(src))  # one line per path: the stale error lines are gone
    reader = EmbedReader(out)
    assert str(broken) in reader and reader.skipped == second.skipped
    fresh = tmp_path / "fresh"
    embed(src, fresh, tiny_ckpt, **FAST)
    assert_same_features(out, fresh)


def test_rerun_with_nothing_to_do_changes_no_file(tmp_path, tiny_ckpt):  # noqa: F811
    src = photo_folder(tmp_path, 3)
    out = tmp_path / "out"
    embed(src, out, tiny_ckpt, **FAST)
    files = sorted(p for p in out.iterdir() if p.name != LOCK)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    summary = embed(src, out, tiny_ckpt, **FAST)
    assert summary.new == 0 and summary.embedded == 3
    assert sorted(p for p in out.iterdir() if p.name != LOCK) == files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before  # run.json included


def _read_only(folder: Path) -> None:
    """Make `folder` unwritable for this process: mode 0555, and the immutable flag where we are root (root
    ignores modes)."""
    folder.chmod(0o555)
    if os.geteuid() == 0 and CHATTR:
        subprocess.run([CHATTR, "+i", str(folder)], check=False, capture_output=True)


def _writable_again(folder: Path) -> None:
    if os.geteuid() == 0 and CHATTR:
        subprocess.run([CHATTR, "-i", str(folder)], check=False, capture_output=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("case", ["file", "parent_is_file", "read_only", "read_only_with_results"])
def test_unusable_out_is_one_line_before_the_model_loads(tmp_path, tiny_ckpt, case, capfd):  # noqa: F811
    """The checkpoint named here does not exist: had the model been loaded first, the error would be about
    --ckpt. The error names --out instead, so the folder was checked first."""
    src = photo_folder(tmp_path, 1)
    out = tmp_path / "out"
    if case == "file":
        out.write_text("x")
        expected = "is a file"
    elif case == "parent_is_file":
        (tmp_path / "parent").write_text("x")
        out = tmp_path / "parent" / "out"
        expected = "cannot write into folder"
    else:
        out.mkdir()
        if case == "read_only_with_results":
            embed(src, out, tiny_ckpt, **FAST)
        _read_only(out)
        expected = "cannot write into folder"
    try:
        if case.startswith("read_only"):
            try:
                (out / "probe").write_text("x")
            except OSError:
                pass
            else:
                pytest.skip("this machine cannot make a folder read-only for this process (chmod and chattr)")
        capfd.readouterr()
        code = main(["embed", str(src), "--ckpt", str(tmp_path / "no-such-ckpt"), "--out", str(out), "--no-progress"])
        err = capfd.readouterr().err
    finally:
        if case.startswith("read_only"):
            _writable_again(out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --out: ") and expected in err and repr(str(out)) in err


@pytest.mark.parametrize("shard_size, shard_bytes", [(3, None), (1000, 700), (4, 1)])
def test_packs_split_across_shards_store_what_images_one_by_one_store(tmp_path, monkeypatch, shard_size, shard_bytes):
    """`ShardWriter.add_pack` (what `embed` hands the writer: whole packs) closes shards at the same images
    as adding the images one by one: at `shard_size` images, or when the patch maps reach `SHARD_BYTES`, a
    pack crossing that point split there; every image's features and manifest line the same, bit for bit."""
    from safetensors.torch import load_file

    from dinov3_packing.apps.embed import store

    if shard_bytes is not None:
        monkeypatch.setattr(store, "SHARD_BYTES", shard_bytes)
    g = torch.Generator().manual_seed(0)
    sizes = [7, 1, 4, 2, 5]  # images per pack
    counts = [[int(c) for c in torch.randint(1, 9, (n,), generator=g)] for n in sizes]
    packs, images = [], []
    for p, cs in enumerate(counts):
        paths = [f"p{p}_{i}.jpg" for i in range(len(cs))]
        fields = [{"size": [10 + i, 20], "grid": [1, c, 1]} for i, c in enumerate(cs)]
        feats = {"cls": torch.randn(len(cs), 6, generator=g), "mean": torch.randn(len(cs), 6, generator=g)}
        feats["patches"] = torch.randn(sum(cs), 6, generator=g)
        pack = store.PackFeatures(paths, feats, cs, fields)
        packs.append(pack)
        images.extend(pack.records())

    def written(out: Path) -> tuple[list, list]:
        lines = manifest_lines(out)
        shards, rows = [], []
        for line in lines:
            if line["row"] == 0:
                shards.append(line["shard"])
            t = load_file(str(out / line["shard"]))
            o = t["patch_offsets"]
            n = sum(1 for other in lines if other["shard"] == line["shard"])
            # a shard holds its images' rows and nothing more
            assert t["cls"].shape[0] == t["mean"].shape[0] == len(o) - 1 == n
            assert t["patches"].shape[0] == int(o[-1])
            rows.append(
                (
                    line["path"],
                    line["size"],
                    line["grid"],
                    t["cls"][line["row"]],
                    t["mean"][line["row"]],
                    t["patches"][o[line["row"]] : o[line["row"] + 1]],
                )
            )
        layout = [[line["path"] for line in lines if line["shard"] == s] for s in shards]
        return layout, rows

    save = ("cls", "mean", "patches")
    (one := tmp_path / "one").mkdir()
    (whole := tmp_path / "whole").mkdir()
    w = store.ShardWriter(one, 0, save, torch.float32, shard_size)
    for path, features, fields in images:
        w.add(path, features, **fields)
    w.close()
    w = store.ShardWriter(whole, 0, save, torch.float32, shard_size)
    for pack in packs:
        w.add_pack(pack)
    w.close()
    layout, rows = written(whole)
    ref_layout, ref_rows = written(one)
    assert layout == ref_layout and len(layout) > 1  # shards close at the same images, and more than one
    # ... which are where the rule of one image at a time closes them (the writer's code before packs)
    expected, shard, size = [], [], 0
    for path, features, _ in images:
        shard.append(path)
        size += features["patches"].numel() * 4
        if len(shard) >= shard_size or size >= (shard_bytes or store.SHARD_BYTES):
            expected.append(shard)
            shard, size = [], 0
    expected += [shard] if shard else []
    assert layout == expected
    if shard_bytes is None:
        assert [len(s) for s in layout] == [3] * 6 + [1]
    for got, ref in zip(rows, ref_rows, strict=True):
        assert got[:3] == ref[:3]
        for a, b in zip(got[3:], ref[3:], strict=True):
            assert torch.equal(a, b)
    # and each image's features are the ones handed over
    by_path = {path: features for path, features, _ in images}
    for path, _, _, cls, mean, patches in rows:
        assert torch.equal(cls, by_path[path]["cls"]) and torch.equal(patches, by_path[path]["patches"])
        assert torch.equal(mean, by_path[path]["mean"])


def test_pack_features_refuse_mismatched_lengths():
    from dinov3_packing.apps.embed.store import PackFeatures

    with pytest.raises(ValueError, match="2 paths, 1 counts"):
        PackFeatures(["a", "b"], {}, [3], [{}, {}])
    fields = [{}, {}]
    with pytest.raises(ValueError, match=r"'cls' of shape \(1, 4\), expected \[2, D\]"):
        PackFeatures(["a", "b"], {"cls": torch.zeros(1, 4)}, [3, 4], fields)
    with pytest.raises(ValueError, match=r"'patches' of shape \(5, 4\), expected \[7, D\]"):
        PackFeatures(["a", "b"], {"patches": torch.zeros(5, 4)}, [3, 4], fields)
    PackFeatures(["a", "b"], {"cls": torch.zeros(2, 4), "patches": torch.zeros(7, 4)}, [3, 4], fields)
