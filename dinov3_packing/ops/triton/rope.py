"""RoPE on packed q and k in one Triton pass: the rotation, and its inverse for the backward.

`rope_planes(x, out, cos, sin, inverse)` reads `x [tokens, planes, heads, head_dim]` (any strides with a unit
stride in head_dim: planes 0 and 1 of a fused `[tokens, 3, heads, head_dim]` projection, say) and writes
`out` of the same shape, which may be `x` itself (in place). With the halves `x = [x1, x2]` of each head and
the tables' halves `cos = [c1, c2]`, `sin = [s1, s2]` (`sin` carrying rotate_half's sign, see
`ops.attention.apply_rope`):

    forward  (x * cos + swap_halves(x) * sin):     y1 = x1 c1 + x2 s1,   y2 = x2 c2 + x1 s2
    inverse  (its transpose, the backward of it):   y1 = x1 c1 + x2 s2,   y2 = x2 c2 + x1 s1

in fp32, rounded once to `out`'s dtype, as `torch.compile` computes the same expressions.

Why a kernel of its own: on the H200 the backward that Inductor generated for RoPE on the fa4 training path
(`triton_poi_fused_add_flip_mul_select_backward`, which also assembles the fused q/k/v gradient) took 15.7 ms
of a 295 ms ViT-L step, about three times what its bytes cost at the card's bandwidth
(benchmarks/results/RESULTS.md). Here each program loads a block of tokens' table rows once and rotates
every head and plane of those tokens with contiguous half-row loads; the fa4 op (`ops/fa4.py`) writes the
attention gradients straight into the fused q/k/v gradient and un-rotates its q and k planes in place.

Without CUDA (or triton) `rope_planes` computes the same with torch ops (`rope_reference`); under Triton's
CPU interpreter (`TRITON_INTERPRET=1`) `use_kernel=True` runs the kernel on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

from ..attention import apply_rope, swap_halves

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

# Tokens per program: 32 rows of a 32-element half row in bf16 are 16 bytes per thread of 4 warps.
BLOCK_T = 32


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`rope_planes`' result with torch ops (a new tensor), for `x [tokens, ..., head_dim]` and tables
    `[tokens, head_dim]`: `ops.attention.apply_rope`, or for the inverse `x * cos + swap_halves(x * sin)`
    (the gradient autograd computes for it)."""
    if not inverse:
        return apply_rope(x, cos, sin)
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    return x * cos.view(shape) + swap_halves(x * sin.view(shape))


def check_planes(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The shapes and layouts `rope_planes` takes; raises ValueError naming the argument."""
    if x.ndim != 4:
        raise ValueError(f"x: expected [tokens, planes, heads, head_dim], got shape {tuple(x.shape)}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out: expected x's shape {tuple(x.shape)}, dtype {x.dtype} and device {x.device}, got "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    tokens, head_dim = x.shape[0], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"x: expected an even head_dim (RoPE rotates halves), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (tokens, head_dim) or t.device != x.device:
            raise ValueError(
                f"{name}: expected [tokens, head_dim] = {[tokens, head_dim]} on {x.device}, got "
                f"{list(t.shape)} on {t.device}"
            )
    for name, t in (("x", x), ("out", out), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride in head_dim, got strides {t.stride()}")


if triton is not None:

    @triton.jit
    def _rope_kernel(
        X,
        Y,
        COS,
        SIN,
        num_tokens,
        stride_xt,
        stride_xp,
        stride_xh,
        stride_yt,
        stride_yp,
        stride_yh,
        stride_ct,
        stride_st,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HALF_P2: tl.constexpr,
        INVERSE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        plane = tl.program_id(1)
        cols = tl.arange(0, HALF_P2)
        mask = (rows < num_tokens)[:, None] & (cols < HALF)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        c_lo = tl.load(COS + rows64 * stride_ct + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c_hi = tl.load(COS + rows64 * stride_ct + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_lo = tl.load(SIN + rows64 * stride_st + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_hi = tl.load(SIN + rows64 * stride_st + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # The inverse multiplies x2 by the upper half of sin and x1 by the lower one.
        s_x2 = s_hi if INVERSE else s_lo
        s_x1 = s_lo if INVERSE else s_hi
        x_row = X + rows64 * stride_xt + plane * stride_xp + cols[None, :]
        y_row = Y + rows64 * stride_yt + plane * stride_yp + cols[None, :]
        for h in tl.static_range(HEADS):
            x1 = tl.load(x_row + h * stride_xh, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + h * stride_xh + HALF, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * c_lo + x2 * s_x2
            y2 = x2 * c_hi + x1 * s_x1
            tl.store(y_row + h * stride_yh, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(y_row + h * stride_yh + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rope_planes(
    x: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Rotate (or, with `inverse`, un-rotate) every plane and head of `x [tokens, planes, heads, head_dim]`
    into `out` (same shape; `x` itself for in place) with tables `cos`, `sin` `[tokens, head_dim]`; returns
    `out`. `use_kernel`: None runs the Triton kernel on CUDA tensors and torch ops elsewhere; True forces the
    kernel (CPU tensors only under Triton's interpreter)."""
    check_planes(x, out, cos, sin)
    if use_kernel is None:
        use_kernel = x.is_cuda and triton is not None
    if not use_kernel:
        out.copy_(rope_reference(x, cos, sin, inverse))
        return out
    tokens, planes, heads, head_dim = x.shape
    if tokens == 0 or planes == 0:
        return out
    half = head_dim // 2
    grid = (triton.cdiv(tokens, BLOCK_T), planes)
    _rope_kernel[grid](
        x,
        out,
        cos,
        sin,
        tokens,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        cos.stride(0),
        sin.stride(0),
        HEADS=heads,
        HALF=half,
        HALF_P2=triton.next_power_of_2(half),
        INVERSE=inverse,
        BLOCK=BLOCK_T,
        num_warps=4,
    )
    return out
