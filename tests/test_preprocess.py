"""Preprocessing (`preprocess.py`): image modes, resize policies, parity with the Hugging Face processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.image_utils import PILImageResampling
from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor

from dinov3_packing.data.preprocess import Preprocessor, preprocess, target_size, to_rgb
from dinov3_packing.model.archs import IMAGENET_MEAN, IMAGENET_STD, SAT493M_MEAN, SAT493M_STD
from dinov3_packing.packing import patchify

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(p for p in DATA.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "corrupt.jpg")


def test_photographs_cover_the_modes():
    modes = {Image.open(p).mode for p in PHOTOS}
    assert {"RGB", "L", "P", "RGBA", "CMYK", "I;16"} <= modes


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_fixed_policy_equals_hf_image_processor(path):
    """Reference: transformers' DINOv3ViTImageProcessor built with explicit arguments (224x224, bilinear,
    rescale 1/255, ImageNet normalization). Same operations in the same order: pixels must be identical."""
    hf = DINOv3ViTImageProcessor(
        size={"height": 224, "width": 224},
        resample=PILImageResampling.BILINEAR,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    # HF applies neither EXIF orientation nor our alpha/16-bit handling: give both the same upright RGB.
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    ref = hf(upright, return_tensors="pt")["pixel_values"][0]
    ours = Preprocessor(policy="fixed", size=224).image(upright)
    assert torch.equal(ours, ref)


def test_fixed_policy_from_files_takes_the_exact_path():
    """Files (not only PIL images) under `fixed` give the Hugging Face processor's pixels: `fixed` decodes at
    full scale and resizes float pixels. Modes whose RGB conversion we do differently (alpha on white, 16
    bits) are left out; the EXIF photo is in."""
    hf = DINOv3ViTImageProcessor(
        size={"height": 224, "width": 224},
        resample=PILImageResampling.BILINEAR,
        rescale_factor=1 / 255,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    pre = Preprocessor(policy="fixed", size=224)
    assert pre.exact and not Preprocessor().exact and not Preprocessor(policy="fixed", exact=False).exact
    for path in PHOTOS:
        if Image.open(path).mode in ("RGBA", "P", "I;16"):
            continue
        upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        assert torch.equal(pre.image(path), hf(upright, return_tensors="pt")["pixel_values"][0]), path.name


def test_exif_orientation_applied():
    path = DATA / "more" / "rocket_exif6.jpg"
    stored = Image.open(path)
    assert stored.getexif()[0x0112] == 6
    x = to_rgb(path)
    assert (x.shape[2], x.shape[1]) == (stored.height, stored.width)  # rotated a quarter turn
    upright = np.asarray(stored.transpose(Image.ROTATE_270).convert("RGB"), dtype=np.float32) / 255
    assert torch.allclose(x, torch.from_numpy(upright).permute(2, 0, 1), atol=1e-6)


def test_rgba_composited_on_white():
    im = Image.open(DATA / "coffee_rgba.png")
    rgba = np.asarray(im, dtype=np.float64) / 255
    x = to_rgb(im).double()
    expected = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    assert (rgba[..., 3] == 0).any() and (rgba[..., 3] == 1).any()
    assert torch.allclose(x, torch.from_numpy(expected).permute(2, 0, 1), atol=1 / 255 + 1e-6)
    # a fully transparent corner is white
    assert torch.all(x[:, 0, 0] == 1)


def test_grayscale_palette_cmyk_to_rgb():
    gray = to_rgb(DATA / "camera_gray.png")
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    palette = Image.open(DATA / "coffee_palette.png")
    assert torch.equal(to_rgb(palette), to_rgb(palette.convert("RGB")))
    cmyk = Image.open(DATA / "more" / "chelsea_cmyk.jpg")
    x = to_rgb(cmyk)
    assert x.shape == (3, cmyk.height, cmyk.width) and 0 <= x.min() and x.max() <= 1


def test_sixteen_bit_keeps_its_precision():
    im = Image.open(DATA / "more" / "camera_16bit.png")
    raw = np.asarray(im).astype(np.float64) / 65535
    x = to_rgb(im).double()
    assert torch.allclose(x[0], torch.from_numpy(raw), atol=1e-7)
    assert torch.equal(x[0], x[2])


def test_all_input_kinds_agree():
    path = DATA / "astronaut_rgb.jpg"
    pil = Image.open(path).convert("RGB")
    arr = np.array(pil)
    ref = to_rgb(path)
    assert torch.equal(to_rgb(pil), ref)
    assert torch.equal(to_rgb(arr), ref)
    assert torch.equal(to_rgb(torch.from_numpy(arr).permute(2, 0, 1)), ref)
    assert torch.allclose(to_rgb(torch.from_numpy(arr).permute(2, 0, 1).float() / 255), ref, atol=1e-7)
    assert torch.equal(to_rgb(str(path)), ref)
    sixteen = np.asarray(Image.open(DATA / "more" / "camera_16bit.png")).astype(np.uint16)
    assert torch.equal(to_rgb(sixteen), to_rgb(DATA / "more" / "camera_16bit.png"))


def test_native_policy_sizes():
    # rounds each side to the nearest multiple of the patch size, aspect kept
    assert target_size(130, 150, 16) == (128, 144)
    assert target_size(5, 300, 16) == (16, 304)  # at least one patch a side
    # max_tokens scales down, keeping the aspect ratio
    h, w = target_size(3000, 4000, 16, max_tokens=1024)
    assert h % 16 == 0 and w % 16 == 0 and (h // 16) * (w // 16) <= 1024
    assert abs((w / h) - 4 / 3) < 0.05 and (h // 16) * (w // 16) > 0.9 * 1024
    # min_tokens scales up
    h, w = target_size(40, 60, 16, min_tokens=256)
    assert (h // 16) * (w // 16) >= 256 and abs(w / h - 1.5) < 0.1
    # an extreme panorama still fits max_tokens
    h, w = target_size(10, 100000, 16, max_tokens=64)
    assert (h // 16) * (w // 16) <= 64
    assert target_size(999, 17, 16, policy="fixed", size=224) == (224, 224)


def test_packed_output_matches_patchify():
    pre = Preprocessor(max_tokens=48)
    batch = pre([DATA / "astronaut_rgb.jpg", DATA / "camera_gray.png", DATA / "more" / "hubble_wide.jpg"])
    assert batch.grid_thw.dtype == torch.long and batch.grid_thw[:, 0].tolist() == [1, 1, 1]
    assert int((batch.grid_thw[:, 1] * batch.grid_thw[:, 2]).max()) <= 48
    assert batch.original_sizes == [(130, 150), (128, 96), (120, 200)]
    first = patchify(pre.image(DATA / "astronaut_rgb.jpg"), 16)
    assert torch.equal(batch.hidden_states[: first.shape[0]], first)
    assert batch.hidden_states.shape == (int(batch.grid_thw.prod(1).sum()), 16 * 16 * 3)


def test_normalization_from_checkpoint_name():
    assert Preprocessor.for_checkpoint("facebook/dinov3-vitl16-pretrain-sat493m").mean == SAT493M_MEAN
    assert Preprocessor.for_checkpoint("facebook/dinov3-vitl16-pretrain-sat493m").std == SAT493M_STD
    assert Preprocessor.for_checkpoint("random:vits16").mean == IMAGENET_MEAN
    white = torch.ones(3, 16, 16)
    x = preprocess(white, ckpt="x-sat493m").hidden_states
    assert torch.allclose(x[0, :3], (1 - torch.tensor(SAT493M_MEAN)) / torch.tensor(SAT493M_STD))


@pytest.mark.parametrize(
    "make, error, arg",
    [
        (lambda: Preprocessor(policy="square"), ValueError, "policy"),
        (lambda: Preprocessor(size=100), ValueError, "size"),
        (lambda: Preprocessor(min_tokens=10, max_tokens=5), ValueError, "min_tokens"),
        (lambda: Preprocessor(max_tokens=0), ValueError, "max_tokens"),
        (lambda: Preprocessor()([]), TypeError, "images"),
        (lambda: Preprocessor()([np.zeros((8, 8, 2), np.uint8)]), ValueError, r"images\[0\]"),
        (lambda: Preprocessor()([torch.zeros(3, 8, 8, dtype=torch.int8)]), TypeError, r"images\[0\]"),
        (lambda: to_rgb(3.5), TypeError, "image"),
        (lambda: Preprocessor(exact="yes"), TypeError, "exact"),
        (lambda: Preprocessor(max_pixels=0), ValueError, "max_pixels"),
        (lambda: Preprocessor(max_pixels=2.5e7), ValueError, "max_pixels"),
        (lambda: to_rgb(DATA / "no-such.jpg"), FileNotFoundError, "no-such.jpg"),
    ],
)
def test_bad_input_named(make, error, arg):
    with pytest.raises(error, match=arg):
        make()
