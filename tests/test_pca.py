"""`pca` (`pca.py`): the principal-component picture of mixed-size images from one packed forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_packing.apps.pca import GAP, pca_picture, principal_components, save_pca_picture
from dinov3_packing.cli import main
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.weights.load import load_packing_model

DATA = Path(__file__).parent / "data"
IMAGES = [DATA / "astronaut_rgb.jpg", DATA / "coffee_rgba.png", DATA / "more" / "hubble_wide.jpg"]


def test_cli_writes_png_of_expected_size(tmp_path):
    out = tmp_path / "pca.png"
    assert main(["pca", *map(str, IMAGES), "--ckpt", "random:vits16", "--out", str(out), "--max-tokens", "64"]) == 0
    sizes = [Preprocessor(max_tokens=64).target_size(*Image.open(p).size[::-1]) for p in IMAGES]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (max(2 * w + GAP for _, w in sizes), sum(h for h, _ in sizes) + GAP * (len(IMAGES) - 1))
        # left panel of the first row is the resized input, not a blank
        h, w = sizes[0]
        assert np.asarray(im.crop((0, 0, w, h)), dtype=np.float32).std() > 10


def test_components_are_the_top_principal_directions():
    g = torch.Generator().manual_seed(0)
    # three dominant directions with decreasing variance, plus small noise
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:, :3]
    coords = torch.randn(500, 3, generator=g) * torch.tensor([10.0, 5.0, 2.0])
    x = coords @ basis.T + 0.01 * torch.randn(500, 16, generator=g)
    rgb = principal_components(x)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
    for k in range(3):  # each channel is (a monotone rescaling of) the k-th coordinate
        corr = torch.corrcoef(torch.stack([rgb[:, k], coords[:, k]]))[0, 1].abs()
        assert corr > 0.95


def test_one_forward_for_all_sizes():
    model = load_packing_model("random:vits16")
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[1].clone()))
    picture = pca_picture(IMAGES, model=model, max_tokens=48)
    assert len(calls) == 1 and calls[0].shape == (3, 3)  # three images of different grids, one call
    assert len({tuple(r) for r in calls[0].tolist()}) >= 2  # mixed sizes
    assert picture.mode == "RGB"


def test_bad_input_named(tmp_path):
    with pytest.raises(TypeError, match="images"):
        pca_picture([])
    with pytest.raises(TypeError, match="images"):
        pca_picture(str(IMAGES[0]))
    with pytest.raises(ValueError, match=r"images\[1\]: cannot read .*corrupt.jpg"):
        pca_picture([IMAGES[0], DATA / "more" / "corrupt.jpg"], "/no/such/checkpoint")  # before the model loads
    with pytest.raises(ValueError, match=r"out: expected a \.png"):
        save_pca_picture(IMAGES, tmp_path / "x.jpg", "random:vits16")
    with pytest.raises(ValueError, match=r"out: folder .* does not exist"):
        save_pca_picture(IMAGES, tmp_path / "missing" / "x.png", "/no/such/checkpoint")


def test_save_writes_the_picture(tmp_path):
    out = tmp_path / "pca.png"
    picture = save_pca_picture(IMAGES[:2], out, "random:vits16", max_tokens=16)
    with Image.open(out) as im:
        assert im.size == picture.size and np.array_equal(np.asarray(im), np.asarray(picture))
