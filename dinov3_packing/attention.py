"""Attention over packed segments: one function, several kernels.

`packed_attention(q, k, v, layout, backend)` attends within each segment of the packed sequence and
never across segments. The model calls only this function; adding a kernel touches only this file.

Backends:
    "varlen":     PyTorch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 varlen; CUDA, fp16/bf16).
    "flash_attn": `flash_attn.flash_attn_varlen_func` from the flash-attn package, when installed.
    "triton":     this package's Triton varlen forward (`kernels/varlen_attention.py`; CUDA, fp16/bf16,
                  head_dim a power of two). Forward only: inference under `torch.no_grad()` /
                  `torch.inference_mode()`.
    "sdpa":       exact reference path: `scaled_dot_product_attention` per run of equal-length segments.
                  Any device and dtype; what CPU and fp32 use.
    "auto":       the fastest of the above that supports the inputs: for inference on CUDA in fp16/bf16
                  `triton` (`AUTO_TRITON_INFERENCE`; measured on the H100, see benchmarks/results), when training
                  `flash_attn` if installed, else `varlen`; otherwise `sdpa`.
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
import torch.nn.functional as F

from .packing import PackedLayout

BACKENDS = ("auto", "varlen", "flash_attn", "triton", "sdpa")

# Whether "auto" runs the Triton kernel for inference (no autograd) on CUDA in fp16/bf16 when it supports the
# head size: 1.45x FlashAttention-2 on the mixed-64 lengths (0.771 vs 1.115 ms per layer on the H100, same
# run, benchmarks/results/kernel_variants_h100.jsonl). False falls back to flash_attn / varlen.
AUTO_TRITON_INFERENCE = True


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def has_varlen_attn() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def has_triton_kernel(head_dim: int | None) -> bool:
    """Whether the Triton varlen kernel can run heads of `head_dim` (None: unknown, so no)."""
    from .kernels import varlen_attention

    if head_dim is None or not varlen_attention.triton_available():
        return False
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    dropout: float = 0.0,
    *,
    inference: bool = False,
    head_dim: int | None = None,
) -> str:
    """Pick the concrete kernel for `backend` on this device and dtype, given the attention dropout
    (`varlen` and `triton` have none), whether autograd is off (`inference`: `triton` is forward-only)
    and the head size; fail before any compute if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend: expected one of {BACKENDS}, got {backend!r}")
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if flash_ok and inference and dropout == 0.0 and AUTO_TRITON_INFERENCE and has_triton_kernel(head_dim):
            return "triton"
        if flash_ok and has_flash_attn():
            return "flash_attn"
        if flash_ok and has_varlen_attn() and dropout == 0.0:
            return "varlen"
        return "sdpa"
    if backend in ("varlen", "flash_attn", "triton"):
        if not flash_ok:
            raise ValueError(
                f"attn_backend: {backend!r} needs a CUDA device and fp16/bf16, got {device.type} and {dtype}; "
                "use 'sdpa' (exact, any device) or 'auto'"
            )
        if backend == "flash_attn" and not has_flash_attn():
            raise ValueError("attn_backend: 'flash_attn' needs the flash-attn package, which is not installed")
        if backend == "varlen" and not has_varlen_attn():
            raise ValueError("attn_backend: 'varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10)")
        if backend in ("varlen", "triton") and dropout > 0.0:
            raise ValueError(
                f"attn_backend: {backend!r} has no attention dropout (config.attention_dropout={dropout} in "
                "training); use 'flash_attn' or 'sdpa', or set attention_dropout to 0"
            )
        if backend == "triton" and not inference:
            raise ValueError(
                "attn_backend: 'triton' is forward-only; run the model under torch.no_grad() or "
                "torch.inference_mode(), or use 'varlen' (or 'auto') when gradients are needed"
            )
        if backend == "triton" and not has_triton_kernel(head_dim):
            raise ValueError(
                f"attn_backend: 'triton' needs triton and a head_dim that is a power of two in 16..256, "
                f"got head_dim={head_dim}; use 'varlen'"
            )
    return backend


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [x2, x1]` along the last dim (rotate_half without its sign, which RoPE's table carries)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` for `x [tokens, ..., head_dim]` and tables `[tokens, head_dim]`,
    `sin` carrying rotate_half's sign (`cat(-sin_1, sin_2)`)."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    return x * cos.view(shape) + swap_halves(x) * sin.view(shape)


def rotary_packed_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: PackedLayout,
    backend: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """RoPE on q and k, then `packed_attention`.

    Args:
        qkv: `[num_tokens, 3, heads, head_dim]` (the fused projection's output).
        cos, sin: `[num_tokens, head_dim]` RoPE tables, `sin` carrying rotate_half's sign
            (`cat(-sin_1, sin_2)`); rows that stay unrotated have cos = 1, sin = 0.
        layout, backend, dropout_p: as in `packed_attention`.

    RoPE is one elementwise pass over q and k (fused by torch.compile). Rotating inside the Triton
    attention kernel instead was measured slower on the H100 (benchmarks/results/RESULTS.md).
    """
    qk = apply_rope(qkv[:, :2], cos, sin)
    return packed_attention(qk[:, 0], qk[:, 1], qkv[:, 2], layout, backend, dropout_p)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    backend: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention within each segment.

    Args:
        q, k, v: `[num_tokens, heads, head_dim]`.
        layout: the batch's `PackedLayout` (cu_seqlens, max_seqlen, seq_lens).
        backend: a concrete backend from `resolve_backend` (not "auto").
        dropout_p: attention dropout (training only; "sdpa" and "flash_attn" support it).

    Returns:
        `[num_tokens, heads, head_dim]`.
    """
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu, n = layout.cu_seqlens, layout.max_seqlen
        return varlen_attn(q, k, v, cu, cu, n, n)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu, n = layout.cu_seqlens, layout.max_seqlen
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout_p)
    if backend == "triton":
        from .kernels.varlen_attention import triton_varlen_attention

        return triton_varlen_attention(q, k, v, layout.cu_seqlens)
    if backend == "sdpa":
        if dropout_p > 0.0:
            return _sdpa_per_segment(q, k, v, layout.seq_lens, dropout_p)
        return sdpa_varlen(q, k, v, layout.cu_seqlens_host)
    raise ValueError(
        f"backend: expected a concrete backend ('varlen', 'flash_attn', 'triton', 'sdpa'), got {backend!r}"
    )


# The exact path as a custom op: torch.compile sees one opaque call taking cu_seqlens, so packs with other
# segment lengths reuse the same graph instead of guarding on (and recompiling for) a Python list. It takes
# the host copy of cu_seqlens: the per-segment loop reads it without waiting for the device.
@torch.library.custom_op("dinov3_packing::sdpa_varlen", mutates_args=())
def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Attention per segment `[cu_seqlens[i], cu_seqlens[i+1])` with SDPA; `[tokens, heads, head_dim]`."""
    seq_lens = cu_seqlens.diff().tolist()
    return _sdpa_per_segment(q, k, v, seq_lens, 0.0)


@sdpa_varlen.register_fake
def _(q, k, v, cu_seqlens):
    return torch.empty_like(q)


def _sdpa_varlen_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sdpa_varlen_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = sdpa_varlen_grad(grad, q, k, v, cu_seqlens)
    return dq, dk, dv, None


# The backward is an opaque op too: compiled backward graphs must not trace the per-segment loop.
@torch.library.custom_op("dinov3_packing::sdpa_varlen_grad", mutates_args=())
def sdpa_varlen_grad(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sdpa_varlen` with respect to q, k and v, per segment from the softmax identities
    (autograd is not available inside a custom op): with P = softmax(s Q K^T) and O = P V,
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q."""
    scale = q.shape[-1] ** -0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        qs, ks, vs, gs = (x[start:end].transpose(0, 1).float() for x in (q, k, v, grad))  # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        o = p @ vs
        ds = p * (gs @ vs.transpose(1, 2) - (gs * o).sum(-1, keepdim=True))
        dq[start:end] = (ds @ ks * scale).transpose(0, 1).to(q.dtype)
        dk[start:end] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1).to(k.dtype)
        dv[start:end] = (p.transpose(1, 2) @ gs).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


@sdpa_varlen_grad.register_fake
def _(grad, q, k, v, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


sdpa_varlen.register_autograd(_sdpa_varlen_backward, setup_context=_sdpa_varlen_setup)


def _sdpa_per_segment(q, k, v, seq_lens: list[int], dropout_p: float) -> torch.Tensor:
    # Consecutive segments of equal length are contiguous in memory, so each run becomes one batched
    # SDPA call on a view: uniform batches cost one call, mixed ones one call per run.
    outputs, start, i = [], 0, 0
    while i < len(seq_lens):
        n, j = seq_lens[i], i
        while j < len(seq_lens) and seq_lens[j] == n:
            j += 1
        end = start + n * (j - i)
        qs, ks, vs = (x[start:end].unflatten(0, (j - i, n)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
        start, i = end, j
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
