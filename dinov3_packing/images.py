"""Image files -> normalized `[C, H, W]` tensors at a patch-multiple size."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def sample_image_paths() -> list[Path]:
    """The photographs bundled with the package (see assets/images/LICENSE.md)."""
    folder = Path(str(resources.files("dinov3_packing") / "assets" / "images"))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_paths_in(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image_dir: {str(folder)!r} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"image_dir: no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return paths


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file upright (EXIF orientation applied) as 8-bit RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def round_to_patches(size: int, patch_size: int) -> int:
    """Nearest multiple of `patch_size` (at least one patch)."""
    return max(patch_size, round(size / patch_size) * patch_size)


def to_normalized_tensor(
    image: Image.Image, size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize (bicubic) to `size_hw`, scale to [0, 1], normalize per channel; returns float32 `[3, H, W]`."""
    height, width = size_hw
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_at_patch_multiple(
    path: str | Path, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Load a photograph, keep its aspect, round each side to the nearest multiple of the patch size."""
    im = load_rgb(path)
    size = (round_to_patches(im.height, patch_size), round_to_patches(im.width, patch_size))
    return to_normalized_tensor(im, size, mean, std)
