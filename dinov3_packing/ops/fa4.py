"""FlashAttention-4 (flash-attn-4's CuTe-DSL kernels) varlen attention as one opaque torch op.

`fa4_varlen_attention(q, k, v, cu_seqlens, max_seqlen)` runs `flash_attn.cute.flash_attn_varlen_func`
forward and its package's backward through two custom ops, `dinov3_packing::fa4_varlen` and
`dinov3_packing::fa4_varlen_backward`, the first with the second registered as its autograd formula.
torch.compile therefore sees one call per direction, never the kernels' Python (CuTe-DSL JIT code that
Dynamo cannot trace), and the fake implementations give shapes from q, k and v alone: a pack with other
image sizes changes only tensor sizes and `max_seqlen`, both symbolic after warm-up, so it does not
recompile. The flash-attn-4 package is imported at the first real call only; registering the ops needs
torch alone.

`fa4_rope_attention(qkv, cos, sin, cu_seqlens, max_seqlen, qk_bias)` is the same attention taking the fused q/k/v
projection and the RoPE tables (ops `dinov3_packing::fa4_rope_varlen` and its backward): it rotates q and k
with one Triton pass (`ops/triton/rope.py`) before the forward kernel, and in the backward has the kernel
write dq, dk and dv straight into the planes of one `[tokens, 3, heads, head_dim]` gradient and un-rotates
the q and k planes in place. Given the q and k biases (`qk_bias`), the rotating pass adds them and the
un-rotating pass sums their gradient over the tokens, so the projection before the op needs no bias for q and k
and no pass of its own over the `[tokens, 3 D]` gradient for theirs (the model moves v's bias past the attention:
`DINOv3ViTPackingModel.fold_qkv_bias`). Without it, torch.compile builds that gradient from three tensors in an
elementwise kernel of its own, which on the H200 cost 15.7 ms of a 295 ms ViT-L training step
(benchmarks/results/RESULTS.md). `DIRECT_GRADS = False` lets the kernel allocate its gradients instead (one
more copy of dv and a read of dq and dk), for a flash-attn-4 release that refuses strided outputs.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .triton import fa4_dq
from .triton.rope import rope_planes

DIRECT_GRADS = True

FUSED_DQ_ROPE = True
"""The backward of `fa4_rope_attention` (with `DIRECT_GRADS`) un-rotates dq in the pass that converts flash-attn-4's
fp32 dQ accumulator (`ops/triton/fa4_dq.py`) instead of flash-attn-4's postprocess and a RoPE pass after it, where
the accumulator has the layout that module knows (SM90, head_dim 64); dq is then rounded once instead of twice.
False: the postprocess, then the un-rotating pass over the q and k planes, as before."""

_DQ_LAYOUT_CHECKED: dict[torch.device, bool] = {}
"""Per device, whether the first captured accumulator converted by `fa4_dq` equalled flash-attn-4's own
postprocess bit for bit (checked once per process and device, before the first fused result is used)."""


def _scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


def _forward(q, k, v, cu_seqlens, max_seqlen):
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


def _backward_kernel(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, **grads):
    """flash-attn-4's varlen backward; `grads`: dq, dk, dv tensors for it to write into (else it allocates)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    return _flash_attn_bwd(
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
        **grads,
    )


@torch.library.custom_op("dinov3_packing::fa4_varlen", mutates_args=())
def _fa4_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, max_seqlen)


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
    dq, dk, dv = _backward_kernel(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen)
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


@torch.library.custom_op("dinov3_packing::fa4_rope_varlen", mutates_args=())
def _fa4_rope_varlen(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    qk_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, _, heads, head_dim = qkv.shape
    qk = qkv.new_empty((tokens, 2, heads, head_dim))
    rope_planes(qkv[:, :2], qk, cos, sin, bias=qk_bias)
    out, lse = _forward(qk[:, 0], qk[:, 1], qkv[:, 2], cu_seqlens, max_seqlen)
    return out, lse, qk


@_fa4_rope_varlen.register_fake
def _(qkv, cos, sin, cu_seqlens, max_seqlen, qk_bias=None):
    tokens, _, heads, head_dim = qkv.shape
    return (
        qkv.new_empty((tokens, heads, head_dim)),
        qkv.new_empty((heads, tokens), dtype=torch.float32),
        qkv.new_empty((tokens, 2, heads, head_dim)),
    )


@torch.library.custom_op("dinov3_packing::fa4_rope_varlen_backward", mutates_args=())
def _fa4_rope_varlen_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    qk: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    qk_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dqkv, the q/k bias gradient [2, heads, head_dim] or an empty tensor)``: given `qk_bias` (when its gradient
    is needed), the un-rotating pass also sums the q and k planes' gradient over the tokens (in fp32, rounded once
    to the bias's dtype)."""
    dqkv = qkv.new_empty(qkv.shape)
    q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
    sums = qkv.new_empty((2, *qkv.shape[2:]), dtype=torch.float32) if qk_bias is not None else None
    if DIRECT_GRADS:
        dq = dqkv[:, 0]
        fuse = FUSED_DQ_ROPE and _DQ_LAYOUT_CHECKED.get(dq.device, True) and q.shape[-1] == fa4_dq.HEAD_DIM
        with fa4_dq.capture_dq_accum(dq) if fuse else contextlib.nullcontext() as captured:
            _backward_kernel(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, dq=dq, dk=dqkv[:, 1], dv=dqkv[:, 2])
        if captured is not None and captured.accum is not None:
            if _dq_layout_checked(captured, dq, cu_seqlens, max_seqlen) and _dq_rope(
                captured, dq, cu_seqlens, max_seqlen, cos, sin, sums
            ):
                k_sums = None if sums is None else sums[1:2]
                rope_planes(dqkv[:, 1:2], dqkv[:, 1:2], cos, sin, inverse=True, sums=k_sums)
                return dqkv, qkv.new_empty(0) if sums is None else sums.to(qk_bias.dtype)
            captured.run_postprocess()  # flash-attn-4's own conversion into dq, then the pass below
        rope_planes(dqkv[:, :2], dqkv[:, :2], cos, sin, inverse=True, sums=sums)
    else:
        dq, dk, dv = _backward_kernel(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen)
        for plane, grad in enumerate((dq, dk)):
            part = None if sums is None else sums[plane : plane + 1]
            rope_planes(grad.unsqueeze(1), dqkv[:, plane : plane + 1], cos, sin, inverse=True, sums=part)
        dqkv[:, 2].copy_(dv)
    return dqkv, qkv.new_empty(0) if sums is None else sums.to(qk_bias.dtype)


def _dq_rope(captured, dq, cu_seqlens, max_seqlen, cos, sin, sums) -> bool:
    """`fa4_dq`'s conversion with the rotation into `dq` (and the q bias's sums into `sums[0]`); False, with a warning
    and the fusion off on dq's device for the process, where its kernel fails to build or launch (the caller then
    converts with flash-attn-4's postprocess: the accumulator is untouched)."""
    try:
        q_sums = None if sums is None else sums[0]
        fa4_dq.dq_rope_from_accum(captured.accum, dq, cu_seqlens, captured.scale, cos, sin, q_sums)
    except Exception as error:  # any failure of the optional kernel falls back to the exact path
        warnings.warn(
            f"dinov3_packing: the dQ conversion with RoPE (ops/triton/fa4_dq.py) failed ({type(error).__name__}: "
            f"{error}); the backward uses flash-attn-4's postprocess and a separate RoPE pass instead",
            RuntimeWarning,
            stacklevel=2,
        )
        _DQ_LAYOUT_CHECKED[dq.device] = False
        return False
    return True


def _dq_layout_checked(captured, dq: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> bool:
    """Whether `fa4_dq` may convert `captured`'s accumulator on dq's device: the first time, its conversion (without
    the rotation) is compared with flash-attn-4's postprocess of the same accumulator, bit for bit (one host sync);
    a mismatch warns and turns the fusion off on that device for the process."""
    device = dq.device
    if device not in _DQ_LAYOUT_CHECKED:
        ours = torch.empty_strided(dq.shape, dq.stride(), dtype=dq.dtype, device=device)
        theirs = torch.empty_strided(dq.shape, dq.stride(), dtype=dq.dtype, device=device)
        try:
            captured.run_postprocess(theirs)
            fa4_dq.dq_rope_from_accum(captured.accum, ours, cu_seqlens, captured.scale)
            same = bool(torch.equal(ours, theirs))
        except Exception:  # the optional kernel (or the capture) failed: the exact path stays
            same = False
        if not same:
            warnings.warn(
                "dinov3_packing: ops/triton/fa4_dq.py's conversion of flash-attn-4's dQ accumulator differs from "
                "flash-attn-4's postprocess (or failed); the backward uses the postprocess and a separate RoPE pass "
                "instead on this device",
                RuntimeWarning,
                stacklevel=2,
            )
        _DQ_LAYOUT_CHECKED[device] = same
    return _DQ_LAYOUT_CHECKED[device]


@_fa4_rope_varlen_backward.register_fake
def _(grad_out, qkv, qk, out, lse, cos, sin, cu_seqlens, max_seqlen, qk_bias=None):
    return qkv.new_empty(qkv.shape), qkv.new_empty(0) if qk_bias is None else torch.empty_like(qk_bias)


def _rope_setup_context(ctx, inputs, output):
    qkv, cos, sin, cu_seqlens, max_seqlen, qk_bias = inputs
    out, lse, qk = output
    ctx.save_for_backward(qkv, qk, out, lse, cos, sin, cu_seqlens, qk_bias)
    ctx.max_seqlen = max_seqlen


def _rope_backward(ctx, grad_out, grad_lse, grad_qk):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("dinov3_packing::fa4_rope_varlen has no gradient for the RoPE tables (cos, sin)")
    qkv, qk, out, lse, cos, sin, cu_seqlens, qk_bias = ctx.saved_tensors
    bias = qk_bias if qk_bias is not None and ctx.needs_input_grad[5] else None
    # lse and the rotated q/k are outputs for the backward's sake: nothing else reads them.
    dqkv, dbias = _fa4_rope_varlen_backward(
        grad_out.contiguous(), qkv, qk, out, lse, cos, sin, cu_seqlens, ctx.max_seqlen, bias
    )
    return dqkv, None, None, None, None, dbias if bias is not None else None


_fa4_rope_varlen.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def fa4_rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    qk_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE on q and k (`ops.attention.apply_rope`'s formula and tables), then `fa4_varlen_attention`.

    Args:
        qkv: `[num_tokens, 3, heads, head_dim]` (the fused projection; unit stride in head_dim).
        cos, sin: `[num_tokens, head_dim]` RoPE tables (`PackedBatch.cos`, `.sin`), without gradients.
        cu_seqlens, max_seqlen: as for `fa4_varlen_attention`.
        qk_bias: None, or a contiguous `[2, heads, head_dim]` floating bias on qkv's device, added to q and k before
            the rotation (the projection's q and k biases, left out of the projection), whose gradient the backward
            sums. Anything else raises ValueError or TypeError naming it.

    Returns:
        `[num_tokens, heads, head_dim]`.
    """
    from .attention import check_qk_bias

    check_qk_bias(qk_bias, qkv)
    return torch.ops.dinov3_packing.fa4_rope_varlen(qkv, cos, sin, cu_seqlens, max_seqlen, qk_bias)[0]
