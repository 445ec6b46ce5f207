"""The exact attention kernel: `scaled_dot_product_attention` per run of equal-length segments, as a custom op
with its backward, so torch.compile sees one opaque call whatever the mix of segment lengths."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


# The exact path as a custom op: torch.compile sees one opaque call taking a host tensor of the runs of
# equal-length segments, so packs with other segment lengths reuse the same graph instead of guarding on a
# Python list. Reading a host tensor never waits for the device.
@torch.library.custom_op("dinov3_packing::sdpa_varlen", mutates_args=())
def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Attention per segment with SDPA; `runs` is `PackedLayout.equal_runs_host` (start, count, length)."""
    return sdpa_runs(q, k, v, runs.view(-1, 3).tolist(), 0.0)


@sdpa_varlen.register_fake
def _(q, k, v, runs):
    return torch.empty_like(q)


def _sdpa_varlen_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sdpa_varlen_backward(ctx, grad):
    q, k, v, runs = ctx.saved_tensors
    dq, dk, dv = sdpa_varlen_grad(grad, q, k, v, runs)
    return dq, dk, dv, None


# The backward is an opaque op too: compiled backward graphs must not trace the per-segment loop.
@torch.library.custom_op("dinov3_packing::sdpa_varlen_grad", mutates_args=())
def sdpa_varlen_grad(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sdpa_varlen` with respect to q, k and v, per segment from the softmax identities
    (autograd is not available inside a custom op): with P = softmax(s Q K^T) and O = P V,
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q."""
    scale = q.shape[-1] ** -0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bounds = itertools.chain.from_iterable(
        ((s + i * n, s + (i + 1) * n) for i in range(c)) for s, c, n in runs.view(-1, 3).tolist()
    )
    for start, end in bounds:
        qs, ks, vs, gs = (x[start:end].transpose(0, 1).float() for x in (q, k, v, grad))  # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        o = p @ vs
        ds = p * (gs @ vs.transpose(1, 2) - (gs * o).sum(-1, keepdim=True))
        dq[start:end] = (ds @ ks * scale).transpose(0, 1).to(q.dtype)
        dk[start:end] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1).to(k.dtype)
        dv[start:end] = (p.transpose(1, 2) @ gs).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


@sdpa_varlen_grad.register_fake
def _(grad, q, k, v, runs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


sdpa_varlen.register_autograd(_sdpa_varlen_backward, setup_context=_sdpa_varlen_setup)


def sdpa_runs(q, k, v, runs: list[list[int]], dropout_p: float) -> torch.Tensor:
    # Consecutive segments of equal length are contiguous in memory, so each run is one batched SDPA call on
    # a view: uniform batches cost one call, mixed ones one call per run.
    outputs = []
    for start, count, n in runs:
        qs, ks, vs = (x[start : start + count * n].unflatten(0, (count, n)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
