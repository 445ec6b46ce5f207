"""A block's residual add and the LayerNorm after it, with the gradients of the biases around them in its backward.

`residual_layer_norm(x, h, norm, bias_in, bias_out)` returns `s = x + h + bias_in` and `y = norm(s)`. The caller
adds `bias_out` to the residual stream after `s` itself, detached (`s + f(y) + bias_out.detach()`), and `s` must
feed nothing else: then the gradient that reaches `s` from the residual stream is the gradient of that sum, whose
sum over the tokens is `bias_out`'s gradient, and the backward returns it from the same pass.

The forward is torch ops (torch.compile fuses the add and the norm as it did before); the backward is one custom op
(`dinov3_packing::residual_norm_backward`, `ops/triton/residual_norm.py`) computing the gradient of `x` and `h` with
the column sums for `bias_in`, `bias_out` and the norm's weight and bias, which torch.compile computed in passes of
their own over `[tokens, D]` tensors. The block (`model.layers`) uses it for its second norm, with the attention's
output bias as `bias_in` and the MLP's down-projection bias as `bias_out`, where both projections take them apart
(`DINOv3ViTPackedLayer`).
"""

from __future__ import annotations

import torch
from torch import nn

from .triton.residual_norm import residual_norm_backward


@torch.library.custom_op("dinov3_packing::residual_norm_backward", mutates_args=())
def _residual_norm_backward_op(
    g_s: torch.Tensor, g_y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_norm_backward(g_s, g_y, s, weight, mean, rstd)


@_residual_norm_backward_op.register_fake
def _(g_s, g_y, s, weight, mean, rstd):
    return torch.empty_like(g_y), s.new_empty((4, s.shape[-1]), dtype=torch.float32)


class _ResidualLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, weight, bias, bias_in, bias_out, eps):
        s = x + h if bias_in is None else x + h + bias_in
        flat = s.reshape(-1, s.shape[-1])
        y, mean, rstd = torch.ops.aten.native_layer_norm(flat, [s.shape[-1]], weight, bias, eps)
        stats = torch.float64 if s.dtype == torch.float64 else torch.float32
        ctx.save_for_backward(flat, weight, mean.to(stats), rstd.to(stats))
        ctx.shape = s.shape
        ctx.has = (bias is not None, bias_in is not None, bias_out is not None)
        return s, y.view(s.shape)

    @staticmethod
    def backward(ctx, g_s, g_y):
        flat, weight, mean, rstd = ctx.saved_tensors
        d = flat.shape[-1]
        g_s = g_s.reshape(-1, d).contiguous()  # (autograd gives zeros where `s` got no gradient)
        g, sums = torch.ops.dinov3_packing.residual_norm_backward(
            g_s, g_y.reshape(-1, d).contiguous(), flat, weight, mean.view(-1), rstd.view(-1)
        )
        has_bias, has_in, has_out = ctx.has
        g = g.view(ctx.shape)
        dtype = weight.dtype
        return (
            g,
            g,
            sums[2].to(dtype),
            sums[3].to(dtype) if has_bias else None,
            sums[0].to(dtype) if has_in else None,
            sums[1].to(dtype) if has_out else None,
            None,
        )


def residual_layer_norm(
    x: torch.Tensor,
    h: torch.Tensor,
    norm: nn.LayerNorm,
    bias_in: torch.Tensor | None = None,
    bias_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` with ``s = x + h (+ bias_in)``, `norm` an affine `nn.LayerNorm` over the last dimension;
    `bias_out` (`[D]`, optional) receives the sum over the tokens of the gradient that reaches `s` from the residual
    stream (see the module docstring for what the caller must do with it). For training: the backward is one pass
    (`ops/triton/residual_norm.py` on CUDA, torch ops elsewhere)."""
    if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
        raise ValueError("norm: expected an affine nn.LayerNorm over the last dimension")
    return _ResidualLayerNorm.apply(x, h, norm.weight, norm.bias, bias_in, bias_out, norm.eps)
