"""FlashAttention-4 (flash-attn-4's CuTe-DSL kernels) varlen attention as one opaque torch op.

`fa4_varlen_attention(q, k, v, cu_seqlens, max_seqlen)` runs `flash_attn.cute.flash_attn_varlen_func`
forward and its package's backward through two custom ops, `dinov3_packing::fa4_varlen` and
`dinov3_packing::fa4_varlen_backward`, the first with the second registered as its autograd formula.
torch.compile therefore sees one call per direction, never the kernels' Python (CuTe-DSL JIT code that
Dynamo cannot trace), and the fake implementations give shapes from q, k and v alone: a pack with other
image sizes changes only tensor sizes and `max_seqlen`, both symbolic after warm-up, so it does not
recompile. The flash-attn-4 package is imported at the first real call only; registering the ops needs
torch alone.
"""

from __future__ import annotations

import torch


def _scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


@torch.library.custom_op("dinov3_packing::fa4_varlen", mutates_args=())
def _fa4_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute import flash_attn_varlen_func

    # The package's own autograd Function must not record here: the op's registered backward replaces it.
    with torch.no_grad():
        out, lse = flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=_scale(q),
            causal=False,
            return_lse=True,
        )
    return out, lse


@_fa4_varlen.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    # flash-attn-4's varlen log-sum-exp is fp32 [heads, total_q] (flash_attn_varlen_func's docstring).
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dinov3_packing::fa4_varlen_backward", mutates_args=())
def _fa4_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(
        q,
        k,
        v,
        out,
        grad_out,
        lse,
        softmax_scale=_scale(q),
        causal=False,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
    )
    return dq, dk, dv


@_fa4_varlen_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    # The lse output feeds nothing that needs a gradient here (`fa4_varlen_attention` drops it).
    dq, dk, dv = _fa4_varlen_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


_fa4_varlen.register_autograd(_backward, setup_context=_setup_context)


def fa4_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Softmax attention (scale 1/sqrt(head_dim)) within each segment of `cu_seqlens`.

    Args:
        q, k, v: `[num_tokens, heads, head_dim]`, fp16/bf16 on a CUDA device of compute capability >= 9.0.
        cu_seqlens: int32 `[num_segments + 1]` cumulative segment offsets, on q's device.
        max_seqlen: the longest segment, a host int (`PackedLayout.max_seqlen`).

    Returns:
        `[num_tokens, heads, head_dim]`.
    """
    return torch.ops.dinov3_packing.fa4_varlen(q, k, v, cu_seqlens, max_seqlen)[0]
