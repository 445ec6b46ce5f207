"""`pca`: the classic DINO picture, the first three principal components of the patch features as RGB.

All images go through one packed forward, whatever their sizes, and share one PCA basis (fitted on the
patches of all of them), so that similar parts get similar colours across images. Each output row is the
resized input and, beside it, its component map upscaled (nearest) to the same size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.preprocess import ImageLike, Preprocessor
from ..model.modeling import DINOv3ViTPackingModel
from ..packing import pack, split
from ..weights.load import DEFAULT_CKPT, load_packing_model, resolve_alias

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
    """
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(f"images: expected a non-empty list of images, got {type(images).__name__}")
    if model is None:
        model = load_packing_model(ckpt, device)
    pre = Preprocessor.for_checkpoint(
        resolve_alias(ckpt), patch_size=model.patch_size, min_tokens=min_tokens, max_tokens=max_tokens
    )
    pixels = [pre.resized(im, f"images[{i}]")[0] for i, im in enumerate(images)]
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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
