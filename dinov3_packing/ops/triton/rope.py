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
        BIAS,
        SUMS,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HALF_P2: tl.constexpr,
        INVERSE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SUMS: tl.constexpr,
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
        col_mask = cols < HALF
        # BIAS and SUMS rows: [planes, heads, 2 * HALF] contiguous; SUMS has one such block per program.
        bias_row = BIAS + plane * HEADS * 2 * HALF + cols
        sums_row = SUMS + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + plane) * HEADS * 2 * HALF + cols
        for h in tl.static_range(HEADS):
            x1 = tl.load(x_row + h * stride_xh, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + h * stride_xh + HALF, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:  # rows past the token count stay zero: they are neither stored nor summed
                b1 = tl.load(bias_row + h * 2 * HALF, mask=col_mask).to(tl.float32)
                b2 = tl.load(bias_row + h * 2 * HALF + HALF, mask=col_mask).to(tl.float32)
                x1 = tl.where(mask, x1 + b1[None, :], 0.0)
                x2 = tl.where(mask, x2 + b2[None, :], 0.0)
            y1 = x1 * c_lo + x2 * s_x2
            y2 = x2 * c_hi + x1 * s_x1
            tl.store(y_row + h * stride_yh, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(y_row + h * stride_yh + HALF, y2.to(Y.dtype.element_ty), mask=mask)
            if HAS_SUMS:
                tl.store(sums_row + h * 2 * HALF, tl.sum(y1, axis=0), mask=col_mask)
                tl.store(sums_row + h * 2 * HALF + HALF, tl.sum(y2, axis=0), mask=col_mask)

    @triton.jit
    def _rope_head_sums_kernel(
        X,
        Y,
        COS,
        SIN,
        SUMS,
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
        ITERS: tl.constexpr,
    ):
        # The rotation of `_rope_kernel` (no bias) with the result's sum over the tokens, for one head of one plane
        # over BLOCK * ITERS tokens per program: the rows are summed into the accumulators as they go and reduced
        # across the program's threads once at the end (`_rope_kernel` reduces every head of every block of rows).
        ph = tl.program_id(0)  # plane * HEADS + head, fastest: the programs of one row block share table rows
        plane = ph // HEADS
        h = ph % HEADS
        first = tl.program_id(1) * (BLOCK * ITERS)
        cols = tl.arange(0, HALF_P2)
        col_mask = cols < HALF
        acc1 = tl.zeros([BLOCK, HALF_P2], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK, HALF_P2], dtype=tl.float32)
        for it in range(ITERS):
            rows = first + it * BLOCK + tl.arange(0, BLOCK)
            mask = (rows < num_tokens)[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            c_lo = tl.load(COS + rows64 * stride_ct + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            c_hi = tl.load(COS + rows64 * stride_ct + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_lo = tl.load(SIN + rows64 * stride_st + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_hi = tl.load(SIN + rows64 * stride_st + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_x2 = s_hi if INVERSE else s_lo
            s_x1 = s_lo if INVERSE else s_hi
            x_row = X + rows64 * stride_xt + plane * stride_xp + h * stride_xh + cols[None, :]
            y_row = Y + rows64 * stride_yt + plane * stride_yp + h * stride_yh + cols[None, :]
            x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * c_lo + x2 * s_x2
            y2 = x2 * c_hi + x1 * s_x1
            tl.store(y_row, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(y_row + HALF, y2.to(Y.dtype.element_ty), mask=mask)
            acc1 += y1
            acc2 += y2
        sums_row = SUMS + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + ph) * 2 * HALF + cols
        tl.store(sums_row, tl.sum(acc1, axis=0), mask=col_mask)
        tl.store(sums_row + HALF, tl.sum(acc2, axis=0), mask=col_mask)


SUMS_LAUNCH: dict = {"kernel": "heads", "block": 32, "num_warps": 4, "iters": 8}
"""How `rope_planes` launches when it sums the result (`sums`) and adds no bias: "rows", `_rope_kernel` (every head
of a block of `block` tokens per program, each head's block reduced on its own), or "heads", `_rope_head_sums_kernel`
(one head of one plane over `block * iters` tokens per program, reduced once); `num_warps` per program. The default
was the fastest of `benchmarks/rope_gpu_check.py`'s seven launches on an H100 (2026-12-07, ViT-L heads, 60,038
tokens, the backward's in-place un-rotation of the q/k planes with their two plane copies): 0.530 ms, against 0.533
without the sums and 0.613 for "rows" with 32 tokens and 4 warps (the sums then cost 2.3 ms of a training step)."""


def check_sums_launch(launch) -> dict:
    """`launch` if it is a launch `SUMS_LAUNCH` may hold: kernel "rows" or "heads", `block` and `num_warps` powers of
    two, `iters` a positive int; else ValueError naming `SUMS_LAUNCH`."""

    def power_of_two(v) -> bool:
        return type(v) is int and v > 0 and v & (v - 1) == 0

    ok = (
        isinstance(launch, dict)
        and set(launch) == {"kernel", "block", "num_warps", "iters"}
        and launch["kernel"] in ("rows", "heads")
        and power_of_two(launch["block"])
        and power_of_two(launch["num_warps"])
        and type(launch["iters"]) is int
        and launch["iters"] > 0
    )
    if not ok:
        raise ValueError(
            "SUMS_LAUNCH: expected {'kernel': 'rows' or 'heads', 'block': a power of two, 'num_warps': a power of "
            f"two, 'iters': a positive int}}, got {launch!r}"
        )
    return launch


# CUDA's limit on a grid's second dimension, where the "heads" launch puts its blocks of rows.
_MAX_GRID_Y = 65_535


def rope_planes(
    x: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    use_kernel: bool | None = None,
    bias: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate (or, with `inverse`, un-rotate) every plane and head of `x [tokens, planes, heads, head_dim]`
    into `out` (same shape; `x` itself for in place) with tables `cos`, `sin` `[tokens, head_dim]`; returns
    `out`. `use_kernel`: None runs the Triton kernel on CUDA tensors and torch ops elsewhere; True forces the
    kernel (CPU tensors only under Triton's interpreter).

    `bias`: a `[planes, heads, head_dim]` tensor added to every token's `x` before the rotation (in fp32 in the
    kernel). `sums`: an fp32 `[planes, heads, head_dim]` tensor that receives the result's sum over the tokens
    (in the kernel, of the fp32 values before their rounding to `out`'s dtype: per block of tokens, then over the
    blocks): with `inverse`, the gradient of such a bias, from the pass that un-rotates the gradient."""
    check_planes(x, out, cos, sin)
    planes, heads, head_dim = x.shape[1:]
    for name, t, dtypes in (("bias", bias, None), ("sums", sums, (torch.float32,))):
        if t is None:
            continue
        if t.shape != (planes, heads, head_dim) or t.device != x.device or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous [planes, heads, head_dim] = {[planes, heads, head_dim]} tensor on "
                f"{x.device}, got {list(t.shape)} on {t.device}"
            )
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name}: expected float32, got {t.dtype}")
    if use_kernel is None:
        use_kernel = x.is_cuda and triton is not None
    if not use_kernel:
        y = rope_reference(x if bias is None else x + bias, cos, sin, inverse)
        out.copy_(y)
        if sums is not None:
            sums.copy_(y.float().sum(0))
        return out
    tokens = x.shape[0]
    if tokens == 0 or planes == 0:
        if sums is not None:
            sums.zero_()
        return out
    half = head_dim // 2
    launch = check_sums_launch(SUMS_LAUNCH) if sums is not None else None
    # (past 65,535 blocks of rows, 16.8M tokens at the default, the "heads" grid would not launch: "rows" does)
    heads_rows = triton.cdiv(tokens, launch["block"] * launch["iters"]) if launch is not None else 0
    if launch is not None and bias is None and launch["kernel"] == "heads" and heads_rows <= _MAX_GRID_Y:
        grid = (planes * heads, heads_rows)
        partial = x.new_empty((grid[1], planes, heads, head_dim), dtype=torch.float32)
        _rope_head_sums_kernel[grid](
            x,
            out,
            cos,
            sin,
            partial,
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
            BLOCK=launch["block"],
            ITERS=launch["iters"],
            num_warps=launch["num_warps"],
        )
        torch.sum(partial, dim=0, out=sums)
        return out
    block = launch["block"] if launch is not None and launch["kernel"] == "rows" else BLOCK_T
    grid = (triton.cdiv(tokens, block), planes)
    partial = x.new_empty((grid[0], planes, heads, head_dim), dtype=torch.float32) if sums is not None else None
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
        x if bias is None else bias,
        x if partial is None else partial,
        HEADS=heads,
        HALF=half,
        HALF_P2=triton.next_power_of_2(half),
        INVERSE=inverse,
        HAS_BIAS=bias is not None,
        HAS_SUMS=partial is not None,
        BLOCK=block,
        num_warps=launch["num_warps"] if launch is not None and launch["kernel"] == "rows" else 4,
    )
    if partial is not None:
        torch.sum(partial, dim=0, out=sums)
    return out
