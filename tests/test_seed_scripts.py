"""The seed document's interface: scripts run from model_factory/ as the seed shows them, the CLI, and the
`DINOv3ViTPacking` wrapper's defaults.

The scripts run as subprocesses with this interpreter, offline (HF_HUB_OFFLINE=1), on `random:vits16`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, random_images, reference_per_image

import dinov3_packing
from dinov3_packing import pack, reference_model
from dinov3_packing.apps.align import align, random_tests
from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.ops import sdpa

MODEL_FACTORY = Path(__file__).resolve().parents[1] / "model_factory"
SUMMARY = ("Max Diff:", "Mean Diff:", "Min Cosine Sim:", "Mean Cosine Sim:", "Max Cosine Sim:")


def _run(*args: str, cwd: Path = MODEL_FACTORY) -> subprocess.CompletedProcess:
    # One thread: on a busy 2-core machine, spinning OpenMP workers cost ~3x the CPU time (measured).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _value(stdout: str, label: str) -> float:
    return float(re.search(rf"^{re.escape(label)}\s+(\S+)", stdout, re.MULTILINE).group(1))


def _assert_passed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL TESTS PASSED" in proc.stdout and "FAIL" not in proc.stdout
    for label in SUMMARY:
        assert label in proc.stdout, label
    # The tool's own bars (fp32): cosine >= 0.99 (the seed's threshold) and max rel diff <= 1e-5.
    assert _value(proc.stdout, "Min Cosine Sim:") >= 0.99999
    assert _value(proc.stdout, "Max Rel Diff:") <= 1e-5


def test_imports_script():
    proc = _run("test_dinov3_imports.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "✓ Successfully imported Dinov3" in lines
    assert "✓ Successfully imported DINOv3ViTPacking" in lines
    assert "All imports successful!" in lines


def test_align_script_random_inputs():
    proc = _run(
        "align_dinov3_packing.py", "--ckpt", "random:vits16", "--device", "cpu", "--image_size", "64",
        "--batch_size", "2", "--threshold", "0.99",
    )  # fmt: skip
    _assert_passed(proc)
    assert "Patch size: 16" in proc.stdout
    for name in ("uniform 2x64", "non-square", "mixed sizes", "clip t=2 + image"):
        assert name in proc.stdout


def test_align_script_real_images():
    proc = _run("align_dinov3_packing.py", "--ckpt", "random:vits16", "--device", "cpu", "--image_size", "32",
                "--use_real_images")  # fmt: skip
    _assert_passed(proc)
    assert f"Real images: {len(sample_image_paths())} from the bundled samples" in proc.stdout
    assert "real images [patches]" in proc.stdout


def test_align_script_failure_exits_nonzero():
    """An unreachable bar (bit-identical fp32) must fail: the models differ by ~1e-6 in summation order."""
    proc = _run("align_dinov3_packing.py", "--ckpt", "random:vits16", "--device", "cpu", "--image_size", "16",
                "--threshold", "1.0", "--rtol", "1e-12")  # fmt: skip
    assert proc.returncode != 0
    assert any(line.startswith("FAIL: ") for line in proc.stdout.splitlines()), proc.stdout
    assert "ALL TESTS PASSED" not in proc.stdout
    assert _value(proc.stdout, "Max Rel Diff:") > 1e-12  # consistent with the reported failure


def test_cli_align_with_image_dir(tmp_path):
    for path in sample_image_paths()[:2]:
        shutil.copy(path, tmp_path / path.name)
    proc = _run("-m", "dinov3_packing", "align", "--ckpt", "random:vits16", "--device", "cpu", "--image_size", "48",
                "--use_real_images", "--image_dir", str(tmp_path), cwd=MODEL_FACTORY.parent)  # fmt: skip
    _assert_passed(proc)
    assert f"Real images: 2 from {tmp_path}" in proc.stdout


@pytest.mark.parametrize("script", [("-m", "dinov3_packing", "align"), ("align_dinov3_packing.py",)])
def test_bad_ckpt_is_one_line_not_a_traceback(script):
    proc = _run(*script, "--ckpt", "random:vit99", "--device", "cpu")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ckpt: "), proc.stderr  # in flag terms


@pytest.mark.parametrize("image_size", [16, 24, 48, 64, 100, 224])
def test_align_random_tests_are_patch_multiples(image_size):
    for name, images in random_tests(2, image_size, 16).items():
        for img in images:
            assert img.shape[-2] % 16 == 0 and img.shape[-1] % 16 == 0, (name, tuple(img.shape))
    sizes = {tuple(img.shape[-2:]) for images in random_tests(2, image_size, 16).values() for img in images}
    assert len(sizes) >= 4 and (16, 16) in sizes  # mixed sizes, a 1x1 grid among them


def test_align_detects_a_real_bug(monkeypatch, capsys):
    """With attention leaking across images (a real packing bug), the seed's default bars report FAIL."""
    import torch.nn.functional as F

    def leaky(q, k, v, runs, dropout_p):
        return F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)

    monkeypatch.setattr(sdpa, "sdpa_runs", leaky)
    assert align(ckpt="random:vits16", device="cpu", image_size=16, attn_backend="sdpa") is False
    assert "FAIL: " in capsys.readouterr().out


def test_wrapper_defaults_on_cpu():
    """DINOv3ViTPacking: fp32 on CPU, .model and .patch_size, forward -> [total_patches, 384] equal to HF
    per image (conftest tolerance)."""
    packed = dinov3_packing.DINOv3ViTPacking(ckpt="random:vits16", device="cpu")
    assert packed.dtype == torch.float32 and packed.device.type == "cpu"
    assert isinstance(packed.model, dinov3_packing.DINOv3ViTPackingModel)
    assert not packed.model.training
    assert packed.patch_size == 16
    assert packed.image_mean == (0.485, 0.456, 0.406) and packed.image_std == (0.229, 0.224, 0.225)
    images = random_images([(2, 3), (1, 1)], 16, seed=0)
    hidden_states, grid = pack(images, 16)
    assert hidden_states.shape == (7, 768)
    with torch.no_grad():
        out = packed(hidden_states, grid)
    assert out.shape == (7, 384) and out.dtype == torch.float32
    refs = reference_per_image(reference_model(packed.model), images)
    assert_close(out, torch.cat([r.last_hidden_state[0, 5:] for r in refs]))


def test_seed_module_names():
    sys.path.insert(0, str(MODEL_FACTORY))
    try:
        from vit_dinov3 import Dinov3
        from vit_dinov3_packing_hf import DINOv3ViTPacking
    finally:
        sys.path.remove(str(MODEL_FACTORY))
    assert DINOv3ViTPacking is dinov3_packing.DINOv3ViTPacking
    ref = Dinov3("random:vits16", device="cpu")
    packed = DINOv3ViTPacking("random:vits16", device="cpu")
    image = random_images([(2, 3)], 16, seed=1)[0]
    with torch.no_grad():
        assert_close(packed(*pack([image], 16)), ref(image[None])[0])  # conftest tolerance
