"""JPEG decoding on the GPU: the device's hardware JPEG engines through NVIDIA's nvImageCodec where it is
installed and the GPU has them (A100/A30/H100/H200), else batched nvJPEG through torchvision; resize and
normalize on the device.

Which path a file takes is decided on the CPU from its header alone (`plan_jpeg`, in the DataLoader workers):

    a baseline or progressive JPEG in L / RGB / YCbCr, within `max_pixels`   -> a `JpegJob` (bytes + plan)
    anything else (PNG, WebP, CMYK or Adobe JPEGs, an image over max_pixels,  -> the CPU path
    bytes whose header Pillow cannot read)                                       (`Preprocessor.rows`)

`GpuJpegDecoder.decode(jobs)` then decodes a chunk of jobs in one batched call, turns each image upright
(the EXIF orientation was read from the header on the CPU: the decoder does not apply it), resizes the
pixels with antialiased bilinear filtering to the target the plan names and normalizes them; a job the
batch cannot decode is decoded alone, and one that still fails comes back as its exception, for the caller
to take the CPU path. An image at least twice its target in both sides is first averaged over k x k
blocks (k = 2, 4 or 8, the largest that keeps both sides >= the target: what the CPU path's JPEG draft
decoding does in the DCT; as stored, before it is turned upright), exactly and in one pass over the bytes
(`ops.triton.box_mean`), then resized: resizing a 12 MP photo straight from its 36 M float pixels cost
0.35 ms of the SMs per image on the H200 (`benchmarks/hw_jpeg_probe.py`), a quarter of the ViT-L
forward's time per image. Otherwise the arithmetic is the exact path's (rescale 1/255, resize floats,
normalize); the decoded pixels may differ from libjpeg's by a level, so the exact path (`exact=True`, the
`fixed` policy) always decodes on the CPU.

torchvision is optional, and nvImageCodec (`nvidia-nvimgcodec-cu13` / `-cu12` with `nvidia-nvjpeg`) an
optional accelerator on top of it: `require_gpu_decoding` says what is missing when GPU decoding is asked
for. The decode function can be given (tests run `torchvision.io.decode_jpeg` on the CPU through the same
code).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.triton.box_mean import box_mean
from ..packing import patchify
from .decode import open_image, upright_size
from .preprocess import Preprocessor

DECODE_CHOICES = ("cpu", "gpu", "auto")
GPU_MODES = ("L", "RGB", "YCbCr")  # what nvJPEG turns into RGB itself; CMYK and the rest decode on the CPU
_SOI = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # the EXIF tag
BOX_FACTORS = (8, 4, 2)  # block averages before the resize, largest first (module docstring)


@dataclass(frozen=True)
class JpegJob:
    """One JPEG for the GPU, planned on the CPU: its bytes as a uint8 tensor, its EXIF orientation, its
    upright full-scale `(height, width)` and the `(height, width)` it is resized to."""

    key: str
    data: torch.Tensor
    orientation: int
    original: tuple[int, int]
    target: tuple[int, int]


def plan_jpeg(data: bytes, key: str, preprocessor: Preprocessor) -> JpegJob | None:
    """A `JpegJob` for bytes that the GPU can decode, None for those that take the CPU path (module docstring)."""
    if not data.startswith(_SOI):
        return None
    try:
        with open_image(data, key, preprocessor.max_pixels) as im:
            if im.format not in ("JPEG", "MPO") or im.mode not in GPU_MODES:
                return None
            if preprocessor.max_pixels is not None and im.width * im.height > preprocessor.max_pixels:
                return None  # the CPU path decodes it at a reduced scale or says why it cannot
            orientation, original = int(im.getexif().get(_ORIENTATION, 1)), upright_size(im)
    except Exception:  # any header Pillow cannot read: the CPU path reports it with its own reason
        return None
    target = preprocessor.target_size(*original)
    return JpegJob(key, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, original, target)


def upright(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """`[C, H, W]` pixels stored with EXIF `orientation` (1..8), turned the way Pillow's `exif_transpose`
    turns them."""
    if orientation in (2, 3, 4):
        return x.flip({2: (-1,), 3: (-2, -1), 4: (-2,)}[orientation])
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def box_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The block size to average a `(height, width)` image over before resizing it to `target`: the largest
    of `BOX_FACTORS` that keeps both sides >= the target, 1 for none."""
    for k in BOX_FACTORS:
        if size[0] // k >= target[0] and size[1] // k >= target[1]:
            return k
    return 1


def nvimgcodec_missing() -> str | None:
    """Why nvImageCodec's hardware decoder cannot be tried here (None when the package imports)."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception as e:  # not installed, or its native library does not load
        return f"nvidia.nvimgcodec does not import ({type(e).__name__}: {e})"
    return None


def hardware_decode_fn(device: torch.device) -> Callable[..., list[torch.Tensor | Exception]]:
    """A decode function on `device`'s hardware JPEG engines through nvImageCodec: `[C, H, W]` uint8 views of
    its interleaved RGB output, decoded on the current stream; an image it cannot decode (a progressive
    JPEG, say) comes back as a ValueError.

    Raises:
        ImportError: nvImageCodec is not installed.
        RuntimeError: the GPU has no hardware JPEG decoder (nvImageCodec cannot create one).
    """
    from nvidia import nvimgcodec

    index = device.index if device.index is not None else torch.cuda.current_device()
    decoder = nvimgcodec.Decoder(device_id=index, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)

    def decode(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
        stream = torch.cuda.current_stream(device).cuda_stream
        images = decoder.decode([_encoded(d) for d in data], params=params, cuda_stream=stream)
        return [
            ValueError("the hardware JPEG decoder could not decode it")
            if im is None
            else torch.as_tensor(im, device=device).permute(2, 0, 1)
            for im in images
        ]

    return decode


def _encoded(data: torch.Tensor):
    """A JPEG's bytes for nvImageCodec without a copy: a `CodeStream` over the tensor's memory as a numpy array
    (the tensor outlives the call), a copy of its bytes where this nvImageCodec takes none."""
    from nvidia import nvimgcodec

    array = data.numpy()
    try:
        return nvimgcodec.CodeStream(array)
    except TypeError:
        return array.tobytes()


def gpu_decoding_missing() -> str | None:
    """Why GPU decoding cannot run here (None when it can): torchvision missing, or no CUDA."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (pip install torchvision, the build matching this torch)"
    if not torch.cuda.is_available():
        return "this torch sees no CUDA device"
    return None


def require_gpu_decoding(device: torch.device) -> None:
    """Raises ValueError naming `decode` when GPU decoding cannot run on `device`."""
    reason = gpu_decoding_missing()
    if reason is None and device.type != "cuda":
        reason = f"the model runs on {str(device)!r}, not a CUDA device"
    if reason is not None:
        raise ValueError(f"decode: 'gpu' needs CUDA and torchvision: {reason}; pass decode=cpu")


def resolve_decode(decode: str, device: torch.device, exact: bool) -> str:
    """'cpu' or 'gpu' for `decode` in `DECODE_CHOICES`: 'auto' takes the GPU where it can run and the path is
    not exact, else the CPU.

    Raises:
        ValueError: an unknown choice; 'gpu' without CUDA or torchvision, or with the exact path.
    """
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode: expected one of {DECODE_CHOICES}, got {decode!r}")
    if decode == "auto":
        return "gpu" if not exact and device.type == "cuda" and gpu_decoding_missing() is None else "cpu"
    if decode == "gpu":
        if exact:
            raise ValueError(
                "decode: 'gpu' decodes with nvJPEG, whose pixels may differ from Pillow's; the exact path "
                "(exact=True or policy fixed) needs decode=cpu"
            )
        require_gpu_decoding(device)
    return decode


class GpuJpegDecoder:
    """Decodes `JpegJob`s into packed rows on `device` (module docstring).

    Args:
        preprocessor: its mean, std and patch size (the plans already hold each target size).
        device: where the pixels are decoded and the rows stay.
        decode_fn: `decode(list_of_uint8_tensors, device=...) -> list of [C, H, W] uint8` (or an exception
            in the place of an image it could not decode); default: the hardware decoder
            (`hardware_decode_fn`) where nvImageCodec is installed and the GPU has JPEG engines, else
            `torchvision.io.decode_jpeg` in RGB mode. `backend` names the one taken.
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        device: torch.device | str,
        decode_fn: Callable[..., list[torch.Tensor | Exception]] | None = None,
    ):
        self.device = torch.device(device)
        self.backend = "given"
        if decode_fn is None:
            require_gpu_decoding(self.device)
            if nvimgcodec_missing() is None:
                try:
                    decode_fn, self.backend = hardware_decode_fn(self.device), "nvimgcodec-hardware"
                except Exception as e:  # no JPEG engines on this GPU: torchvision's nvJPEG decodes
                    warnings.warn(
                        f"decode: nvImageCodec's hardware decoder is not available ({e}); using torchvision's nvJPEG",
                        stacklevel=2,
                    )
            if decode_fn is None:
                from torchvision.io import ImageReadMode, decode_jpeg

                def decode_fn(data, device):
                    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

                self.backend = "torchvision-nvjpeg"

        self.decode_fn, self.patch_size = decode_fn, preprocessor.patch_size
        self._scale = (1 / (255 * torch.tensor(preprocessor.std))).to(self.device)[:, None, None]
        self._shift = (-torch.tensor(preprocessor.mean) / torch.tensor(preprocessor.std)).to(self.device)[:, None, None]

    def decode(self, jobs: Sequence[JpegJob]) -> list[tuple[torch.Tensor, tuple[int, int]] | Exception]:
        """For each job, `(rows [h*w, p*p*3] on the device, grid (h, w))`, or the exception that stopped it."""
        if not jobs:
            return []
        try:
            pixels = list(self.decode_fn([j.data for j in jobs], device=self.device))
        except Exception:  # one bad file fails the whole batch: find it by decoding each alone
            pixels = [self._decode_one(j) for j in jobs]
        if len(pixels) != len(jobs):
            pixels = [ValueError(f"the decoder returned {len(pixels)} images for {len(jobs)}")] * len(jobs)
        return [p if isinstance(p, Exception) else self._rows(p, j) for p, j in zip(pixels, jobs, strict=True)]

    def _decode_one(self, job: JpegJob) -> torch.Tensor | Exception:
        try:
            (pixels,) = self.decode_fn([job.data], device=self.device)
            return pixels
        except Exception as e:
            return e

    def _rows(self, pixels: torch.Tensor, job: JpegJob) -> tuple[torch.Tensor, tuple[int, int]] | Exception:
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            return ValueError(f"{job.key}: decoded to {tuple(pixels.shape)}, expected 3 colour planes")
        if tuple(upright(pixels, job.orientation).shape[1:]) != job.original:
            return ValueError(f"{job.key}: decoded to {tuple(pixels.shape)}, the header says {job.original} upright")
        # The block mean is taken as the pixels are stored (the rows and columns left over are at the
        # stored bottom and right) and the small result turned upright.
        k = box_factor(job.original, job.target)
        x = upright(box_mean(pixels, k) if k > 1 else pixels.float(), job.orientation)
        if tuple(x.shape[1:]) != job.target:
            x = F.interpolate(x[None], size=job.target, mode="bilinear", align_corners=False, antialias=True)[0]
        x = x * self._scale + self._shift
        h, w = job.target[0] // self.patch_size, job.target[1] // self.patch_size
        return patchify(x, self.patch_size), (h, w)
