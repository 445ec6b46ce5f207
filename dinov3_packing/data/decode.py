"""Encoded image (a path or its bytes) -> upright pixels at the size they are needed, cheaply.

The cost of decoding should follow the size the model sees, not the size of the file:

    header only (size, mode, EXIF)  -> pixel limit (`max_pixels`), before any pixel is decoded
    -> JPEG draft: libjpeg decodes at 1/2, 1/4 or 1/8 scale, the smallest scale still >= the target size
    -> upright (EXIF orientation) -> RGB (alpha composited on white) -> resize in uint8 with Pillow's
       antialiased bilinear filter -> numpy array

A 12 MP camera JPEG going to 1024 patches is decoded at 1/4 scale (0.75 MP) and resized in 8-bit, which is
about ten times cheaper than decoding it whole and resizing float pixels. `preprocess.Preprocessor` uses
this for its default (`native`) path; its exact path decodes at full scale and resizes float pixels.

Pixel limit: an image of more than `max_pixels` pixels (header size, before EXIF rotation) raises
`ImageTooLarge` without being decoded, except a JPEG that draft decoding at 1/2..1/8 scale brings under the
limit: that one is decoded at the reduced scale (then resized to its target as usual). Pillow itself refuses
images over `2 * PIL.Image.MAX_IMAGE_PIXELS` (about 179 MP) when opening them; those raise `ImageTooLarge`
too, whatever `max_pixels` says, and are not drafted.

Imports neither torch nor anything heavy, so DataLoader workers and subprocesses stay small.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

DEFAULT_MAX_PIXELS = 64_000_000
"""64 MP: above any camera (a 61 MP full-frame sensor fits), below Pillow's 89 / 179 MP bomb thresholds."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DRAFT_SCALES = (1, 2, 4, 8)  # the reductions libjpeg decodes directly
_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Encoded = str | os.PathLike | bytes | bytearray | memoryview


class ImageTooLarge(ValueError):
    """An image over the pixel limit, found from its header before decoding.

    Attributes:
        name: the file (or record key) it came from.
        width, height: its stored size in pixels (None when Pillow refused to open it at all).
        max_pixels: the limit it exceeds.
    """

    def __init__(self, name: str, width: int | None, height: int | None, max_pixels: int | None):
        super().__init__(name, width, height, max_pixels)  # args rebuild the exception when it is unpickled
        self.name, self.width, self.height, self.max_pixels = name, width, height, max_pixels

    def __str__(self) -> str:
        if self.width is None:
            return f"{self.name}: over Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
        mp = self.width * self.height / 1e6
        return (
            f"{self.name}: {self.width}x{self.height} pixels ({mp:.1f} MP) is over max_pixels={self.max_pixels} "
            f"({self.max_pixels / 1e6:.1f} MP)"
        )


@dataclass
class Decoded:
    """What `decode` returns.

    Attributes:
        pixels: uint8 `[H, W, 3]` RGB; or float32 `[H, W]` in [0, 1] for 16-bit grayscale, which is resized
            as 32-bit float so that all 16 bits survive.
        original: `(height, width)` of the full-scale image after EXIF orientation.
        scale: the JPEG draft reduction the pixels were decoded at (1: full scale).
    """

    pixels: np.ndarray
    original: tuple[int, int]
    scale: int


def open_image(source: Encoded, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `source` reading only its header (size, mode, format, EXIF); the pixels are not decoded yet.

    Raises:
        ImageTooLarge: Pillow refuses the size outright (see the module docstring).
        FileNotFoundError, PIL.UnidentifiedImageError: as Pillow raises them.
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 MP; the caller applies its own, lower limit from the header instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError:
        raise ImageTooLarge(name, None, None, max_pixels) from None


def upright_size(im: Image.Image) -> tuple[int, int]:
    """`(height, width)` of an opened image once its EXIF orientation is applied. Reads the header only,
    except for a PNG whose `eXIf` chunk may follow its pixels: Pillow decodes those to look for it."""
    width, height = im.size
    return (width, height) if _orientation(im) in _QUARTER_TURNS else (height, width)


def open_upright(source: Encoded, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` at full scale, upright (EXIF orientation applied); the file is closed on return.

    Raises:
        ImageTooLarge: over `max_pixels` (no reduced-scale decoding here: full scale is the point).
    """
    with open_image(source, name, max_pixels) as im:
        _check_pixels(im, name, max_pixels, scale=1)
        im.load()
        return ImageOps.exif_transpose(im)


def decode(
    source: Encoded | Image.Image,
    size_for: Callable[[int, int], tuple[int, int]] | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Decoded:
    """Decode an image upright at the size it is needed (see the module docstring for the steps).

    Args:
        source: a path, the encoded bytes, or a PIL image (used as it is: no draft, no pixel limit).
        size_for: maps the upright full-scale `(height, width)` to the `(height, width)` wanted; None keeps
            the decoded size (the full size, unless the pixel limit forced a draft reduction).
        max_pixels: the pixel limit; None: only Pillow's own.
        name: how errors name the image (default: the path, or "image bytes").

    Raises:
        ImageTooLarge: over `max_pixels` and not a JPEG that a draft reduction brings under it.
        FileNotFoundError, OSError, PIL.UnidentifiedImageError: unreadable input, as Pillow raises them.
    """
    check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        im = ImageOps.exif_transpose(source)
        original = (im.height, im.width)
        target = size_for(*original) if size_for else original
        return Decoded(_pixels_at(im, target), original, 1)
    if name is None:
        name = "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    with open_image(source, name, max_pixels) as im:
        # MPO (phone photos carrying a second picture) is a JPEG to Pillow, and drafts like one
        scale = _jpeg_scale(im, size_for, max_pixels) if isinstance(im, JpegImageFile) else 1
        _check_pixels(im, name, max_pixels, scale)
        # Only now: a PNG's eXIf chunk may follow its pixel data, and Pillow decodes the pixels to find it.
        original = upright_size(im)
        if scale > 1:
            # Pillow picks the largest reduction whose size still covers the request: this request gives `scale`
            im.draft("RGB", (im.width // scale, im.height // scale))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # ours to change: no copy when it is upright already
    target = size_for(*original) if size_for else (im.height, im.width)
    return Decoded(_pixels_at(im, target), original, scale)


def check_max_pixels(max_pixels: object) -> None:
    """Raises ValueError unless `max_pixels` is a positive int or None."""
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ValueError(f"max_pixels: expected a positive int or None, got {max_pixels!r}")


def rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit image as mode RGB: palettes expanded, alpha composited on white (as Hugging Face's
    `convert_to_rgb` does; dropping alpha would reveal whatever colour transparent pixels happen to store)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def _pixels_at(im: Image.Image, target: tuple[int, int]) -> np.ndarray:
    size = (target[1], target[0])
    if im.mode in SIXTEEN_BIT_MODES:
        gray = Image.fromarray(np.asarray(im, dtype=np.float32) / 65535.0)
        if gray.size != size:
            gray = gray.resize(size, Image.Resampling.BILINEAR)
        return np.clip(np.asarray(gray), 0.0, 1.0)
    rgb = rgb8(im)
    if rgb.size != size:
        # reducing_gap=None: one antialiased pass from the decoded pixels, no cheaper box pre-reduction
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _jpeg_scale(im: Image.Image, size_for: Callable[[int, int], tuple[int, int]] | None, max_pixels: int | None) -> int:
    """The draft reduction for an opened JPEG (its EXIF sits in the header: reading it decodes nothing)."""
    original = upright_size(im)
    target = size_for(*original) if size_for else original
    turned = _orientation(im) in _QUARTER_TURNS
    return _draft_scale(im.size, (target[0], target[1]) if turned else (target[1], target[0]), max_pixels)


def _draft_scale(stored: tuple[int, int], stored_target: tuple[int, int], max_pixels: int | None) -> int:
    """The JPEG reduction to decode at, for a stored `(width, height)` and a target `(width, height)` in the
    stored orientation: the largest one that keeps both sides >= the target, or, for an image over the pixel
    limit, the smallest one that brings it under (if that is larger)."""
    width, height = stored
    usable = [s for s in DRAFT_SCALES if width // s >= 1 and height // s >= 1]
    fits = [s for s in usable if _ceil_div(width, s) >= stored_target[0] and _ceil_div(height, s) >= stored_target[1]]
    scale = fits[-1] if fits else 1
    if max_pixels is not None and width * height > max_pixels:
        under = [s for s in usable if _ceil_div(width, s) * _ceil_div(height, s) <= max_pixels]
        if under:
            scale = max(scale, under[0])
    return scale


def _check_pixels(im: Image.Image, name: str, max_pixels: int | None, scale: int) -> None:
    """Before decoding: `scale` is the reduction the image will be decoded at (its decoded size is what counts)."""
    width, height = im.size
    if max_pixels is not None and _ceil_div(width, scale) * _ceil_div(height, scale) > max_pixels:
        raise ImageTooLarge(name, width, height, max_pixels)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)  # libjpeg's reduced size rounds up


def _orientation(im: Image.Image) -> int:
    return int(im.getexif().get(_ORIENTATION, 1))
