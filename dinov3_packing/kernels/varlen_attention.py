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

The kernel is specialised on the segment count rounded up to a power of two (one compile per power
of two). Inputs: `cu_seqlens` must start at 0, end at the token count and never decrease; that is what
`PackedLayout` builds, and it is not re-checked here (checking values would need a device sync).

Forward only: training goes through PyTorch's `varlen_attn` (which has a backward); the custom op's
backward raises.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

# The query-block height every config uses; the virtual block numbering depends on it.
BLOCK_M = 128


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    def _configs():
        return [
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4), (128, 8, 2), (32, 4, 3)]
        ]

    @triton.jit
    def _rotate(x1, x2, c, s, dtype):
        """RoPE on the two halves of a tile: `(x1 c - x2 s, x2 c + x1 s)` in fp32, rounded once to `dtype`."""
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        c, s = c.to(tl.float32), s.to(tl.float32)
        return (x1 * c - x2 * s).to(dtype), (x2 * c + x1 * s).to(dtype)

    @triton.jit
    def _scores(qa, qb, k_ptrs, c_ptrs, s_ptrs, valid, HALF: tl.constexpr, MASKED: tl.constexpr, ROPE_K: tl.constexpr):
        """Scores of one key block against the query tile. Without `ROPE_K`: `qa` is the whole query tile
        and `k_ptrs` addresses whole key rows. With it, `qa`/`qb` are the rotated query halves, `k_ptrs`
        the first half of each key row, and the keys are rotated here (two products of half the depth)."""
        if ROPE_K:
            if MASKED:
                k1 = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
                k2 = tl.load(k_ptrs + HALF, mask=valid[:, None], other=0.0)
                c = tl.load(c_ptrs, mask=valid[:, None], other=0.0)
                s = tl.load(s_ptrs, mask=valid[:, None], other=0.0)
            else:
                k1 = tl.load(k_ptrs)
                k2 = tl.load(k_ptrs + HALF)
                c = tl.load(c_ptrs)
                s = tl.load(s_ptrs)
            ka, kb = _rotate(k1, k2, c, s, qa.dtype)
            return tl.dot(qb, tl.trans(kb), tl.dot(qa, tl.trans(ka)))
        else:
            if MASKED:
                k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
            return tl.dot(qa, tl.trans(k))

    @triton.jit
    def _varlen_fwd_kernel(
        Q,
        K,
        V,
        Out,
        CU,
        COS,
        SIN,
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
        stride_ct,
        stride_st,
        HEAD_DIM: tl.constexpr,
        SEG_P2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROPE_Q: tl.constexpr,
        ROPE_K: tl.constexpr,
    ):
        HALF: tl.constexpr = HEAD_DIM // 2
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
        offs_h = tl.arange(0, HALF)
        q_rows = (start + offs_m)[:, None].to(tl.int64)
        q_mask = offs_m[:, None] < length
        q_base = Q + q_rows * stride_qt + head * stride_qh
        start64 = start.to(tl.int64)
        # Key/value tile pointers start at the segment (int64 offset) and advance by whole blocks: pointer
        # arithmetic is 64-bit, so no row * stride product can overflow int32 in long segments.
        k_rows = K + start64 * stride_kt + head * stride_kh + offs_n[:, None] * stride_kt
        v_ptrs = V + start64 * stride_vt + head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
        c_ptrs = COS + start64 * stride_ct + offs_n[:, None] * stride_ct + offs_h[None, :]
        s_ptrs = SIN + start64 * stride_st + offs_n[:, None] * stride_st + offs_h[None, :]
        if ROPE_K:
            # Query and keys as halves: both are rotated here; scores are two products of depth HALF.
            q1 = tl.load(q_base + offs_h[None, :], mask=q_mask, other=0.0)
            q2 = tl.load(q_base + HALF + offs_h[None, :], mask=q_mask, other=0.0)
            cq = tl.load(COS + q_rows * stride_ct + offs_h[None, :], mask=q_mask, other=0.0)
            sq = tl.load(SIN + q_rows * stride_st + offs_h[None, :], mask=q_mask, other=0.0)
            qa, qb = _rotate(q1, q2, cq, sq, Q.dtype.element_ty)
            k_ptrs = k_rows + offs_h[None, :]
        else:
            qa = tl.load(q_base + offs_d[None, :], mask=q_mask, other=0.0)
            if ROPE_Q:
                # The query tile is read once per program: rotate it here, from a second load of the same
                # rows with the halves swapped, and the tables' halves broadcast over both halves.
                offs_hd = offs_d % HALF
                q_sw = tl.load(q_base + (offs_d + HALF) % HEAD_DIM, mask=q_mask, other=0.0).to(tl.float32)
                cq = tl.load(COS + q_rows * stride_ct + offs_hd[None, :], mask=q_mask, other=0.0).to(tl.float32)
                sq = tl.load(SIN + q_rows * stride_st + offs_hd[None, :], mask=q_mask, other=0.0).to(tl.float32)
                sign = tl.where(offs_d < HALF, -1.0, 1.0)
                qa = (qa.to(tl.float32) * cq + q_sw * sq * sign[None, :]).to(Q.dtype.element_ty)
            qb = qa
            k_ptrs = k_rows + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Full key blocks: no masks.
        full = (length // BLOCK_N) * BLOCK_N
        for _ in range(0, full, BLOCK_N):
            s = _scores(qa, qb, k_ptrs, c_ptrs, s_ptrs, offs_n, HALF, False, ROPE_K) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptrs)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
            c_ptrs += BLOCK_N * stride_ct
            s_ptrs += BLOCK_N * stride_st
        # The last, partial key block.
        if full < length:
            valid = full + offs_n < length
            s = _scores(qa, qb, k_ptrs, c_ptrs, s_ptrs, valid, HALF, True, ROPE_K) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        out = acc / l_i[:, None]
        o_ptrs = Out + (start + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < length)

    # Tuned once per head size: the config tuned on mixed-64 also beat the fixed alternatives on uniform
    # packs (H100, kernels_h100.txt).
    _varlen_fwd_tuned = triton.autotune(configs=_configs(), key=["HEAD_DIM", "ROPE_Q", "ROPE_K"])(_varlen_fwd_kernel)


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


def check_rope(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, rope_k: bool) -> None:
    """The RoPE tables: both or neither, `[tokens, head_dim // 2]` floats on q's device, unit stride in the
    last dim; `rope_k` needs them."""
    if (cos is None) != (sin is None):
        raise ValueError("cos, sin: expected both RoPE tables or neither")
    if cos is None:
        if rope_k:
            raise ValueError("rope_k: rotating the keys in the kernel needs the cos and sin tables")
        return
    want = (q.shape[0], q.shape[-1] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want or not t.is_floating_point() or t.device != q.device or t.stride(-1) != 1:
            raise ValueError(
                f"{name}: expected a floating [tokens, head_dim // 2] = {list(want)} table on {q.device} with unit "
                f"stride in the last dim, got shape {tuple(t.shape)}, {t.dtype}, {t.device}, strides {t.stride()}"
            )


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_k: bool = False,
) -> torch.Tensor:
    """Run the kernel. `config` (`BLOCK_N`, `num_warps`, `num_stages`) skips autotuning; tests use it
    under the Triton interpreter.

    With `cos` and `sin` (`[tokens, head_dim // 2]`: the angle tables' first halves), q is rotated in the
    kernel before the scores, as `q * cat(cos, cos) + rotate_half(q) * cat(sin, sin)` (the rotate_half RoPE
    of Hugging Face, whose tables repeat their halves); with `rope_k` the keys too. Rows that must stay
    unrotated (prefix tokens) carry cos = 1, sin = 0.
    """
    check_inputs(q, k, v, cu_seqlens)
    check_rope(q, cos, sin, rope_k)
    total, heads, d = q.shape
    num_segments = cu_seqlens.shape[0] - 1
    if out is None:
        out = torch.empty(total, heads, d, device=q.device, dtype=q.dtype)
    rope_q = cos is not None
    # Unused table pointers (no RoPE) point at q with zero strides; the kernel never reads them.
    cos_t, sin_t = (cos, sin) if rope_q else (q, q)
    grid = (total // BLOCK_M + num_segments, heads)
    args = (
        q,
        k,
        v,
        out,
        cu_seqlens,
        cos_t,
        sin_t,
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
        cos_t.stride(0) if rope_q else 0,
        sin_t.stride(0) if rope_q else 0,
    )
    seg_p2 = triton.next_power_of_2(num_segments)
    flags = {"HEAD_DIM": d, "SEG_P2": seg_p2, "BLOCK_M": BLOCK_M, "ROPE_Q": rope_q, "ROPE_K": bool(rope_k)}
    if config is None:
        _varlen_fwd_tuned[grid](*args, **flags)
    else:
        _varlen_fwd_kernel[grid](
            *args,
            **flags,
            BLOCK_N=config["BLOCK_N"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    return out


# Opaque to torch.compile: the graph holds one call taking cu_seqlens, whatever the mix of segment lengths.
@torch.library.custom_op("dinov3_packing::triton_varlen_attention", mutates_args=())
def triton_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_k: bool = False,
) -> torch.Tensor:
    """Softmax attention within each segment of `cu_seqlens` (int32, on q's device); q, k, v
    `[tokens, heads, head_dim]` with unit stride in head_dim. With the RoPE half tables `cos`, `sin`
    (`[tokens, head_dim // 2]`) q is rotated in the kernel, and with `rope_k` k too (see `launch`).
    Forward only."""
    return launch(q, k, v, cu_seqlens, cos=cos, sin=sin, rope_k=rope_k)


@triton_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, cos=None, sin=None, rope_k=False):
    return q.new_empty(q.shape)


def _no_backward(ctx, grad):
    raise RuntimeError(
        "dinov3_packing::triton_varlen_attention is forward-only; use attn_backend 'varlen' or 'auto' when "
        "gradients are needed"
    )


triton_varlen_attention.register_autograd(_no_backward)
