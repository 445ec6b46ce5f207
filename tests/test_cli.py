"""The command line speaks to people: every error one line naming the flag and the file, exit 2; Ctrl-C one
line saying how to resume, exit 130; nothing heavy imported to parse arguments."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_embed import DATA, assert_complete, tiny_ckpt  # noqa: F401  (tiny_ckpt: fixture)

from dinov3_packing import cli
from dinov3_packing.apps.embed import EmbedReader, embed, read_manifest
from dinov3_packing.cli import main
from dinov3_packing.data.decode import DEFAULT_MAX_PIXELS
from dinov3_packing.data.files import list_images
from dinov3_packing.data.gpu_decode import DECODE_CHOICES
from dinov3_packing.data.preprocess import POLICIES

WIDE = DATA / "more" / "hubble_wide.jpg"  # 200x120 px: 8x12 patches, 96 + 5 prefix = 101 tokens
ASTRONAUT = DATA / "astronaut_rgb.jpg"  # 150x130 px: 8x9 patches, 72 + 5 = 77 tokens
MISSING_CKPT = "/no/such/checkpoint"  # an error about anything else proves the model was not loaded yet


def one_line(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def folder_of(tmp_path: Path, *files: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for f in files:
        shutil.copy(f, src / f.name)
    return src


def test_parsing_imports_no_torch_and_copies_agree():
    code = "import sys, dinov3_packing.cli; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert cli.POLICIES == POLICIES and cli.MAX_PIXELS == DEFAULT_MAX_PIXELS
    defaults = inspect.signature(embed).parameters
    assert cli.DECODE_CHOICES == DECODE_CHOICES and cli.DECODE == defaults["decode"].default
    assert cli.IMAGE_COLUMN == defaults["image_column"].default
    from dinov3_packing.apps.embed import job

    assert cli.CPU_DECODE_SHARE == job.CPU_DECODE_SHARE and defaults["cpu_decode_share"].default is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            [],
            {"compile": None, "exact": None, "decode": "cpu", "image_column": "image", "workers": None}
            | {"cpu_decode_share": None},
        ),
        (
            "--no-compile --exact --decode auto --image-column jpg --workers 3 --cpu-decode-share 0.2".split(),
            {"compile": False, "exact": True, "decode": "auto", "image_column": "jpg", "workers": 3}
            | {"cpu_decode_share": 0.2},
        ),
    ],
)
def test_embed_flags_reach_the_library(monkeypatch, capfd, flags, expected):
    """Defaults left to the library (compile on CUDA only, workers from the cores) pass None through."""
    seen = {}

    def recording_embed(src, out, ckpt, **kwargs):
        seen.update(kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr("dinov3_packing.apps.embed.embed", recording_embed)
    assert main(["embed", str(DATA), "--ckpt", "random:vits16", "--out", "x", *flags]) == 2
    assert capfd.readouterr().err.strip() == "error: recorded"
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("command", ["embed", "pca"])
def test_ckpt_is_required(tmp_path, capfd, command):
    """No silent random weights: leaving out --ckpt is a usage error that says how to ask for them."""
    out = tmp_path / ("out" if command == "embed" else "pca.png")
    target = str(DATA) if command == "embed" else str(ASTRONAUT)
    assert main([command, target, "--out", str(out)]) == 2
    line = one_line(capfd.readouterr().err)
    assert line.startswith("error: --ckpt: required") and "random:vits16" in line
    assert not out.exists()


def test_bad_flag_value_is_one_line(capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(DATA), "--ckpt", "random:vits16", "--out", "x", "--batch-tokens", "0"])
    assert exit_info.value.code == 2
    line = one_line(capfd.readouterr().err)
    assert "--batch-tokens" in line and "'0'" in line


def test_oversize_error_names_the_file_its_size_and_the_flags(tmp_path, tiny_ckpt, capfd):  # noqa: F811
    src = folder_of(tmp_path, WIDE)
    args = ["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main([*args, "--batch-tokens", "100", "--oversize", "error"]) == 2
    err = capfd.readouterr().err  # the progress bar is on: the error must still start its own line
    errors = [line for line in err.split("\n") if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --oversize: ") and "Traceback" not in err
    line = errors[0]
    assert repr(str(src / WIDE.name)) in line and "200x120 px" in line and "needs 101 tokens" in line
    assert "--batch-tokens 100" in line and "--max-tokens 1024" in line and "--oversize own" in line


def test_oversize_own_reports_each_image_once(tmp_path, tiny_ckpt, capfd):  # noqa: F811
    src = folder_of(tmp_path, WIDE, ASTRONAUT)
    shutil.copy(WIDE, src / "wide_copy.jpg")
    args = ["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main([*args, "--batch-tokens", "80", "--no-progress"]) == 0
    lines = capfd.readouterr().err.splitlines()
    for name in (WIDE.name, "wide_copy.jpg"):
        reported = [line for line in lines if f"/{name}'" in line]
        assert len(reported) == 1 and "needs 101 tokens" in reported[0] and "pack of its own" in reported[0]
    assert not [line for line in lines if ASTRONAUT.name in line]  # 77 tokens: inside the budget


def test_unusable_device_is_one_line_before_anything(tmp_path, capfd):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    out = tmp_path / "out"
    assert main(["embed", str(DATA), "--ckpt", MISSING_CKPT, "--out", str(out), "--device", device]) == 2
    line = one_line(capfd.readouterr().err)
    assert line.startswith(f"error: --device: '{device}' cannot be used here") and "--device cpu" in line
    assert not out.exists()
    assert (
        main(["pca", str(ASTRONAUT), "--ckpt", MISSING_CKPT, "--out", str(tmp_path / "p.png"), "--device", device]) == 2
    )
    assert one_line(capfd.readouterr().err).startswith("error: --device: ")


@pytest.mark.parametrize("case", ["missing", "truncated", "folder"])
def test_pca_unreadable_image_is_one_line_before_the_model(tmp_path, capfd, case):
    bad = {"missing": DATA / "no-such.jpg", "truncated": DATA / "more" / "corrupt.jpg", "folder": DATA / "more"}[case]
    args = ["pca", str(ASTRONAUT), str(bad), "--ckpt", MISSING_CKPT, "--out", str(tmp_path / "p.png")]
    assert main(args) == 2
    line = one_line(capfd.readouterr().err)
    assert line.startswith("error: images[1]: cannot read ") and repr(str(bad)) in line
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("case", ["no_folder", "is_folder", "not_png"])
def test_pca_out_is_checked_before_compute(tmp_path, capfd, case):
    out = {"no_folder": tmp_path / "missing" / "p.png", "is_folder": tmp_path / "d.png", "not_png": tmp_path / "p.jpg"}
    if case == "is_folder":
        out[case].mkdir()
    assert main(["pca", str(ASTRONAUT), "--ckpt", MISSING_CKPT, "--out", str(out[case])]) == 2
    line = one_line(capfd.readouterr().err)
    assert line.startswith("error: --out: ")


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path, tiny_ckpt):  # noqa: F811
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (decoding workers included)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        shutil.copy(ASTRONAUT, src / f"{i:03d}.jpg")
    out = tmp_path / "out"
    args = ["--ckpt", tiny_ckpt, "--workers", "1", "--shard-size", "1", "--batch-tokens", "80", "--no-progress"]
    cmd = [sys.executable, "-m", "dinov3_packing", "embed", str(src), "--out", str(out), "--device", "cpu", *args]
    # PYTHONFAULTHANDLER: should the run not exit after the interrupt, SIGABRT makes it print every
    # thread's stack, and the failure shows where it hung (it did once in CI, 2026-12-03, not reproduced).
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(read_manifest(out)) < 2 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the interrupt: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        proc.wait(timeout=30)
        pytest.fail(f"still running 60 s after the interrupt; its stacks:\n{proc.stderr.read()[-8000:]}")
    assert code == 130
    line = one_line(proc.stderr.read())
    assert line.startswith("interrupted: ") and f"kept in {out};" in line and "run the same command again" in line
    assert len(read_manifest(out)) < 30
    assert main(["embed", str(src), "--out", str(out), "--device", "cpu", *args]) == 0
    assert_complete(out, list_images(src))


def test_max_pixels_reaches_the_decoder(tmp_path, tiny_ckpt):  # noqa: F811
    """--max-pixels is the decoder's header check: a file over it is skipped with the reason (exit 1)."""
    big, small = DATA / "coffee_palette.png", DATA / "coffee_rgba.png"  # 15,000 and 9,600 pixels
    src = folder_of(tmp_path, big, small)
    out = tmp_path / "out"
    args = ["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(out), "--workers", "0", "--no-progress"]
    assert main([*args, "--max-pixels", "10000"]) == 1
    reader = EmbedReader(out)
    skipped = str(src / big.name)
    assert list(reader.skipped) == [skipped] and str(src / small.name) in reader
    assert "ImageTooLarge" in reader.skipped[skipped] and "150x100" in reader.skipped[skipped]


def test_flag_terms_rewrite_argument_names_not_paths():
    args = cli.build_parser().parse_args(["embed", "x", "--out", "y"])
    message = "out: '/data/out' is odd; /tmp/out: batch_tokens=5, pass overwrite=True or oversize=own; max_tokens"
    assert cli._in_flag_terms(message, args.flags, args.switches) == (
        "--out: '/data/out' is odd; /tmp/out: --batch-tokens 5, pass --overwrite or --oversize own; max_tokens"
    )
