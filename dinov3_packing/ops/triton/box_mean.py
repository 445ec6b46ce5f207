"""The k x k block mean of decoded 8-bit pixels in one Triton pass, for GPU decoding (`data.gpu_decode`).

`box_mean(x, k)` takes `x [C, H, W]` uint8 with any strides (the hardware decoder's interleaved `[H, W, C]`
output seen as `[C, H, W]`, or torchvision's planar one) and returns float32 `[C, H // k, W // k]`, each value
the mean of a k x k block (the last `H % k` rows and `W % k` columns dropped). The sums are of at most 64
bytes and the division is by a power of two, so the result is exact: the kernel and the torch fallback
(`box_mean_reference`) agree bit for bit.

Why a kernel of its own: on the H200 the torch ways cost more than the whole resize that follows them
(`benchmarks/hw_jpeg_probe.py --parts resize`, one 4032 x 3024 photo to 432 x 576): a float16 copy of the
photo pooled by `avg_pool2d`, 0.27 ms with the resize; a float32 sum over a strided view of the blocks,
0.44 ms. Here each program reads its rows' bytes once, in order, and writes only the small result.

Without CUDA (or triton) `box_mean` runs `box_mean_reference`; under Triton's CPU interpreter
(`TRITON_INTERPRET=1`) `use_kernel=True` runs the kernel on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

FACTORS = (2, 4, 8)
BLOCK_X = 64  # output columns per program: 64 x k x 4 bytes per row of blocks


def box_mean_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """`box_mean` with torch ops: a float32 sum over a view of the blocks, divided by k * k."""
    h, w = x.shape[1] // k, x.shape[2] // k
    blocks = x[:, : h * k, : w * k].unflatten(2, (w, k)).unflatten(1, (h, k))  # [C, h, k, w, k], a view
    return blocks.sum((2, 4), dtype=torch.float32).div_(k * k)


def check_box(x: torch.Tensor, k: int) -> None:
    """What `box_mean` takes; raises TypeError / ValueError naming the argument."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a uint8 tensor [C, H, W], got {what}")
    if not isinstance(k, int) or isinstance(k, bool) or k not in FACTORS:
        raise ValueError(f"k: expected one of {FACTORS}, got {k!r}")
    if x.shape[1] < k or x.shape[2] < k:
        raise ValueError(f"x: expected at least {k} x {k} pixels for k={k}, got {tuple(x.shape[1:])}")


if triton is not None:

    @triton.jit
    def _box_mean_kernel(
        X,
        OUT,
        out_h,
        out_w,
        stride_c,
        stride_y,
        stride_x,
        C: tl.constexpr,
        C_P2: tl.constexpr,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        oy = tl.program_id(0)
        ox = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        dx = tl.arange(0, K)
        c = tl.arange(0, C_P2)
        # [BLOCK, K, C_P2]: output column, column within the block, channel
        mask = (ox < out_w)[:, None, None] & (c < C)[None, None, :]
        cols = (ox[:, None, None] * K + dx[None, :, None]).to(tl.int64) * stride_x
        offsets = cols + c[None, None, :].to(tl.int64) * stride_c
        acc = tl.zeros([BLOCK, C_P2], dtype=tl.float32)
        for dy in tl.static_range(K):
            row = X + (oy * K + dy).to(tl.int64) * stride_y
            acc += tl.sum(tl.load(row + offsets, mask=mask, other=0).to(tl.float32), axis=1)
        acc = acc * (1.0 / (K * K))
        out = OUT + c[None, :].to(tl.int64) * (out_h * out_w) + oy * out_w + ox[:, None]
        tl.store(out, acc, mask=(ox < out_w)[:, None] & (c < C)[None, :])


def box_mean(x: torch.Tensor, k: int, use_kernel: bool | None = None) -> torch.Tensor:
    """The k x k block mean of `x [C, H, W]` uint8 (any strides): float32 `[C, H // k, W // k]`, contiguous
    (module docstring). `use_kernel`: None runs the Triton kernel on CUDA tensors and torch ops elsewhere;
    True forces the kernel (CPU tensors only under Triton's interpreter)."""
    check_box(x, k)
    if use_kernel is None:
        use_kernel = x.is_cuda and triton is not None
    if not use_kernel:
        return box_mean_reference(x, k)
    c, h, w = x.shape[0], x.shape[1] // k, x.shape[2] // k
    out = torch.empty(c, h, w, dtype=torch.float32, device=x.device)
    grid = (h, triton.cdiv(w, BLOCK_X))
    _box_mean_kernel[grid](
        x, out, h, w, x.stride(0), x.stride(1), x.stride(2), C=c, C_P2=triton.next_power_of_2(c), K=k, BLOCK=BLOCK_X
    )
    return out
