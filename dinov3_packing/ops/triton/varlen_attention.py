"""Variable-length (packed) softmax attention forward in Triton, for inference on CUDA.

`triton_varlen_attention(q, k, v, cu_seqlens)` computes, for each segment `[cu[i], cu[i+1])` and head,
`softmax(q k^T / sqrt(d)) v` within the segment: the same contract as FlashAttention's varlen forward.
It is the online-softmax (FlashAttention) algorithm with fp32 accumulation, written for the segment mix
of packed images (hundreds to a few thousand tokens each, head_dim 64 or 128).

Work is split into blocks of `BLOCK_M` query rows. Segment `i` owns the virtual block ids
`[cu[i] // BLOCK_M + i, cu[i+1] // BLOCK_M + i + 1)`, which is at least `ceil(len_i / BLOCK_M)` of them and
at most one more; a program finds its segment from its id with one vector load of `cu_seqlens` and a
count, so no per-layout block table is built and the grid follows from shapes alone (no host sync).
Programs past their segment's last block exit at once.

The kernel is specialised on the width of that search, the segment count rounded up to a power of two and
to at least `MIN_SEGMENT_SEARCH` (`segment_search_width`), and on nothing else of the pack: the segment count
itself is not specialised (`do_not_specialize`). A new width compiles a new kernel (about a second on the
H200), and a run sees few: every pack of up to 64 images shares one, so where a run's full packs hold at
most 64 images its short last pack no longer compiles its own (the H200 runs of 2026-12-02 found a 0.6-1 s
stall there, packs of ~22 images); packs of more images still meet a new width when one is short.

Inputs: `cu_seqlens` must start at 0, end at the token count and never decrease; that is what `PackedLayout`
builds, and it is not re-checked here (checking values would need a device sync).

Forward only: training goes through PyTorch's `varlen_attn` (which has a backward); the custom op's
backward raises.
"""

from __future__ import annotations

import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

# The query-block height of an explicit `config` without "BLOCK_M"; the virtual block numbering (and so the
# grid) depends on it. The tuned configs carry their own.
BLOCK_M = 128
MIN_SEGMENT_SEARCH = 64


def segment_search_width(num_segments: int) -> int:
    """The kernel's `SEG_P2` for a pack of `num_segments` segments: the next power of two, at least
    `MIN_SEGMENT_SEARCH` (the search masks the entries past the last segment)."""
    return max(MIN_SEGMENT_SEARCH, 1 << max(0, num_segments - 1).bit_length())


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    def _configs():
        # (BLOCK_M, BLOCK_N, warps, stages); docs/kernels.md has the timings behind the list (the 64-row block
        # leads on uniform packs of short segments).
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 64, 4, 3),
                (128, 64, 8, 3),
                (128, 128, 8, 3),
                (128, 64, 4, 4),
                (128, 128, 8, 2),
                (128, 32, 4, 3),
                (64, 64, 4, 3),
            ]
        ]

    @triton.jit(do_not_specialize=["num_segments"])
    def _varlen_fwd_kernel(
        Q,
        K,
        V,
        Out,
        CU,
        num_segments,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        SEG_P2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        head = tl.program_id(1)
        # Find the segment owning virtual block `pid`: the last i with cu[i] // BLOCK_M + i <= pid.
        idx = tl.arange(0, SEG_P2)
        cu = tl.load(CU + idx, mask=idx < num_segments, other=2147483647 - BLOCK_M * SEG_P2)
        first = cu // BLOCK_M + idx
        seg = tl.sum((first <= pid).to(tl.int32), axis=0) - 1
        start = tl.load(CU + seg)
        length = tl.load(CU + seg + 1) - start
        row0 = (pid - (start // BLOCK_M + seg)) * BLOCK_M
        if row0 >= length:
            return

        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + (start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < length, other=0.0)
        # Key/value tile pointers start at the segment (int64 offset) and advance by whole blocks: pointer
        # arithmetic is 64-bit, so no row * stride product can overflow int32 in long segments.
        k_ptrs = K + start.to(tl.int64) * stride_kt + head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + start.to(tl.int64) * stride_vt + head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Full key blocks: no masks. The row max of the raw scores times the (positive) scale is the max of the
        # scaled ones, so the scale enters only through one FMA per score inside exp2's argument.
        full = (length // BLOCK_N) * BLOCK_N
        for _ in range(0, full, BLOCK_N):
            k = tl.load(k_ptrs)
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptrs)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        # The last, partial key block.
        if full < length:
            valid = full + offs_n < length
            k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
            s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        out = acc / l_i[:, None]
        o_ptrs = Out + (start + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < length)

    # Tuned once per head size: the config tuned on mixed packs also suits uniform ones (docs/kernels.md).
    _varlen_fwd_tuned = triton.autotune(configs=_configs(), key=["HEAD_DIM"])(_varlen_fwd_kernel)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Shapes, dtypes, strides and devices (no values: that would sync); raises naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q: expected [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name}: expected shape {tuple(q.shape)}, dtype {q.dtype} and device {q.device} like q, "
                f"got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected unit stride in head_dim, got strides {t.stride()}")
    d = q.shape[-1]
    if not (16 <= d <= 256 and d & (d - 1) == 0):
        raise ValueError(f"q: head_dim must be a power of two in 16..256, got {d}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens: expected a 1-D int32/int64 tensor of segment boundaries [0, ..., tokens] "
            f"(at least 2 entries), got shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected device {q.device} like q, got {cu_seqlens.device}")


# The config the autotuner chose for each key: later launches pass it to the kernel directly, which skips
# the autotuner's per-call host bookkeeping (docs/kernels.md). The key holds everything the autotuner keys on
# (head_dim and the dtype of every tensor argument) plus the device, so the choice is the one it would make.
_TUNED: dict[tuple, dict] = {}
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
_TUNING_LOCK = threading.Lock()


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Run the kernel. `config` (`BLOCK_N`, `num_warps`, `num_stages`, optional `BLOCK_M`) skips autotuning;
    tests use it under the Triton interpreter."""
    check_inputs(q, k, v, cu_seqlens)
    if config is not None and not set(config) <= _CONFIG_KEYS:
        raise ValueError(f"config: expected keys among {sorted(_CONFIG_KEYS)}, got {sorted(config)}")
    total, heads, d = q.shape
    num_segments = cu_seqlens.shape[0] - 1
    if out is None:
        out = torch.empty(total, heads, d, device=q.device, dtype=q.dtype)
    args = (
        q,
        k,
        v,
        out,
        cu_seqlens,
        num_segments,
        d**-0.5 * 1.4426950408889634,  # softmax scale folded into exp2
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
    )
    seg_p2 = segment_search_width(num_segments)
    key = (d, q.dtype, k.dtype, v.dtype, cu_seqlens.dtype, q.device)
    if config is None and key in _TUNED:
        config = _TUNED[key]
    if config is None:

        def grid(meta):  # the block height is part of each config
            return (total // meta["BLOCK_M"] + num_segments, heads)

        with _TUNING_LOCK:  # `best_config` is the autotuner's last choice: read it before another launch
            _varlen_fwd_tuned[grid](*args, HEAD_DIM=d, SEG_P2=seg_p2)
            best = _varlen_fwd_tuned.best_config
            _TUNED[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    else:
        bm = config.get("BLOCK_M", BLOCK_M)
        grid = (total // bm + num_segments, heads)
        _varlen_fwd_kernel[grid](
            *args,
            HEAD_DIM=d,
            SEG_P2=seg_p2,
            BLOCK_M=bm,
            BLOCK_N=config["BLOCK_N"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    return out


# Opaque to torch.compile: the graph holds one call taking cu_seqlens, whatever the mix of segment lengths.
@torch.library.custom_op("dinov3_packing::triton_varlen_attention", mutates_args=())
def triton_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Softmax attention within each segment of `cu_seqlens` (int32, on q's device); q, k, v
    `[tokens, heads, head_dim]` with unit stride in head_dim. Forward only."""
    return launch(q, k, v, cu_seqlens)


@triton_varlen_attention.register_fake
def _(q, k, v, cu_seqlens):
    return q.new_empty(q.shape)


def _no_backward(ctx, grad):
    raise RuntimeError(
        "dinov3_packing::triton_varlen_attention is forward-only; use attn_backend 'varlen' or 'auto' when "
        "gradients are needed"
    )


triton_varlen_attention.register_autograd(_no_backward)
