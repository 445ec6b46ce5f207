"""Decoding (`data/decode.py`) and the fast preprocessing path built on it: JPEG draft scale, colour modes,
EXIF, the pixel limit (header first, reduced-scale JPEGs, peak memory) and how far features move.

References: the exact path (`Preprocessor(exact=True)`: full-scale decode, float resize, itself pixel-identical
to Hugging Face for `fixed`, see test_preprocess) and Pillow's own header reading."""

from __future__ import annotations

import math
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinov3_packing.data.decode import ImageTooLarge, decode
from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.weights.load import load_packing_model

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(p for p in DATA.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "corrupt.jpg")
EXIF6 = DATA / "more" / "rocket_exif6.jpg"
# The fast path rounds the resized pixel to a uint8 level (<= 0.5/255) after Pillow's horizontal pass has
# rounded its own uint8 intermediate (<= 0.5/255, averaged by the vertical pass): at most 1/255 from the
# float path, plus float32 rounding of the reference.
UINT8_TOL = 1 / 255 + 1e-6


def camera_jpeg(path: Path, source: Path, size: tuple[int, int], orientation: int = 1) -> Path:
    """A camera-size q90 JPEG of a bundled photo, `size` = upright (width, height). With orientation 6 the
    pixels are stored a quarter turn away and the EXIF tag says how to turn them back."""
    im = Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if orientation == 6:
        im = im.transpose(Image.Transpose.ROTATE_90)  # exif_transpose undoes it with ROTATE_270
        exif[0x0112] = 6
    im.save(path, quality=90, exif=exif)
    return path


def tiny_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit grayscale PNG, compressed row by row: 13000 x 13000 is about 20 KB on disk
    and never exists decoded in this process."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# --- colour modes and EXIF on the fast path ---------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [None, 24], ids=["native", "downscaled"])
@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_fast_path_matches_exact_path_on_every_mode(path, max_tokens):
    pre = Preprocessor(max_tokens=max_tokens)
    fast, original = pre.resized(path)
    exact, exact_original = Preprocessor(max_tokens=max_tokens, exact=True).resized(path)
    assert original == exact_original and fast.shape == exact.shape and fast.dtype == torch.float32
    if Image.open(path).mode == "I;16":
        # both resize 32-bit float pixels (Pillow "F" mode / torch), summation order apart (measured 9e-7)
        assert (fast - exact).abs().max() <= 1e-5
    elif decode(path, pre.target_size).scale == 1:
        assert (fast - exact).abs().max() <= UINT8_TOL
    else:
        # hubble_wide (a star field) at 1/2 draft: libjpeg's reduced inverse DCT is a different low-pass
        # filter from a bilinear one at full scale; measured mean 1.64/255 (max 23/255 on single stars)
        assert (fast - exact).abs().mean() <= 2 / 255


def test_fast_path_modes():
    pre = Preprocessor(max_tokens=24)
    gray, _ = pre.resized(DATA / "camera_gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    palette = Image.open(DATA / "coffee_palette.png")
    assert torch.equal(pre.resized(palette)[0], pre.resized(palette.convert("RGB"))[0])
    rgba, _ = pre.resized(DATA / "coffee_rgba.png")
    assert torch.all(rgba[:, 0, 0] == 1)  # a fully transparent corner composited on white, not black
    cmyk, _ = pre.resized(DATA / "more" / "chelsea_cmyk.jpg")
    assert 0 <= cmyk.min() and cmyk.max() <= 1 and cmyk.std() > 0.1


def test_fast_path_keeps_sixteen_bits_when_resizing():
    x, _ = Preprocessor(max_tokens=8).resized(DATA / "more" / "camera_16bit.png")
    assert x.shape == (3, 48, 32)  # resized from 80 x 64
    off_grid = ((x * 255 - (x * 255).round()).abs() > 0.01).float().mean()
    assert off_grid > 0.9  # an 8-bit detour would put every value on a multiple of 1/255


def test_fast_path_applies_exif_orientation():
    stored = Image.open(EXIF6)
    x, original = Preprocessor().resized(EXIF6)
    assert original == (stored.width, stored.height)  # upright: a quarter turn from the stored pixels
    assert x.shape[1:] == Preprocessor().target_size(stored.width, stored.height)


def test_bytes_and_pil_inputs_equal_the_path():
    pre = Preprocessor(max_tokens=24)
    for path in PHOTOS:
        rows, grid, size = pre.rows(path)
        from_bytes = pre.rows(path.read_bytes(), name=path.name)
        assert torch.equal(from_bytes[0], rows) and from_bytes[1:] == (grid, size)
    pil = Image.open(EXIF6)  # a PIL image gets the same EXIF handling, without draft
    assert pre.rows(pil)[0].shape == pre.rows(EXIF6)[0].shape


# --- JPEG draft --------------------------------------------------------------------------------------------


def expected_scale(stored: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The rule: the largest libjpeg reduction whose (rounded-up) size still covers the target."""
    width, height = stored
    return max(
        s for s in (1, 2, 4, 8) if math.ceil(width / s) >= target_hw[1] and math.ceil(height / s) >= target_hw[0]
    )


@pytest.mark.parametrize("max_tokens, scale", [(None, 1), (4096, 2), (1024, 4), (64, 8)])
@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_scale_is_the_smallest_still_covering_the_target(tmp_path, max_tokens, scale, orientation):
    path = camera_jpeg(tmp_path / "cam.jpg", sample_image_paths()[0], (3024, 4032), orientation)
    pre = Preprocessor(max_tokens=max_tokens)
    target = pre.target_size(4032, 3024)
    stored = Image.open(path).size
    stored_target = target[::-1] if orientation == 6 else target
    assert expected_scale(stored, stored_target) == scale
    decoded = decode(path, pre.target_size)
    assert decoded.scale == scale and decoded.original == (4032, 3024)
    assert decoded.pixels.shape == (*target, 3) and decoded.pixels.dtype == np.uint8


def test_mpo_phone_photo_is_drafted_like_a_jpeg(tmp_path):
    """Phones write MPO (a JPEG with a second picture appended); Pillow opens it as its own format."""
    photo = Image.open(camera_jpeg(tmp_path / "cam.jpg", sample_image_paths()[0], (4032, 3024)))
    path = tmp_path / "phone.mpo"
    photo.save(path, format="MPO", save_all=True, append_images=[photo.resize((320, 240))], quality=90)
    assert Image.open(path).format == "MPO"
    pre = Preprocessor(max_tokens=1024)
    decoded = decode(path, pre.target_size)
    assert decoded.scale == 4 and decoded.pixels.shape == (*pre.target_size(3024, 4032), 3)


def test_drafted_camera_jpeg_stays_close_to_the_exact_path(tmp_path):
    path = camera_jpeg(tmp_path / "cam.jpg", sample_image_paths()[1], (4032, 3024), orientation=6)
    fast, _ = Preprocessor(max_tokens=1024).resized(path)
    exact, _ = Preprocessor(max_tokens=1024, exact=True).resized(path)
    assert fast.shape == exact.shape == (3, 432, 576)
    # measured: mean 0.27/255, max 3.1/255 (draft's DCT-domain reduction differs from a full-scale filter)
    assert (fast - exact).abs().mean() < 0.5 / 255 and (fast - exact).abs().max() < 8 / 255


# --- pixel limit -------------------------------------------------------------------------------------------


def test_image_over_the_limit_is_refused_from_its_header(tmp_path):
    path = tiny_png(tmp_path / "bomb.png", 13000, 13000)
    assert path.stat().st_size < 30_000
    for pre in (Preprocessor(), Preprocessor(exact=True), Preprocessor(policy="fixed")):
        with pytest.raises(ImageTooLarge, match=r"bomb\.png: 13000x13000 pixels \(169\.0 MP\) is over max_pixels"):
            pre.rows(path)
    with pytest.raises(ValueError, match="64000000"):  # a ValueError, naming the limit
        decode(path)
    with pytest.raises(ImageTooLarge) as info:
        decode(path)
    error = info.value
    assert (error.width, error.height, error.max_pixels) == (13000, 13000, 64_000_000)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # noqa: S301 (our own bytes)  # crosses DataLoader worker processes


def test_image_over_pillows_own_limit(tmp_path):
    path = tiny_png(tmp_path / "huge.png", 20000, 20000)  # 400 MP > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match=r"huge\.png: over Pillow's decompression-bomb limit"):
        decode(path, max_pixels=None)


def test_jpeg_over_the_limit_is_decoded_at_reduced_scale(tmp_path):
    path = camera_jpeg(tmp_path / "cam.jpg", sample_image_paths()[2], (4000, 3000))
    decoded = decode(path, max_pixels=4_000_000)  # 12 MP; 1/2 scale is 3 MP
    assert decoded.scale == 2 and decoded.pixels.shape == (1500, 2000, 3) and decoded.original == (3000, 4000)
    rows, grid, size = Preprocessor(max_tokens=1024, max_pixels=4_000_000).rows(path)
    assert size == (3000, 4000) and rows.shape[0] == grid[0] * grid[1] <= 1024
    with pytest.raises(ImageTooLarge, match=r"cam\.jpg: 4000x3000"):
        decode(path, max_pixels=100_000)  # even 1/8 (500 x 375) is over
    with pytest.raises(ImageTooLarge, match=r"cam\.jpg: 4000x3000"):
        Preprocessor(exact=True, max_pixels=4_000_000).rows(path)  # the exact path never reduces


_PEAK_RSS = """
import sys
from dinov3_packing.data.decode import ImageTooLarge, decode

def peak_kib():  # this process's own high-water mark: ru_maxrss would start at the parent's (fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

before = peak_kib()
try:
    decode(sys.argv[1], lambda height, width: (512, 512), max_pixels=64_000_000)
except ImageTooLarge:
    pass
print(before, peak_kib())
"""


def peak_rss_growth_mb(path: Path) -> float:
    """Peak RSS growth of decoding `path` to 512 x 512 in a fresh process. decode.py is the step that
    holds pixels (torch sees only the resized result); measured without torch, whose import alone peaks
    above a 36 MP decode and would hide it."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    return (after - before) / 1024


def test_refusing_a_huge_png_costs_no_memory(tmp_path):
    """The issue's case: a 20 KB 13000 x 13000 PNG was embedded at 5.5 GB peak. Bound: 16 MB of peak RSS
    growth, a tenth of what decoding it at all would take (Pillow holds a 1-bit image at one byte a pixel:
    169 MB). The control, a 36 MP PNG of the same kind under the limit, must exceed the bound: the instrument
    sees a decode when there is one."""
    assert peak_rss_growth_mb(tiny_png(tmp_path / "bomb.png", 13000, 13000)) < 16
    assert peak_rss_growth_mb(tiny_png(tmp_path / "big.png", 6000, 6000)) > 36


# --- how far the fast path moves the features --------------------------------------------------------------


def test_fast_path_features_stay_close_to_the_exact_path(tmp_path):
    """fp32 `random:vits16`, fast path against exact path, image by image: the 5 bundled photos and the
    EXIF-rotated test photo at the default max_tokens=1024 (no draft: they are small), and a camera-size
    EXIF-rotated JPEG at max_tokens=256 (decoded at 1/8 scale). Measured (docs/preprocess.md): min token
    cosine 0.99938, min CLS cosine 0.9999999; bounds with a small margin. Forgetting EXIF or mis-sizing
    changes the grids (checked first) or moves the tokens far below the bound."""
    model = load_packing_model("random:vits16")
    camera = camera_jpeg(tmp_path / "cam.jpg", sample_image_paths()[3], (3024, 4032), orientation=6)
    out = {}
    for exact in (False, True):
        small = Preprocessor(max_tokens=1024, exact=exact)([*sample_image_paths(), EXIF6])
        large = Preprocessor(max_tokens=256, exact=exact)(camera)
        grid = torch.cat([small.grid_thw, large.grid_thw])
        with torch.no_grad():
            result = model(torch.cat([small.hidden_states, large.hidden_states]), grid)
        out[exact] = grid, result.last_hidden_state, result.pooler_output
    assert decode(camera, Preprocessor(max_tokens=256).target_size).scale == 8
    assert torch.equal(out[False][0], out[True][0])
    token_cos = F.cosine_similarity(out[False][1], out[True][1], dim=-1)
    cls_cos = F.cosine_similarity(out[False][2], out[True][2], dim=-1)
    print(
        f"\nfast vs exact, random:vits16 fp32: min token cosine {token_cos.min():.6f} (camera JPEG "
        f"{token_cos[-int(grid[-1].prod()) :].min():.6f}), min CLS cosine {cls_cos.min():.8f}"
    )
    assert token_cos.min() >= 0.999 and cls_cos.min() >= 0.99999
