"""GPU JPEG decoding (`data/gpu_decode.py`) and its routing in `embed`, run on the CPU: torchvision's
`decode_jpeg` decodes on the CPU through the same code (`device="cpu"`), so which file goes to the batch,
which falls back, EXIF orientation and the pixel arithmetic are all exercised for real.

References: Pillow's `ImageOps.exif_transpose` for orientation (exact: the same decoded pixels turned both
ways); the exact CPU path (`Preprocessor(exact=True)`) for rows, whose decode, float resize and normalize
the GPU path repeats (tolerance 1e-5 relative: the normalization is folded into one multiply-add).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image, ImageOps
from test_embed import DATA

from dinov3_packing.apps.embed import job
from dinov3_packing.cli import main
from dinov3_packing.data import gpu_decode
from dinov3_packing.data.gpu_decode import GpuJpegDecoder, plan_jpeg, resolve_decode, upright
from dinov3_packing.data.preprocess import Preprocessor

torchvision_io = pytest.importorskip("torchvision.io")  # optional dependency; installed in the test environment

PRE = Preprocessor(max_tokens=1024)
EXACT = Preprocessor(max_tokens=1024, exact=True)
ASTRONAUT = DATA / "astronaut_rgb.jpg"


def cpu_decoder(fail_on: bytes | None = None) -> GpuJpegDecoder:
    """The GPU decoder's code on the CPU; `fail_on`: bytes the decode function refuses, as nvJPEG refuses
    what it does not support (the batch fails, then that file alone)."""

    def decode(data, device):
        if fail_on is not None and any(d.numpy().tobytes() == fail_on for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return torchvision_io.decode_jpeg(data, mode=torchvision_io.ImageReadMode.RGB, device=device)

    return GpuJpegDecoder(PRE, "cpu", decode_fn=decode)


def jpeg_bytes(image: Image.Image, orientation: int = 1, **options) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def test_plan_routes_by_header():
    rgb, gray = ASTRONAUT.read_bytes(), jpeg_bytes(Image.open(DATA / "camera_gray.png").convert("L"))
    assert plan_jpeg(rgb, "a", PRE).target == PRE.target_size(130, 150)
    assert plan_jpeg(gray, "g", PRE) is not None  # nvJPEG expands grayscale to RGB itself
    rotated = plan_jpeg((DATA / "more" / "rocket_exif6.jpg").read_bytes(), "r", PRE)
    assert rotated.orientation == 6 and rotated.original == (108, 72)  # upright size, as the CPU path records
    for cpu_only in (DATA / "camera_gray.png", DATA / "coffee_rgba.png", DATA / "more" / "chelsea_cmyk.jpg"):
        assert plan_jpeg(cpu_only.read_bytes(), cpu_only.name, PRE) is None, cpu_only
    assert plan_jpeg(b"\xff\xd8\xff garbage", "x", PRE) is None  # unreadable header: the CPU path says why
    small_limit = Preprocessor(max_tokens=1024, max_pixels=1000)
    assert plan_jpeg(rgb, "a", small_limit) is None  # over max_pixels: the CPU path drafts it or refuses it


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_like_pillow(orientation):
    stored = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    im = Image.fromarray(stored.permute(1, 2, 0).numpy())
    im.getexif()[0x0112] = orientation
    expected = torch.from_numpy(np.array(ImageOps.exif_transpose(im))).permute(2, 0, 1)
    assert torch.equal(upright(stored, orientation), expected)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_gpu_path_rows_equal_the_exact_cpu_path(orientation):
    data = jpeg_bytes(Image.open(DATA / "more" / "hubble_wide.jpg"), orientation)
    plan = plan_jpeg(data, "h", PRE)
    ((rows, grid),) = cpu_decoder().decode([plan])
    ref_rows, ref_grid, ref_size = EXACT.rows(data)
    assert grid == ref_grid and plan.original == ref_size
    assert_close(rows, ref_rows)


def test_embed_routing_fallbacks_and_skips():
    """A chunk as a worker makes it with GPU decoding on, then decoded in the main process: JPEGs through
    the batch, other files on the CPU in the worker, a JPEG the device refuses on the CPU in the main
    process, a truncated JPEG skipped with the CPU decoder's reason."""
    good = ASTRONAUT.read_bytes()
    refused = jpeg_bytes(Image.open(ASTRONAUT), 8, subsampling=0)
    truncated = good[: len(good) // 2]
    files = {
        "good.jpg": good,
        "refused.jpg": refused,
        "truncated.jpg": truncated,
        "palette.png": (DATA / "coffee_palette.png").read_bytes(),
        "cmyk.jpg": (DATA / "more" / "chelsea_cmyk.jpg").read_bytes(),
        "missing.jpg": FileNotFoundError(2, "No such file or directory"),
    }
    units = job.DecodedUnits([], PRE, gpu=True)
    chunk = [units.decoded(key, data) for key, data in files.items()]
    assert [("job" in r, "rows" in r, "error" in r) for r in chunk] == [
        (True, False, False),
        (True, False, False),
        (True, False, False),
        (False, True, False),
        (False, True, False),
        (False, False, True),
    ]
    out = {r["path"]: r for r in job.decode_on_device(cpu_decoder(fail_on=refused), PRE, chunk)}
    assert list(out) == list(files)
    # the device's rows repeat the exact path's arithmetic; every CPU decode is the default (fast) path
    expected = {"good.jpg": EXACT, "refused.jpg": PRE, "palette.png": PRE, "cmyk.jpg": PRE}
    for key, pre in expected.items():
        ref_rows, ref_grid, ref_size = pre.rows(files[key])
        assert out[key]["grid"] == ref_grid and tuple(out[key]["size"]) == ref_size, key
        assert_close(out[key]["rows"], ref_rows)
    assert out["truncated.jpg"]["error"].startswith("OSError: ")
    assert out["missing.jpg"]["error"].startswith("FileNotFoundError: ")


def test_asking_for_gpu_decoding_where_it_cannot_run_is_one_error(tmp_path, capfd, monkeypatch):
    assert resolve_decode("auto", torch.device("cpu"), exact=False) == "cpu"
    assert resolve_decode("cpu", torch.device("cpu"), exact=True) == "cpu"
    with pytest.raises(ValueError, match="decode: expected one of"):
        resolve_decode("nvjpeg", torch.device("cpu"), exact=False)
    with pytest.raises(ValueError, match=r"decode: 'gpu' .*exact path"):
        resolve_decode("gpu", torch.device("cpu"), exact=True)
    out = tmp_path / "out"
    args = ["embed", str(DATA), "--ckpt", "/no/such/ckpt", "--out", str(out), "--device", "cpu", "--decode", "gpu"]
    assert main(args) == 2  # refused before the checkpoint is looked at
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: --decode: 'gpu' needs CUDA and torchvision") and "\n" not in err
    assert err.endswith("pass --decode cpu")
    monkeypatch.setattr(gpu_decode.importlib.util, "find_spec", lambda name: None)
    assert "torchvision is not installed" in gpu_decode.gpu_decoding_missing()
    with pytest.raises(ValueError, match="torchvision is not installed"):
        GpuJpegDecoder(PRE, "cpu")


def test_the_pixel_path_is_part_of_the_settings(tmp_path):
    """exact, max_pixels and decode shape the features: run.json records them and a resume with another
    pixel path is refused instead of mixing fast and exact features in one folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(ASTRONAUT.read_bytes())
    out = tmp_path / "out"
    options = dict(device="cpu", progress=False, workers=0)
    job.embed(src, out, "random:vits16", **options)
    settings = json.loads((out / "run.json").read_text())
    assert (settings["exact"], settings["max_pixels"], settings["decode"]) == (False, 64_000_000, "cpu")
    with pytest.raises(ValueError, match=r"other settings.*'exact': \(False, True\)"):
        job.embed(src, out, "random:vits16", exact=True, **options)
