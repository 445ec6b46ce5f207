"""`embed` end to end on real photographs: parity with Hugging Face, resume after a kill, torchrun."""

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
from conftest import assert_close, tiny_config

from dinov3_packing.apps.embed import EmbedReader, embed, read_manifest
from dinov3_packing.cli import main
from dinov3_packing.data.files import list_images
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.weights.load import load_checkpoint, load_packing_model, random_packing_model, reference_model

DATA = Path(__file__).parent / "data"
CKPT = "random:vits16"
CORRUPT = str(DATA / "more" / "corrupt.jpg")
ALL = dict(save=("cls", "mean", "patches"), patch_dtype=torch.float32, device="cpu", progress=False)


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for m in sorted(out.glob("manifest-*.jsonl")) for line in m.read_text().splitlines()]


def assert_complete(out: Path, paths: list[str]) -> None:
    """Every path exactly once in the manifests, every ok line's shard present, no stray files."""
    lines = manifest_lines(out)
    seen = [line["path"] for line in lines]
    assert sorted(seen) == sorted(paths), "an image is missing or recorded twice"
    shards = {line["shard"] for line in lines if line["status"] == "ok"}
    assert shards == {p.name for p in out.glob("shard-*.safetensors")}
    assert not list(out.glob(".*.tmp"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny random model (2 layers, width 32) as a checkpoint folder: cheap forwards for the tests
    about files and processes, where the model's size does not matter."""
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    random_packing_model(tiny_config(), seed=1).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One run over all test photographs, several packs and shards, 2 decoding workers."""
    out = tmp_path_factory.mktemp("single")
    summary = embed(DATA, out, CKPT, batch_tokens=300, shard_size=3, workers=2, **ALL)
    return out, summary


def test_features_equal_hf_per_image(single_run):
    """Reference: transformers DINOv3ViTModel with the same weights, one image per call, on the pixels of the
    same preprocessing (fp32, CPU). Tolerance: conftest's 1e-5 relative (summation order only)."""
    reader = EmbedReader(single_run[0])
    model = load_packing_model(CKPT)
    ref = reference_model(model)
    pre = Preprocessor.for_checkpoint(CKPT, max_tokens=1024)
    assert len(reader.paths) == 8
    for path in reader.paths:
        pixels = pre.image(path)
        with torch.no_grad():
            hf = ref(pixel_values=pixels[None])
        h, w = pixels.shape[1] // 16, pixels.shape[2] // 16
        patches = hf.last_hidden_state[0, model.num_prefix_tokens :]
        assert reader.record(path)["grid"] == [1, h, w]
        assert_close(reader.get(path, "cls"), hf.pooler_output[0])
        assert_close(reader.get(path, "mean"), patches.mean(0))
        assert_close(reader.get(path, "patches"), patches.reshape(h, w, -1))


def test_manifest_records_sizes_and_skips(single_run):
    out, summary = single_run
    assert summary.total == 9 and summary.embedded == 8
    assert list(summary.skipped) == [CORRUPT] and "OSError" in summary.skipped[CORRUPT]
    reader = EmbedReader(out)
    assert reader.skipped == summary.skipped
    # original size is after EXIF orientation: stored 108x72 (w x h), shown upright 72 wide, 108 high
    assert reader.record(DATA / "more" / "rocket_exif6.jpg")["size"] == [108, 72]
    assert len(list(out.glob("shard-*.safetensors"))) == 3  # 8 images, 3 per shard
    assert_complete(out, list_images(DATA))
    with pytest.raises(KeyError, match="skipped"):
        reader.get(CORRUPT)
    with pytest.raises(KeyError, match="path"):
        reader.get("/no/such.jpg")
    paths, x = reader.stack("mean")
    assert paths == reader.paths and x.shape == (8, 384)


def test_cli_exit_status_and_resume(tmp_path, tiny_ckpt):
    out = str(tmp_path / "cli")
    args = ["embed", str(DATA), "--ckpt", tiny_ckpt, "--out", out, "--workers", "0", "--no-progress", "--limit", "4"]
    assert main(args) == 0  # the first four files are readable
    assert len(read_manifest(out)) == 4
    assert main(args[:-2]) == 1  # resumes; the corrupt file makes it fail ...
    assert main([*args[:-2], "--allow-skipped"]) == 0  # ... unless allowed
    assert_complete(Path(out), list_images(DATA))
    assert main([*args[:-2], "--save", "cls"]) == 2  # other settings: refuses to mix
    assert main([*args[:-2], "--save", "cls", "--overwrite", "--allow-skipped"]) == 0
    assert EmbedReader(out).settings["save"] == ["cls"]
    assert_complete(Path(out), list_images(DATA))


def test_resume_repairs_what_a_kill_leaves(tmp_path, single_run):
    """Deterministic kill aftermath: a temp shard, a shard renamed but without manifest lines, a torn last
    manifest line and lost lines of the last shard. The rerun redoes exactly the missing images (and tries the
    skipped corrupt file again)."""
    out = tmp_path / "repair"
    shutil.copytree(single_run[0], out)
    manifest = out / "manifest-000.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    last = sorted({json.loads(x)["shard"] for x in lines if '"ok"' in x})[-1]
    lost = [json.loads(x) for x in lines if last in x]
    manifest.write_text("".join(x for x in lines if x not in {json.dumps(d) + "\n" for d in lost}) + '{"path": "/x')
    (out / ".shard-000-000009.safetensors.tmp").write_bytes(b"partial")
    summary = embed(DATA, out, CKPT, batch_tokens=300, shard_size=3, workers=0, **ALL)
    assert len(lost) == 2 and summary.new == len(lost) + 1
    redone = {line["path"]: line["shard"] for line in manifest_lines(out) if line["path"] in {d["path"] for d in lost}}
    assert len(redone) == 2 and not (out / ".shard-000-000009.safetensors.tmp").exists()
    assert_complete(out, list_images(DATA))
    before, after = EmbedReader(single_run[0]), EmbedReader(out)
    # Images kept from the first run are its bytes; the redone ones ran in other packs (other matrix shapes
    # in the CPU's GEMMs: on one Xeon of 2026-12-02 one element moved by 1 ulp), so they agree to the
    # summation-order tolerance of the HF parity tests, conftest's 1e-5 relative.
    for path in before.paths:
        if path in redone:
            assert_close(after.get(path, "patches"), before.get(path, "patches"))
        else:
            assert torch.equal(before.get(path, "patches"), after.get(path, "patches")), path


def test_resume_after_sigkill(tmp_path, tiny_ckpt):
    """A real kill: the CLI in a subprocess, SIGKILLed once its first shards are committed, then resumed."""
    src = tmp_path / "src"
    src.mkdir()
    n = 40
    for i in range(n):
        shutil.copy(
            DATA / ("astronaut_rgb.jpg" if i % 2 else "camera_gray.png"), src / f"{i:03d}{'.jpg' if i % 2 else '.png'}"
        )
    out = tmp_path / "out"
    options = ["--ckpt", tiny_ckpt, "--workers", "0", "--shard-size", "1", "--batch-tokens", "100", "--no-progress"]
    cmd = [sys.executable, "-m", "dinov3_packing", "embed", str(src), "--out", str(out), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_manifest(out)) < 3 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_manifest(out))
    assert 3 <= done < n
    assert main(["embed", str(src), "--out", str(out), *options]) == 0
    assert_complete(out, list_images(src))
    assert len(list(out.glob("shard-*.safetensors"))) == n


def test_torchrun_two_processes_equal_one(tmp_path, single_run):
    out = tmp_path / "two"
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dinov3_packing",
        "embed",
        str(DATA),
        "--out",
        str(out),
    ]
    cmd += ["--ckpt", CKPT, "--batch-tokens", "300", "--shard-size", "3", "--workers", "1", "--device", "cpu"]
    cmd += ["--no-progress"]
    cmd += ["--save", "cls,mean,patches", "--patch-dtype", "float32", "--allow-skipped"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.glob("manifest-*.jsonl")} == {"manifest-000.jsonl", "manifest-001.jsonl"}
    one, two = EmbedReader(single_run[0]), EmbedReader(out)
    assert one.paths == two.paths and one.skipped == two.skipped
    # Each rank packs its half of the images: other packs than the one-process run's, other matrix shapes in
    # the CPU's GEMMs (bitwise equal on some CPUs, 1 ulp apart on one Xeon of 2026-12-02), so the features
    # agree to the summation-order tolerance of the HF parity tests (conftest's 1e-5 relative).
    for path in one.paths:
        assert one.record(path)["grid"] == two.record(path)["grid"]
        for kind in ("cls", "mean", "patches"):
            assert_close(two.get(path, kind), one.get(path, kind))
    assert_complete(out, list_images(DATA))
    # a refusal (other settings) stops every rank: non-zero exit, no rank left waiting at a barrier
    refused = subprocess.run([*cmd, "--save", "cls"], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "other settings" in refused.stderr


def test_list_images_sources(tmp_path):
    folder = list_images(DATA)
    assert len(folder) == 9 and folder == sorted(folder) and CORRUPT in folder  # recursive
    listing = tmp_path / "files.txt"
    listing.write_text(f"# photos\n{DATA / 'camera_gray.png'}\n\n{DATA / 'camera_gray.png'}\nmissing.jpg\n")
    assert list_images(listing) == [str(DATA / "camera_gray.png"), str(tmp_path / "missing.jpg")]
    assert list_images(str(DATA / "*.png")) == sorted(str(p) for p in DATA.glob("*.png"))
    assert len(list_images(str(DATA / "**" / "*.jpg"))) == 5
    with pytest.raises(ValueError, match="src"):
        list_images(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    "kwargs, error, arg",
    [
        ({"save": "cls,logits"}, ValueError, "save"),
        ({"batch_tokens": 0}, ValueError, "batch_tokens"),
        ({"policy": "crop"}, ValueError, "policy"),
        ({"patch_dtype": torch.int8}, ValueError, "patch_dtype"),
        ({"ckpt": "random:vit99"}, ValueError, "ckpt"),
    ],
)
def test_bad_arguments_named(tmp_path, kwargs, error, arg):
    with pytest.raises(error, match=arg):
        embed(DATA, tmp_path, **{"ckpt": CKPT, "device": "cpu", "progress": False, **kwargs})


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-fused-mlp"], False)])
def test_cli_fused_mlp_switch_reaches_the_model(tmp_path, tiny_ckpt, monkeypatch, flag, expected):
    from dinov3_packing.apps.embed import job as embed_module

    built = []

    def recording_load(*args, **kwargs):
        loaded = load_checkpoint(*args, **kwargs)
        built.append(loaded.model.fused_mlp)
        return loaded

    monkeypatch.setattr(embed_module, "load_checkpoint", recording_load)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "camera_gray.png", src / "a.png")
    options = ["--ckpt", tiny_ckpt, "--workers", "0", "--no-progress", *flag]
    assert main(["embed", str(src), "--out", str(tmp_path / "out"), *options]) == 0
    assert built == [expected]
