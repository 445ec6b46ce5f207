"""`pca`: the classic DINO picture, the first three principal components of the patch features as RGB.

All images go through one packed forward, whatever their sizes, and share one PCA basis (fitted on the
patches of all of them), so that similar parts get similar colours across images. Each output row is the
resized input and, beside it, its component map upscaled (nearest) to the same size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.preprocess import ImageLike, Preprocessor, to_rgb
from ..model.archs import normalization_for
from ..model.modeling import DINOv3ViTPackingModel
from ..packing import pack, split
from ..weights.load import DEFAULT_CKPT, load_checkpoint, resolve_alias
from .embed.job import usable_device

GAP = 4  # white pixels between panels


def principal_components(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Project `[N, D]` features on their first `k` principal components, each scaled to [0, 1].

    The scale maps the 1st..99th percentile of each component to 0..1 (outliers clipped); each component's
    sign is fixed so that its largest |projection| is positive, which makes the picture deterministic.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got {tuple(features.shape)}")
    x = features.double()
    x = x - x.mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    proj = x @ vectors[:, -k:].flip(-1)
    proj = proj * torch.sign(proj.gather(0, proj.abs().argmax(0, keepdim=True)))
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    return ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float()


def pca_picture(
    images: Sequence[ImageLike],
    ckpt: str = DEFAULT_CKPT,
    model: DINOv3ViTPackingModel | None = None,
    device: torch.device | str = "cpu",
    min_tokens: int | None = None,
    max_tokens: int | None = 1024,
) -> Image.Image:
    """Compose the PCA picture of `images` (paths, PIL images, arrays or tensors) as one RGB image.

    Args:
        images: at least one image.
        ckpt: checkpoint, used for the model (unless `model` is given) and the normalization.
        model: an already loaded packed model.
        device: where to load the model.
        min_tokens, max_tokens: patch-count bounds of the native resize policy.

    Returns:
        RGB image of height `sum(H_i) + GAP * (n - 1)` and width `max(2 * W_i + GAP)`, where `H_i x W_i` is
        image i after resizing (`Preprocessor.target_size`).

    Raises:
        TypeError / ValueError: no images, an image that cannot be read (named, with the file), an unusable
            device; all before the model loads.
    """
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(f"images: expected a non-empty list of images, got {type(images).__name__}")
    decoded = [_decode(im, f"images[{i}]") for i, im in enumerate(images)]
    if model is None:
        loaded = load_checkpoint(ckpt, usable_device(device))  # the model and its normalization, one load
        model, (mean, std) = loaded.model, (loaded.mean, loaded.std)
    else:
        mean, std = normalization_for(resolve_alias(ckpt))
    pre = Preprocessor(patch_size=model.patch_size, mean=mean, std=std, min_tokens=min_tokens, max_tokens=max_tokens)
    pixels = [pre.resized(x, f"images[{i}]")[0] for i, x in enumerate(decoded)]
    hidden_states, grid_thw = pack([pre.normalize(p) for p in pixels], model.patch_size)
    if int(grid_thw[:, 1:].prod(1).sum()) < 2:
        raise ValueError("images: the PCA needs at least two patches in all")
    with torch.inference_mode():
        tokens = model(hidden_states, grid_thw).last_hidden_state
    colours = split(principal_components(tokens.float().cpu()), grid_thw)

    rows = []
    for picture, colour in zip(pixels, colours, strict=True):
        height, width = picture.shape[1:]
        left = Image.fromarray(_to_uint8(picture.permute(1, 2, 0)))
        right = Image.fromarray(_to_uint8(colour[0])).resize((width, height), Image.NEAREST)
        rows.append((left, right))
    canvas = Image.new(
        "RGB",
        (max(2 * left.width + GAP for left, _ in rows), sum(left.height for left, _ in rows) + GAP * (len(rows) - 1)),
        (255, 255, 255),
    )
    y = 0
    for left, right in rows:
        canvas.paste(left, (0, y))
        canvas.paste(right, (left.width + GAP, y))
        y += left.height + GAP
    return canvas


def save_pca_picture(
    images: Sequence[ImageLike],
    out: str | os.PathLike,
    ckpt: str,
    device: torch.device | str = "cpu",
    min_tokens: int | None = None,
    max_tokens: int | None = 1024,
) -> Image.Image:
    """`pca_picture` written to the PNG file `out`, which is checked before anything is computed.

    Raises:
        ValueError: `out` is not a `.png` name, is a folder, or its folder is missing or not writable; or
            what `pca_picture` raises.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out: expected a .png file name, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a folder; expected a .png file name")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"out: folder {str(folder)!r} does not exist (create it first)")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"out: cannot write into folder {str(folder)!r} ({e.strerror or e})") from None
    picture = pca_picture(images, ckpt, device=device, min_tokens=min_tokens, max_tokens=max_tokens)
    picture.save(out)
    return picture


def _decode(image: ImageLike, name: str) -> torch.Tensor:
    """Decode one image up front, so that a bad file is reported before the model loads or anything runs."""
    try:
        return to_rgb(image, name)
    except (OSError, Image.DecompressionBombError) as e:  # missing, a folder, truncated, not an image
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{name}: cannot read {str(image)!r} as an image ({type(e).__name__}: {reason})") from None


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
