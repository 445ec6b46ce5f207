"""Finding image files, and loading one as a normalized `[C, H, W]` tensor at a patch-multiple size.

The pixels themselves come from the one preprocessing pipeline in `preprocess.py`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from ..data.preprocess import Preprocessor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_SUFFIXES = (".txt", ".lst", ".list")


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


def list_images(src: str | os.PathLike) -> list[str]:
    """The image files `src` names, as absolute paths, without duplicates.

    `src` is one of:
        a folder            searched recursively for files with an image suffix, sorted by path
        a list file         `.txt` / `.lst` / `.list`, one path a line (blank lines and `#` comments ignored),
                            relative paths taken from the list file's folder; order kept. Listed files
                            need not exist: a missing one is reported by the caller like a corrupt one.
        a glob pattern      (`*`, `?`, `[`; `**` recursive) matching image files, sorted
        one image file

    Raises:
        ValueError: `src` matches nothing of the above, or names no image.
    """
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"src: expected a folder, list file or glob pattern, got {type(src).__name__}")
    path = Path(src).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        found = read_list_file(path)
    elif path.is_file():
        found = [str(path)]
    elif glob.has_magic(str(src)):
        matches = glob.glob(os.path.expanduser(str(src)), recursive=True)
        found = sorted(m for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES and Path(m).is_file())
    else:
        raise ValueError(f"src: {str(src)!r} is not a folder, a list file ({', '.join(LIST_SUFFIXES)}) or a glob")
    paths = list(dict.fromkeys(os.path.abspath(p) for p in found))
    if not paths:
        raise ValueError(f"src: no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(src)!r}")
    return paths


def read_list_file(path: str | os.PathLike) -> list[str]:
    """The paths a list file names, one a line (blank lines and `#` comments ignored), relative ones taken
    from the list file's folder; order kept."""
    path = Path(path)
    lines = (line.strip() for line in path.read_text().splitlines())
    return [str(path.parent / line) for line in lines if line and not line.startswith("#")]


def load_at_patch_multiple(
    path: str | Path, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Load a photograph upright as RGB, keep its aspect, round each side to the nearest multiple of the
    patch size, normalize: float32 `[3, H, W]` (the `native` policy of `preprocess.Preprocessor`, unbounded)."""
    return Preprocessor(patch_size=patch_size, mean=mean, std=std, policy="native").image(path)
