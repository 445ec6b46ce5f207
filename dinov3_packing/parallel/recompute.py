"""Selective activation recomputation, applied from outside the model (as torchtitan applies it).

    apply_recompute(model, "mlp")     # before compile_model and apply_fsdp

Each block's chosen part runs under non-reentrant `torch.utils.checkpoint`: autograd keeps only that part's
input, and backward runs the part's forward again to rebuild what it needs. "attention" and "block" wrap
the part's `forward` on the instance; "mlp" sets the block's `recompute_mlp` flag instead, and the block runs
`ops.feed_forward` under checkpoint, so the fused up-projection + GELU kernel still runs (a wrapped MLP
`forward` is behaviour the fused path must not bypass, so it would turn the kernel off). Policies, from the
least memory saved to the most:
    None          nothing recomputed.
    "gelu"        the GELU output of the fused MLP's training op (`ops.mlp.gelu_mlp`): frees that [tokens, 4D]
                  activation; the backward recomputes it from the kept pre-activation, inside its gradient
                  GEMM's epilogue with quack's kernels (stores one more [tokens, 4D] output there; the default
                  "quack-dgelu" then runs as "quack", keeping the pre-activation) or in an elementwise pass with
                  the Triton kernels ("triton-dgelu", which keeps the GELU's derivative instead of the
                  pre-activation, keeps the output). No effect where the fused op does not run.
                  Not bitwise in bf16: the recomputed output is the GELU of the stored, rounded pre-activation.
    "attention"   the attention sub-block (q/k/v GEMM, RoPE, the attention kernel, output projection):
                  frees q, k, v, the rotated q/k, the kernel's output and statistics; recomputes ~4 D^2 + the
                  attention FLOPs a token per block.
    "mlp"         the MLP (up-projection, GELU, down-projection; fused or not): frees the 4D-wide
                  pre-activation and GELU output, the largest activations of a block; recomputes 16 D^2
                  FLOPs a token per block.
    "block"       the whole block (both of the above plus the norms and residuals); keeps only the
                  block's input, as transformers' `gradient_checkpointing_enable()` does.
The gradients are those without recomputation (the same operations run again on the same inputs; drop
path's RNG state is restored by checkpoint), but for "gelu" in low precision (above). Forwards without autograd run
the part directly.

Transformers' `gradient_checkpointing_enable()` checkpoints every whole block, so it does not combine with
a policy: `apply_recompute` refuses a model where it is on, and it refuses a model `apply_recompute` was
applied to (the model's `recompute_policy`: its checkpoint of each block would nest around the policy's,
and a recomputed attention or MLP would run three times a step).

Composes with `compile_model` (Dynamo traces non-reentrant checkpoint as one region of the graph; the
wrapped forwards and the flag are guarded, so a graph compiled for another model of the same config in the
process is not reused for one with another policy) and with `apply_fsdp` (FSDP2's hooks sit on the block's
`__call__`, outside the recomputed part).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..model.layers import RECOMPUTES
from ..model.modeling import DINOv3ViTPackingModel

RECOMPUTE_POLICIES = (None, "gelu", "attention", "mlp", "block")


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    # What the wrapper runs, for the block's LayerScale fold (`model.layers._plain_attention`): the attention's own
    # forward may take the scale, a user's wrapper under this one may not.
    setattr(run, RECOMPUTES, forward)
    return run


def apply_recompute(model: DINOv3ViTPackingModel, policy: str | None) -> DINOv3ViTPackingModel:
    """Recompute `policy`'s part of every block in backward instead of keeping its activations.

    Args:
        model: a `DINOv3ViTPackingModel`.
        policy: one of `RECOMPUTE_POLICIES` (see the module docstring).

    Returns:
        The same model; parameter names and the state dict are unchanged.
    """
    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"policy: expected one of {RECOMPUTE_POLICIES}, got {policy!r}")
    if policy is None:
        return model
    if any(layer.gradient_checkpointing for layer in model.model.layer):
        raise ValueError(
            "model: transformers' gradient checkpointing is on (gradient_checkpointing_enable()); it recomputes "
            "every block already: turn it off or pass policy=None"
        )
    if model.recompute_policy is not None:
        raise ValueError("model: apply_recompute was already applied to this model")
    # Read by the model's `_set_gradient_checkpointing`, which then refuses transformers' checkpointing.
    model.recompute_policy = policy
    layers = model.model.layer
    if policy in ("mlp", "gelu"):
        for layer in layers:
            setattr(layer, f"recompute_{policy}", True)
        return model
    for layer in layers:
        module = layer.attention if policy == "attention" else layer
        module.forward = _recomputed(module.forward)
    return model
