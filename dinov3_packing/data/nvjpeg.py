"""The GPU's hardware JPEG decoders (Ampere A100/A30 and Hopper H100/H200: NVJPG engines), through NVIDIA's
nvJPEG library's batched API with its hardware backend, at a JPEG scale factor (1, 1/2, 1/4, 1/8).

Why not torchvision: `torchvision.io.decode_jpeg(device="cuda")` creates nvJPEG with its default backend
(Huffman decoding on the SMs or the CPU, no scale factor), so a 12 MP photo is decoded at full size and
resized from 36 MB of pixels on the SMs the model needs. The engines take the entropy decoding and the
IDCT off both; decoding at the JPEG draft scale the CPU path also uses (`decode._draft_scale`) leaves a
small image to resize. The H200 runs of 2026-12-02 (`benchmarks/hw_jpeg_probe.py`) give the figures.

nvJPEG is NVIDIA's, installed from PyPI (`pip install nvidia-nvjpeg`, CUDA 13; `nvidia-nvjpeg-cu12`,
CUDA 12; the `[nvjpeg]` extra); this module only declares the C functions it calls (ctypes: the calls
release the GIL). `hardware_decoding_missing()` says why it cannot run here; `HardwareJpegDecoder`
decodes batches into uint8 `[H, W, 3]` tensors on one CUDA device, on the current stream.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Sequence
from functools import lru_cache

import torch

SCALES = (1, 2, 4, 8)  # the reductions nvJPEG's hardware backend decodes at (nvjpegScaleFactor_t 0..3)
_BACKEND_HARDWARE = 3
_OUTPUT_RGBI = 5  # interleaved RGB in channel[0]
_FLAGS_HW_DECODE_NO_PIPELINE = 1
_MAX_COMPONENT = 4
_STATUS = {
    1: "not initialized",
    2: "invalid parameter",
    3: "bad JPEG",
    4: "JPEG not supported",
    5: "allocator failure",
    6: "execution failed",
    7: "architecture mismatch (this GPU has no hardware JPEG decoder)",
    8: "internal error",
    9: "implementation not supported",
    10: "incomplete bitstream",
}
_LIBRARIES = (  # (path under a site-packages folder, soname), newest CUDA first
    ("nvidia/cu13/lib/libnvjpeg.so.13", "libnvjpeg.so.13"),
    ("nvidia/nvjpeg/lib/libnvjpeg.so.12", "libnvjpeg.so.12"),
)


class NvjpegError(RuntimeError):
    """An nvJPEG call failed: `status` is its nvjpegStatus_t."""

    def __init__(self, call: str, status: int):
        self.status = status
        super().__init__(f"nvJPEG {call} failed: {_STATUS.get(status, f'status {status}')}")


class _Image(ctypes.Structure):  # nvjpegImage_t
    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENT), ("pitch", ctypes.c_size_t * _MAX_COMPONENT)]


def _candidates() -> list[str]:
    """Where the library may be: the nvidia-nvjpeg wheels under each `sys.path` folder, then the loader's
    own search (LD_LIBRARY_PATH, a system CUDA) by soname."""
    found = []
    for relative, _ in _LIBRARIES:
        for folder in sys.path:
            found.extend(sorted(glob.glob(os.path.join(folder or ".", relative))))
    return found + [soname for _, soname in _LIBRARIES]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | str:
    """The loaded nvJPEG library with its functions declared, or why it could not be loaded."""
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(str(e))
            continue
        vp, i, p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER
        for name, args in {
            "nvjpegCreateEx": (i, vp, vp, ctypes.c_uint, p(vp)),
            "nvjpegDestroy": (vp,),
            "nvjpegJpegStateCreate": (vp, p(vp)),
            "nvjpegJpegStateDestroy": (vp,),
            "nvjpegGetHardwareDecoderInfo": (vp, p(ctypes.c_uint), p(ctypes.c_uint)),
            "nvjpegDecodeBatchedInitialize": (vp, vp, i, i, i),
            "nvjpegDecodeParamsCreate": (vp, p(vp)),
            "nvjpegDecodeParamsDestroy": (vp,),
            "nvjpegDecodeParamsSetOutputFormat": (vp, i),
            "nvjpegDecodeParamsSetScaleFactor": (vp, i),
            "nvjpegDecodeBatchedEx": (vp, vp, p(vp), p(ctypes.c_size_t), p(_Image), p(vp), vp),
        }.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                return f"{path} has no {name} (nvJPEG from CUDA 12 or newer is needed)"
            fn.argtypes, fn.restype = args, ctypes.c_int
        return lib
    return "libnvjpeg not found (pip install nvidia-nvjpeg for CUDA 13, nvidia-nvjpeg-cu12 for CUDA 12)" + (
        f": {errors[-1]}" if errors else ""
    )


def hardware_decoding_missing() -> str | None:
    """Why hardware JPEG decoding cannot run here (None when the library loads and a CUDA device exists;
    whether that device has the engines shows when `HardwareJpegDecoder` is made)."""
    if not torch.cuda.is_available():
        return "this torch sees no CUDA device"
    lib = _library()
    return lib if isinstance(lib, str) else None


def _check(call: str, status: int) -> None:
    if status != 0:
        raise NvjpegError(call, status)


def scaled_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """The `(height, width)` nvJPEG writes for a stored image decoded at 1/`scale` (rounded up, as libjpeg's)."""
    return -(-height // scale), -(-width // scale)


class HardwareJpegDecoder:
    """Batched decoding on one CUDA device's JPEG engines.

    `decode(datas, sizes, scales)` takes JPEG bytes (uint8 CPU tensors or bytes), each one's stored
    `(height, width)` (from its header) and the reduction to decode it at (one of `SCALES`), and returns
    `[H, W, 3]` uint8 tensors on the device, written on the current stream. A batch the engines refuse
    raises `NvjpegError`; the caller decodes its images one by one to find the one at fault.

    Raises:
        ValueError: hardware decoding cannot run here (`hardware_decoding_missing`), or `device` is no
            CUDA device.
        NvjpegError: the device has no JPEG engines (or another nvJPEG failure while setting up).
    """

    def __init__(self, device: torch.device | str, flags: int = _FLAGS_HW_DECODE_NO_PIPELINE):
        self.device = torch.device(device)
        reason = hardware_decoding_missing()
        if reason is None and self.device.type != "cuda":
            reason = f"the device is {str(self.device)!r}, not a CUDA device"
        if reason is not None:
            raise ValueError(f"decode: hardware JPEG decoding cannot run: {reason}")
        self._lib = lib = _library()
        self._handle, self._state = ctypes.c_void_p(), ctypes.c_void_p()
        self._params: dict[int, ctypes.c_void_p] = {}
        self._batch = 0
        with torch.cuda.device(self.device):
            _check(
                "nvjpegCreateEx", lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, flags, ctypes.byref(self._handle))
            )
            try:
                engines, cores = ctypes.c_uint(), ctypes.c_uint()
                _check(
                    "nvjpegGetHardwareDecoderInfo",
                    lib.nvjpegGetHardwareDecoderInfo(self._handle, ctypes.byref(engines), ctypes.byref(cores)),
                )
                self.engines, self.cores_per_engine = engines.value, cores.value
                _check("nvjpegJpegStateCreate", lib.nvjpegJpegStateCreate(self._handle, ctypes.byref(self._state)))
                for s, scale in enumerate(SCALES):
                    params = ctypes.c_void_p()
                    _check("nvjpegDecodeParamsCreate", lib.nvjpegDecodeParamsCreate(self._handle, ctypes.byref(params)))
                    self._params[scale] = params
                    _check(
                        "nvjpegDecodeParamsSetOutputFormat", lib.nvjpegDecodeParamsSetOutputFormat(params, _OUTPUT_RGBI)
                    )
                    _check("nvjpegDecodeParamsSetScaleFactor", lib.nvjpegDecodeParamsSetScaleFactor(params, s))
            except BaseException:
                self.close()
                raise

    def decode(
        self,
        datas: Sequence[torch.Tensor | bytes],
        sizes: Sequence[tuple[int, int]],
        scales: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        n = len(datas)
        scales = [1] * n if scales is None else list(scales)
        if not (len(sizes) == len(scales) == n):
            raise ValueError(f"decode: {n} images, {len(sizes)} sizes and {len(scales)} scales")
        if n == 0:
            return []
        bad = [s for s in scales if s not in SCALES]
        if bad:
            raise ValueError(f"scales: expected each of {SCALES}, got {bad[0]!r}")
        keep = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        keep = [d.contiguous() for d in keep]
        outs, images = [], (_Image * n)()
        for i, ((h, w), s) in enumerate(zip(sizes, scales, strict=True)):
            sh, sw = scaled_size(h, w, s)
            out = torch.empty((sh, sw, 3), dtype=torch.uint8, device=self.device)
            images[i].channel[0], images[i].pitch[0] = out.data_ptr(), sw * 3
            outs.append(out)
        pointers = (ctypes.c_void_p * n)(*[d.data_ptr() for d in keep])
        lengths = (ctypes.c_size_t * n)(*[d.numel() for d in keep])
        params = (ctypes.c_void_p * n)(*[self._params[s].value for s in scales])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with torch.cuda.device(self.device):
            if n != self._batch:
                self._batch = 0
                _check(
                    "nvjpegDecodeBatchedInitialize",
                    self._lib.nvjpegDecodeBatchedInitialize(self._handle, self._state, n, 1, _OUTPUT_RGBI),
                )
                self._batch = n
            status = self._lib.nvjpegDecodeBatchedEx(
                self._handle, self._state, pointers, lengths, images, params, ctypes.c_void_p(stream)
            )
        if status != 0:
            self._batch = 0  # a failed batch needs the state initialized again
            raise NvjpegError("nvjpegDecodeBatchedEx", status)
        return outs

    def close(self) -> None:
        lib = self._lib
        for params in self._params.values():
            lib.nvjpegDecodeParamsDestroy(params)
        self._params = {}
        if self._state:
            lib.nvjpegJpegStateDestroy(self._state)
            self._state = ctypes.c_void_p()
        if self._handle:
            lib.nvjpegDestroy(self._handle)
            self._handle = ctypes.c_void_p()

    def __del__(self):
        if getattr(self, "_lib", None) is not None:
            try:
                self.close()
            except Exception:
                pass
