"""flash-attn-4's dQ postprocess on SM90 with RoPE's inverse and the q bias's gradient in the same pass.

flash-attn-4's SM90 backward accumulates dQ in fp32 (`dq_accum`, atomically added to by the main kernel), then a
postprocess kernel scales it by the softmax scale and rounds it to bf16 into `dq`. On the training path with RoPE
in the attention op (`ops/fa4.py`), `dq` was then read again by the un-rotating pass (`ops/triton/rope.py`) and
written back. Here one Triton pass reads `dq_accum`, scales, un-rotates in fp32, rounds once into the q plane of the
q/k/v gradient, and sums the un-rotated rows for the q bias's gradient: one read of the fp32 accumulator and one
write of dq instead of a write, a read and a write.

The accumulator's layout is flash-attn-4's, not a public interface, so this module states it and checks it:

- It is `[heads, padded_rows * 64]` fp32. Segment `b` with offset `cu_seqlens[b]` starts at padded row
  `(cu_seqlens[b] + 128 b) // 128 * 128`; its rows go in tiles of 128 (`m_block_size` of the SM90 backward's
  config for head_dim <= 64), each tile 128 x 64 values stored in 8192 consecutive floats.
- Inside a tile the values lie in the order the two MMA warpgroups hold their WGMMA accumulators (the postprocess
  copies them to registers 16 bytes per thread and reads them as that fragment): value `(row, col)` is at
  `4096 w + 512 i + 128 warp + 16 q + 4 p + 2 v1 + v0`, where `row = 64 w + 16 warp + q + 8 v1` and
  `col = 8 i + 2 p + v0` (w: warpgroup, warp within it, q = lane // 4, p = lane % 4, i: the 8-column group; the
  WGMMA m64nNk16 D-fragment of the PTX ISA). So columns `c` and `c + 32`, the two halves RoPE pairs, lie 2048
  floats apart.

`capture_dq_accum` takes the accumulator from flash-attn-4's backward where its dQ postprocess would run (and runs
that postprocess unchanged for any configuration other than the one above): at the first capture it wraps
flash-attn-4's `interface._bwd_postprocess_convert` in a function that runs it for every call except the dQ
conversion of a capture open on the calling thread. `dq_rope_from_accum` does the pass.
The first capture of a process is checked against flash-attn-4's own postprocess, bit for bit, before it is used
(`ops/fa4.py`); a mismatch turns the fusion off for the process with a warning.

Without CUDA (or triton) `dq_rope_from_accum` computes the same with torch ops (`accum_index`); under Triton's CPU
interpreter (`TRITON_INTERPRET=1`) `use_kernel=True` runs the kernel on CPU tensors (the tests).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

TILE_M = 128
"""Rows per accumulator tile: flash-attn-4's SM90 backward `m_block_size` for head_dim <= 64."""
HEAD_DIM = 64
"""The head size whose accumulator layout this module knows (ViT-S/B/L/H+ of DINOv3)."""

# The arguments of flash-attn-4's `_bwd_postprocess_convert` for which the layout above holds (flash-attn-4
# 4.0.0b36's SM90 config for head_dim 64: `_tile_size_bwd_sm90`, two MMA warpgroups stacked along M).
_LAYOUT_ARGS = {
    "block_size": TILE_M,
    "hdim": HEAD_DIM,
    "num_threads": 256,
    "atom_layout": 2,
    "swap_ab": False,
    "use_2cta_instrs": False,
    "cluster_size": 1,
    "hdim_multiple_of": 32,
    "accum_order": None,
    "sink_tensors": None,
    "seqused": None,
}


def padded_starts(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each segment's first row in the accumulator: `(cu_seqlens[b] + 128 b) // 128 * 128` (int64)."""
    starts = cu_seqlens[:-1].long()
    b = torch.arange(starts.numel(), device=starts.device)
    return (starts + TILE_M * b) // TILE_M * TILE_M


def padded_rows(num_tokens: int, num_segments: int) -> int:
    """Rows of flash-attn-4's varlen accumulator (`total_q_rounded_padded`)."""
    return (num_tokens + (num_segments + 1) * TILE_M - 1) // TILE_M * TILE_M


def tile_offset(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The offset of value `(row, col)` inside a 128 x 64 accumulator tile (the module docstring's formula)."""
    w, r = row // 64, row % 64
    row_part = 4096 * w + 128 * (r // 16) + 16 * (r % 8) + 2 * ((r // 8) % 2)
    return row_part + 512 * (col // 8) + 4 * ((col % 8) // 2) + col % 2


def accum_index(cu_seqlens: torch.Tensor, heads: int) -> torch.Tensor:
    """`[tokens, heads, 64]` int64: where each token's dQ value of each head lies in the flat accumulator."""
    cu = cu_seqlens.long()
    tokens = int(cu[-1])
    seg = torch.searchsorted(cu[1:], torch.arange(tokens, device=cu.device), right=True)
    within = torch.arange(tokens, device=cu.device) - cu[seg]
    row = padded_starts(cu_seqlens)[seg] + within  # the token's padded row
    tile_base = (row // TILE_M) * TILE_M * HEAD_DIM
    col = torch.arange(HEAD_DIM, device=cu.device)
    inner = tile_offset((row % TILE_M)[:, None], col[None, :])  # [tokens, 64]
    per_head = padded_rows(tokens, cu.numel() - 1) * HEAD_DIM
    h = torch.arange(heads, device=cu.device)
    return (tile_base[:, None, None] + inner[:, None, :]) + per_head * h[None, :, None]


def check_accum(accum: torch.Tensor, dq: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """The shapes `dq_rope_from_accum` takes; raises ValueError naming the argument."""
    if dq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dq: expected float16, bfloat16 or float32, got {dq.dtype}")
    if accum.device != dq.device or cu_seqlens.device != dq.device:
        raise ValueError(f"accum, cu_seqlens: expected them on dq's device {dq.device}")
    if dq.ndim != 3 or dq.shape[2] != HEAD_DIM or dq.stride(2) != 1:
        raise ValueError(
            f"dq: expected [tokens, heads, {HEAD_DIM}] with a unit stride in head_dim, got {tuple(dq.shape)}"
        )
    tokens, heads = dq.shape[:2]
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected [num_segments + 1] offsets, got shape {tuple(cu_seqlens.shape)}")
    want = (heads, padded_rows(tokens, cu_seqlens.numel() - 1) * HEAD_DIM)
    if tuple(accum.shape) != want or accum.dtype != torch.float32 or not accum.is_contiguous():
        raise ValueError(
            f"accum: expected a contiguous float32 {list(want)} tensor (flash-attn-4's dq_accum), got "
            f"{list(accum.shape)} {accum.dtype}"
        )


if triton is not None:

    @triton.jit
    def _natural_order(x):
        # [512, 4] in storage order (a = 128 i + 32 warp + 4 q + p, v = 2 v1 + v0) -> [64, 32] by (row, col) of
        # one warpgroup's rows: row = 16 warp + 8 v1 + q, col = 8 i + 2 p + v0 (through shared memory)
        x = tl.reshape(x, (4, 4, 8, 4, 2, 2))
        x = tl.permute(x, (1, 4, 2, 0, 3, 5))
        return tl.reshape(x, (64, 32))

    @triton.jit
    def _dq_rope_kernel(
        ACCUM,
        DQ,
        COS,
        SIN,
        SUMS,
        CU_SEQLENS,
        num_segments,
        search_steps,
        scale,
        stride_ah,
        stride_dt,
        stride_dh,
        stride_ct,
        stride_st,
        ROTATE: tl.constexpr,
        HAS_SUMS: tl.constexpr,
        TILE: tl.constexpr,
        HALF: tl.constexpr,
    ):
        # One program per (head, half tile: one warpgroup's 64 rows) of the accumulator's padded tiles: segment b's
        # tiles are numbered from (cu_seqlens[b] + 128 b) // 128 on (its first padded row / 128), so a program finds
        # its segment by a binary search over cu_seqlens; tiles in the padding between segments load and store
        # nothing. It reads the half tile's lower 32 columns and its upper ones (2048 floats further) in storage
        # order, 16 bytes per thread, and puts them in (row, col) order for the rest.
        h = tl.program_id(0)
        tile_id = tl.program_id(1) // 2
        w = tl.program_id(1) % 2
        lo = tile_id * 0  # (int32 scalars: loop-carried values keep their type)
        hi = tile_id * 0 + num_segments
        for _ in range(search_steps):  # the last segment whose first padded tile is at or before tile_id
            mid = (lo + hi) // 2
            before = (tl.load(CU_SEQLENS + mid) + TILE * mid) // TILE <= tile_id
            lo = tl.where(before, mid, lo)
            hi = tl.where(before, hi, mid)
        b = lo
        start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen = tl.load(CU_SEQLENS + b + 1).to(tl.int64) - start
        padded = (start + b * TILE) // TILE * TILE
        m_block = tile_id - padded // TILE
        # the whole tile lies in the accumulator; rows past the segment are ignored
        live = (m_block >= 0) & (m_block * TILE < seqlen)
        a = tl.arange(0, 512)[:, None]
        v = tl.arange(0, 4)[None, :]
        tile = ACCUM + h.to(tl.int64) * stride_ah + (padded + m_block * TILE) * (2 * HALF) + 4096 * w
        lo = tile + 512 * (a // 128) + 4 * (a % 128) + v
        x1 = _natural_order(tl.load(lo, mask=live, other=0.0)) * scale
        x2 = _natural_order(tl.load(lo + 512 * (HALF // 8), mask=live, other=0.0)) * scale  # 4 groups of 8 further
        row = 64 * w + tl.arange(0, 64)
        cols = tl.arange(0, HALF)[None, :]
        mask = (live & ((m_block * TILE + row) < seqlen))[:, None]
        tokens = (start + m_block * TILE + row)[:, None]
        if ROTATE:  # the inverse rotation (ops/triton/rope.py): y1 = x1 c1 + x2 s2, y2 = x2 c2 + x1 s1
            c_lo = tl.load(COS + tokens * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
            c_hi = tl.load(COS + tokens * stride_ct + HALF + cols, mask=mask, other=0.0).to(tl.float32)
            s_lo = tl.load(SIN + tokens * stride_st + cols, mask=mask, other=0.0).to(tl.float32)
            s_hi = tl.load(SIN + tokens * stride_st + HALF + cols, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * c_lo + x2 * s_hi
            y2 = x2 * c_hi + x1 * s_lo
        else:
            y1 = x1
            y2 = x2
        out = DQ + tokens * stride_dt + h * stride_dh + cols
        tl.store(out, y1.to(DQ.dtype.element_ty), mask=mask)
        tl.store(out + HALF, y2.to(DQ.dtype.element_ty), mask=mask)
        if HAS_SUMS:  # this program's part of the column sums; SUMS: [2 * padded tiles, heads, 64]
            part = SUMS + (tl.program_id(1) * tl.num_programs(0) + h) * (2 * HALF)
            part = part + tl.arange(0, HALF)
            tl.store(part, tl.sum(tl.where(mask, y1, 0.0), axis=0))
            tl.store(part + HALF, tl.sum(tl.where(mask, y2, 0.0), axis=0))


def dq_rope_from_accum(
    accum: torch.Tensor,
    dq: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Write `dq [tokens, heads, 64]` (any token and head strides) from flash-attn-4's fp32 accumulator: `accum *
    scale`, un-rotated by RoPE's inverse with tables `cos`, `sin [tokens, 64]` (`ops/triton/rope.py`'s convention)
    when they are given, in fp32 and rounded once to `dq`'s dtype; returns `dq`. `sums`: an fp32 `[heads, 64]`
    tensor that receives the column sums over the tokens of the fp32 result (the q bias's gradient). `use_kernel` as
    for `rope_planes`."""
    check_accum(accum, dq, cu_seqlens)
    tokens, heads = dq.shape[:2]
    rotate = cos is not None
    if rotate and (
        sin is None
        or any(t.shape != (tokens, HEAD_DIM) or t.stride(-1) != 1 or t.device != dq.device for t in (cos, sin))
    ):
        raise ValueError(
            f"cos, sin: expected two [tokens, head_dim] = {[tokens, HEAD_DIM]} tables with a unit stride on {dq.device}"
        )
    if sums is not None and (sums.shape != (heads, HEAD_DIM) or sums.dtype != torch.float32):
        raise ValueError(f"sums: expected a float32 [heads, head_dim] = {[heads, HEAD_DIM]} tensor")
    if use_kernel is None:
        use_kernel = dq.is_cuda and triton is not None
    if not use_kernel:
        y = accum.view(-1)[accum_index(cu_seqlens, heads).view(-1)].view(tokens, heads, HEAD_DIM) * scale
        if rotate:
            from .rope import rope_reference

            y = rope_reference(y, cos.float(), sin.float(), inverse=True)
        dq.copy_(y)
        if sums is not None:
            sums.copy_(y.sum(0))
        return dq
    num_segments = cu_seqlens.numel() - 1
    tiles = padded_rows(tokens, num_segments) // TILE_M  # the accumulator's, segments' and padding's
    grid = (heads, 2 * tiles)
    part = accum.new_empty((2 * tiles, heads, HEAD_DIM)) if sums is not None else None
    _dq_rope_kernel[grid](
        accum,
        dq,
        cos if rotate else accum,
        sin if rotate else accum,
        part if part is not None else accum,
        cu_seqlens,
        num_segments,
        max(1, num_segments.bit_length()),
        float(scale),
        accum.stride(0),
        dq.stride(0),
        dq.stride(1),
        cos.stride(0) if rotate else 0,
        sin.stride(0) if rotate else 0,
        ROTATE=rotate,
        HAS_SUMS=part is not None,
        TILE=TILE_M,
        HALF=HEAD_DIM // 2,
        num_warps=4,
    )
    if part is not None:
        torch.sum(part.view(-1, heads, HEAD_DIM), dim=0, out=sums)
    return dq


class Captured:
    """What `capture_dq_accum` took from flash-attn-4's backward: the accumulator and the arguments of the
    postprocess that did not run (`run_postprocess` runs it, into another tensor if given)."""

    def __init__(self):
        self.accum: torch.Tensor | None = None
        self.scale: float | None = None
        self._call = None

    def run_postprocess(self, output: torch.Tensor | None = None) -> None:
        original, arguments = self._call
        original(**{**arguments, **({"output": output} if output is not None else {})})


def layout_matches(call: dict, dq: torch.Tensor) -> bool:
    """Whether a `_bwd_postprocess_convert` call (its arguments by name) converts `dq` (same tensor) from the
    accumulator layout this module knows: SM90, the head_dim-64 config, varlen, no sink, fp32 accumulator."""
    output, accum = call.get("output"), call.get("accum")
    if not isinstance(output, torch.Tensor) or not isinstance(accum, torch.Tensor):
        return False
    if output.data_ptr() != dq.data_ptr() or output.shape != dq.shape or output.stride() != dq.stride():
        return False
    if call.get("arch") is None or int(call["arch"]) // 10 != 9 or call.get("fake_mode"):
        return False
    if call.get("cu_seqlens") is None:
        return False
    return all(k in call and (call[k] is None if v is None else call[k] == v) for k, v in _LAYOUT_ARGS.items())


_LOCAL = threading.local()  # `active`: the (Captured, dq) of the capture open on this thread, if any
_WRAPS = "_dinov3_packing_wraps"  # the attribute of the wrapper that holds the function it wraps


def _wrapper_installed(interface) -> bool:
    """Whether flash-attn-4's `_bwd_postprocess_convert` is (now) this module's wrapper: installed once, at the first
    capture, it runs the function it wraps for every call but the dQ conversion of a capture open on the calling
    thread. False (nothing installed) where the function is missing or takes `*args` or `**kwargs`."""
    current = getattr(interface, "_bwd_postprocess_convert", None)
    if current is None:
        return False
    if getattr(current, _WRAPS, None) is not None:
        return True
    signature = inspect.signature(current)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return False  # (its arguments could not be passed on by name)

    def postprocess(*args, **kwargs):
        active = getattr(_LOCAL, "active", None)
        if active is not None:
            captured, dq = active
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None
            if bound is not None and captured.accum is None:
                bound.apply_defaults()
                if layout_matches(bound.arguments, dq):
                    captured.accum = bound.arguments["accum"]
                    captured.scale = float(bound.arguments["scale"])
                    captured._call = (current, dict(bound.arguments))
                    return None
        return current(*args, **kwargs)

    # flash-attn-4's function reaches its compile cache through its module-level name (`_bwd_postprocess_convert.
    # compile_cache`), which is now the wrapper's: the wrapper shares the function's attributes, the cache included.
    functools.update_wrapper(postprocess, current)
    setattr(postprocess, _WRAPS, current)
    interface._bwd_postprocess_convert = postprocess
    return True


@contextlib.contextmanager
def capture_dq_accum(dq: torch.Tensor):
    """Within the block, flash-attn-4's dQ postprocess into `dq` on this thread is not run where its accumulator has
    the layout this module knows (`layout_matches`): the accumulator is kept in the yielded `Captured` instead (its
    `accum` stays None where the postprocess ran: another configuration, or a flash-attn-4 without that function or
    whose function takes other arguments). Every other postprocess call (dK, dV, other threads) runs unchanged."""
    captured = Captured()
    try:
        from flash_attn.cute import interface
    except ImportError:
        yield captured
        return
    if not _wrapper_installed(interface):
        yield captured
        return
    previous = getattr(_LOCAL, "active", None)
    _LOCAL.active = (captured, dq)
    try:
        yield captured
    finally:
        _LOCAL.active = previous
