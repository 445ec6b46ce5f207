"""Images of any kind -> the packed batch the model takes.

Two pixel paths, one result format:

    fast (default for `native`)   decode.py: header -> pixel limit -> JPEG draft at the smallest scale still
                                  >= the target -> upright -> RGB -> resize in uint8 (Pillow, antialiased
                                  bilinear) -> float, rescale 1/255 -> normalize -> patchify -> pack
    exact (always for `fixed`)    decode at full scale -> upright -> RGB -> [3, h, w] float in [0, 1]
                                  (rescale 1/255) -> resize the float pixels (bilinear, antialiased) ->
                                  normalize -> patchify -> pack

The exact path's order (rescale, resize, normalize) and resampling are those of Hugging Face's
`DINOv3ViTImageProcessor`, so the `fixed` policy reproduces its pixels exactly (tested). The fast path uses
the same filter family on 8-bit pixels; how far that moves the features is measured in docs/preprocess.md.
Arrays and tensors are pixels already (possibly float or 16-bit): they always take the exact path.

Colour conversions (both paths):
    grayscale (L, 1)      replicated to three channels
    palette (P, PA)       expanded through the palette (transparency honoured, see below)
    RGBA / LA / PA        composited on a white background, as Hugging Face's `convert_to_rgb` does;
                          dropping alpha would reveal whatever colour transparent pixels happen to store
    CMYK, YCbCr, LAB      PIL's conversion to RGB
    16-bit (I;16*, I)     scaled by 1/65535 straight to float, keeping all 16 bits (no 8-bit detour; the
                          fast path resizes these as 32-bit float)

Pixel limit: files and bytes over `max_pixels` (default `decode.DEFAULT_MAX_PIXELS`, 64 MP) raise
`decode.ImageTooLarge` from their header, before decoding; on the fast path a JPEG that a 1/2..1/8 draft
brings under the limit is decoded at that scale instead (the exact path never reduces, so it raises).

Resize policies:
    native   keep the aspect ratio, round each side to the nearest multiple of the patch size; then, if
             the image has more than `max_tokens` patches, scale it down (or below `min_tokens`, up) with
             the aspect kept, so that the patch count lands inside the bounds (`max_tokens` wins if both
             cannot hold). The normal choice for features at native resolution.
    fixed    resize to a `size x size` square (224 by default), aspect not kept: the Hugging Face
             processor's behaviour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..model.archs import normalization_for
from ..packing import pack, patchify
from .decode import DEFAULT_MAX_PIXELS, SIXTEEN_BIT_MODES, check_max_pixels, decode, open_upright, rgb8

POLICIES = ("native", "fixed")
ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
_ENCODED = (str, os.PathLike, bytes, bytearray, memoryview)


def to_rgb(image: ImageLike, name: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Any supported image as float32 `[3, H, W]` in [0, 1] (the module docstring lists the conversions).

    Files and encoded bytes are decoded at full scale. Arrays and tensors: `[H, W]`, `[H, W, C]` (numpy) or
    `[C, H, W]` / `[H, W]` (torch) with C in 1, 3, 4; uint8 (0..255), uint16 (0..65535) or floating point
    already in [0, 1]. Four channels are RGBA.

    Raises:
        TypeError: not a path, bytes, PIL image, numpy array or tensor; or an unsupported dtype.
        ValueError: a shape that is not an image, or an empty image.
        decode.ImageTooLarge: a file or bytes over `max_pixels` (checked from the header).
    """
    if isinstance(image, _ENCODED):
        return _pil_to_rgb(open_upright(image, _label(image, name), max_pixels))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image.transpose(2, 0, 1)
        image = np.ascontiguousarray(image)
        return _array_to_rgb(torch.from_numpy(image if image.flags.writeable else image.copy()), name)
    if isinstance(image, torch.Tensor):
        return _array_to_rgb(image.detach().cpu(), name)
    raise TypeError(
        f"{name}: expected a file path, encoded bytes, PIL image, numpy array or tensor, got {type(image).__name__}"
    )


def _label(image: ImageLike, name: str) -> str:
    """Errors about a file name the file, unless the caller gave a name of its own."""
    return str(image) if name == "image" and isinstance(image, (str, os.PathLike)) else name


def _pil_to_rgb(im: Image.Image) -> torch.Tensor:
    if im.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(im, dtype=np.float32) / 65535.0
        return torch.from_numpy(gray).clamp(0, 1).expand(3, -1, -1).contiguous()
    return _from_uint8(np.asarray(rgb8(im)))


def _from_uint8(rgb: np.ndarray) -> torch.Tensor:
    """uint8 `[H, W, 3]` -> float32 `[3, H, W]` in [0, 1], with the HF processor's rescale arithmetic (uint8
    tensor times the float 1/255)."""
    return torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1) * (1 / 255)


def _array_to_rgb(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected an image [H, W], [H, W, C] (numpy) or [C, H, W] (tensor) with C in (1, 3, 4), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name}: expected a non-empty image, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x * (1 / 255)
    elif x.dtype == torch.uint16:
        x = x.to(torch.float32) / 65535.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
    else:
        raise TypeError(f"{name}: expected uint8, uint16 or floating-point pixels, got dtype {x.dtype}")
    if x.shape[0] == 4:
        rgb, alpha = x[:3], x[3:]
        x = rgb * alpha + (1 - alpha)  # composite on white, as for RGBA files
    elif x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.contiguous()


def target_size(
    height: int,
    width: int,
    patch_size: int,
    policy: str = "native",
    size: int = 224,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> tuple[int, int]:
    """Pixel size `(H, W)`, multiples of `patch_size`, an image of `height x width` is resized to."""
    if policy == "fixed":
        return size, size
    h, w = max(1, round(height / patch_size)), max(1, round(width / patch_size))
    if max_tokens is not None and h * w > max_tokens:
        h, w = _scaled_grid(height, width, patch_size, max_tokens, math.floor)
        while h * w > max_tokens:  # only when a side was clamped up to one patch
            h, w = (h, w - 1) if w >= h else (h - 1, w)
    elif min_tokens is not None and h * w < min_tokens:
        h, w = _scaled_grid(height, width, patch_size, min_tokens, math.ceil)
        if max_tokens is not None and h * w > max_tokens:
            h, w = _scaled_grid(height, width, patch_size, max_tokens, math.floor)
    return h * patch_size, w * patch_size


def _scaled_grid(height: int, width: int, patch_size: int, tokens: int, rounding) -> tuple[int, int]:
    scale = math.sqrt(tokens * patch_size**2 / (height * width))
    return max(1, rounding(height * scale / patch_size)), max(1, rounding(width * scale / patch_size))


@dataclass
class PackedImages:
    """A packed batch and where it came from.

    Attributes:
        hidden_states: `[total_patches, p*p*3]` normalized pixels.
        grid_thw: int64 `[num_images, 3]`, rows (1, h, w).
        original_sizes: `(height, width)` of every input after EXIF orientation, before resizing.
    """

    hidden_states: torch.Tensor
    grid_thw: torch.Tensor
    original_sizes: list[tuple[int, int]]


class Preprocessor:
    """Turns images into the packed input of a DINOv3 model (see the module docstring).

    Args:
        patch_size: model patch size (16 for DINOv3).
        mean, std: per-channel normalization; `Preprocessor.for_checkpoint` picks them from a checkpoint name.
        policy: "native" or "fixed".
        size: square side in pixels for the "fixed" policy (a multiple of `patch_size`).
        min_tokens, max_tokens: patch-count bounds of the "native" policy (None: unbounded).
        exact: True: the exact path (full-scale decode, float resize); False: the fast path (draft decode,
            uint8 resize); None (default): fast for "native", exact for "fixed" (Hugging Face's pixels).
        max_pixels: the pixel limit for files and bytes (`decode.DEFAULT_MAX_PIXELS`, 64 MP); None: only
            Pillow's own (about 179 MP).
    """

    def __init__(
        self,
        patch_size: int = 16,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        policy: str = "native",
        size: int = 224,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        exact: bool | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        if not isinstance(size, int) or size < patch_size or size % patch_size:
            raise ValueError(f"size: expected a positive multiple of patch_size={patch_size}, got {size!r}")
        for arg, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{arg}: expected a positive int or None, got {value!r}")
        if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(f"min_tokens: expected <= max_tokens ({max_tokens}), got {min_tokens}")
        for arg, value in (("mean", mean), ("std", std)):
            if len(value) != 3:
                raise ValueError(f"{arg}: expected 3 per-channel values, got {value!r}")
        if min(std) <= 0:
            raise ValueError(f"std: expected positive values, got {std!r}")
        if exact is not None and not isinstance(exact, bool):
            raise TypeError(f"exact: expected True, False or None, got {exact!r}")
        check_max_pixels(max_pixels)
        self.exact = policy == "fixed" if exact is None else exact
        self.max_pixels = max_pixels
        self.patch_size, self.policy, self.size = patch_size, policy, size
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean)[:, None, None]
        self._std = torch.tensor(self.std)[:, None, None]
        # the fast path's rescale and normalize as one multiply and one add on channels-last pixels
        self._scale = 1 / torch.tensor(self.std)
        self._shift = -torch.tensor(self.mean) * self._scale
        self._affine8: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_checkpoint(cls, ckpt: str, patch_size: int = 16, **kwargs) -> Preprocessor:
        """The normalization a checkpoint expects (SAT-493M models have their own), other options as given."""
        mean, std = normalization_for(ckpt)
        return cls(patch_size=patch_size, mean=mean, std=std, **kwargs)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return target_size(height, width, self.patch_size, self.policy, self.size, self.min_tokens, self.max_tokens)

    def resized(self, image: ImageLike, name: str = "image") -> tuple[torch.Tensor, tuple[int, int]]:
        """`(pixels [3, H, W] in [0, 1] at the target size, original (height, width))`, not normalized.

        `name` is how errors refer to the image; for a path the default names the file.
        """
        if self._fast(image):
            decoded = self._decode(image, name)
            pixels = decoded.pixels
            if pixels.ndim == 2:  # 16-bit grayscale, resized as float
                return torch.from_numpy(pixels).expand(3, -1, -1).contiguous(), decoded.original
            return _from_uint8(pixels), decoded.original
        x = to_rgb(image, name, self.max_pixels)
        original = (int(x.shape[1]), int(x.shape[2]))
        size = self.target_size(*original)
        if size != original:
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x, original

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std

    def image(self, image: ImageLike, name: str = "image") -> torch.Tensor:
        """One image as a normalized float32 `[3, H, W]` tensor at its target size."""
        return self._normalized(image, name)[0]

    def rows(self, image: ImageLike, name: str = "image") -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image as packed rows: `(rows [h*w, p*p*3], grid (h, w), original (height, width))`."""
        return self._rows_of(*self._normalized(image, name))

    def rows_or_pixels(
        self, image: ImageLike, name: str = "image"
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`rows`, except that an 8-bit image on the fast path stops before the float arithmetic:
        `(x, grid, original)` with x either uint8 `[H, W, 3]` pixels at the target size, for `rows_from_pixels`
        to finish later and elsewhere (a quarter of the bytes of float32 rows to move between processes and
        to the device), or float32 rows as `rows` gives them (the exact path, 16-bit grayscale, arrays)."""
        if not self._fast(image):
            return self.rows(image, name)
        decoded = self._decode(image, name)
        if decoded.pixels.ndim == 2:  # 16-bit grayscale, float already
            return self._rows_of(*self._from_decoded(decoded))
        pixels = torch.from_numpy(decoded.pixels if decoded.pixels.flags.writeable else decoded.pixels.copy())
        return pixels, (pixels.shape[0] // self.patch_size, pixels.shape[1] // self.patch_size), decoded.original

    def rows_from_pixels(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows `[h*w, p*p*3]` of uint8 `[H, W, 3]` pixels from `rows_or_pixels`, on their device, with
        the fast path's arithmetic (float32 pixels times scale/255, plus shift: the same values as `rows` on
        every device). `out`: a float32 `[h*w, p*p*3]` tensor on that device to write them into."""
        height, width, _ = pixels.shape
        p, (h, w) = self.patch_size, (height // self.patch_size, width // self.patch_size)
        if out is None:
            out = torch.empty(h * w, p * p * 3, dtype=torch.float32, device=pixels.device)
        patches = out.view(h, w, p, p, 3)
        patches.copy_(pixels.view(h, p, w, p, 3).permute(0, 2, 1, 3, 4))  # (row, col, channel) order, as patchify
        self._normalize8_(patches)
        return out

    def patchify8(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 `[H, W, 3]` pixels from `rows_or_pixels` as uint8 rows `[h*w, p*p*3]` in patchify's order
        (row, column, channel): the pixels of each patch together, no arithmetic yet (`normalize_rows8_`).
        A decode worker does this, so that the main process copies one block per image and normalizes a
        whole pack at once."""
        height, width, _ = pixels.shape
        p, (h, w) = self.patch_size, (height // self.patch_size, width // self.patch_size)
        return pixels.view(h, p, w, p, 3).permute(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)

    def normalize_rows8_(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows `[n, p*p*3]` holding 0..255 pixel values in patchify's order (`patchify8`, converted),
        normalized in place with `rows_from_pixels`' arithmetic: bit for bit the rows it gives."""
        self._normalize8_(rows.view(-1, 3))
        return rows

    def _normalize8_(self, x: torch.Tensor) -> torch.Tensor:
        """float32 channels-last pixel values (0..255) normalized in place: one multiply, one add."""
        if x.device not in self._affine8:  # scale/255 computed once on the CPU, so every device uses its bits
            self._affine8[x.device] = ((self._scale / 255).to(x.device), self._shift.to(x.device))
        scale, shift = self._affine8[x.device]
        return x.mul_(scale).add_(shift)

    def _rows_of(
        self, x: torch.Tensor, original: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        return patchify(x, self.patch_size), (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size), original

    def _fast(self, image: ImageLike) -> bool:
        return not self.exact and isinstance(image, (*_ENCODED, Image.Image))

    def _decode(self, image: ImageLike, name: str):
        return decode(image, self.target_size, max_pixels=self.max_pixels, name=_label(image, name))

    def _normalized(self, image: ImageLike, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalized `[3, H, W]` and the original size. The fast path normalizes the decoded channels-last
        pixels in one multiply-add (float32 rounding apart, the same values as `normalize(resized(...))`)."""
        if not self._fast(image):
            pixels, original = self.resized(image, name)
            return self.normalize(pixels), original
        return self._from_decoded(self._decode(image, name))

    def _from_decoded(self, decoded) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels = torch.from_numpy(decoded.pixels if decoded.pixels.flags.writeable else decoded.pixels.copy())
        if pixels.ndim == 2:  # 16-bit grayscale, already float in [0, 1]
            x = pixels[..., None] * self._scale + self._shift
        else:
            x = self._normalize8_(pixels.to(torch.float32))
        return x.permute(2, 0, 1), decoded.original

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> PackedImages:
        """Pack one image or a list of them: `PackedImages(hidden_states, grid_thw, original_sizes)`."""
        if isinstance(images, (*_ENCODED, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise TypeError(f"images: expected an image or a non-empty list of images, got {type(images).__name__}")
        tensors, originals = [], []
        for i, im in enumerate(images):
            x, original = self._normalized(im, str(im) if isinstance(im, (str, os.PathLike)) else f"images[{i}]")
            tensors.append(x)
            originals.append(original)
        hidden_states, grid_thw = pack(tensors, self.patch_size)
        return PackedImages(hidden_states, grid_thw, originals)


def preprocess(
    images: ImageLike | Sequence[ImageLike],
    ckpt: str | None = None,
    patch_size: int = 16,
    policy: str = "native",
    size: int = 224,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    exact: bool | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> PackedImages:
    """Functional form of `Preprocessor`: normalization from `ckpt` (ImageNet when None)."""
    kwargs = dict(
        patch_size=patch_size,
        policy=policy,
        size=size,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        exact=exact,
        max_pixels=max_pixels,
    )
    pre = Preprocessor.for_checkpoint(ckpt, **kwargs) if ckpt is not None else Preprocessor(**kwargs)
    return pre(images)
