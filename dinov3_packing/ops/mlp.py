"""The MLP of a block: the one place that knows the fused MLP kernel.

`feed_forward(mlp, x, batch)` runs a block's MLP module, or, when `batch.fused_mlp` is set and the module is
a plain Hugging Face GELU MLP, its up-projection, bias and exact GELU as one Triton GEMM
(`ops/triton/linear_gelu.py`, with a backward, so training takes it too) followed by the module's own
down-projection; with `recompute=True` (`parallel.recompute`'s "mlp" policy) either path runs under
non-reentrant checkpoint. `fused_mlp_setting` validates the model's `fused_mlp=` option; `fused_mlp_runs` is
the device/dtype gate.

Every check here runs inside `torch.compile`'s region, and Dynamo reuses a graph for any module that passes
the graph's guards, a module of another model of the same config included. So each check reads only what
Dynamo guards: types, hook dicts, a batch field, and attributes looked up as Python looks them up (not
`vars()`, whose contents Dynamo does not guard).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.utils.checkpoint import checkpoint
from transformers.activations import GELUActivation
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTMLP

from ..packing import PackedBatch
from .triton.linear_gelu import linear_gelu


def fused_mlp_setting(value: bool | None, use_gated_mlp: bool, hidden_act: str) -> bool:
    """The model's `fused_mlp` option, validated: None (auto) is on wherever the kernel computes the MLP
    exactly (a plain GELU MLP: ViT-S/B/L), not for the gated (SwiGLU) MLPs of ViT-H+ and 7B."""
    if value is None:
        return not use_gated_mlp and hidden_act == "gelu"
    if not isinstance(value, bool):
        raise TypeError(f"fused_mlp: expected a bool or None (auto), got {type(value).__name__}")
    if value and use_gated_mlp:
        raise ValueError(
            "fused_mlp: the fused up-projection + GELU kernel needs a plain GELU MLP; this config has a "
            "gated (SwiGLU) MLP"
        )
    if value and hidden_act != "gelu":
        raise ValueError(f"fused_mlp: the kernel computes the exact GELU; config.hidden_act is {hidden_act!r}")
    return value


def fused_mlp_runs(enabled: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs for a forward, with or without autograd: enabled, CUDA, fp16/bf16."""
    return enabled and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


# The forwards a plain MLP and up-projection run, as they were at import: one patched on the class later (as
# some libraries patch transformers' or torch's modules) is behaviour the fused path must not bypass either.
_MLP_FORWARD = DINOv3ViTMLP.forward
_LINEAR_FORWARD = nn.Linear.forward
_GELU_FORWARD = GELUActivation.forward


def _is_plain(mlp: nn.Module) -> bool:
    """Whether the fused kernel computes exactly what `mlp` would: the Hugging Face GELU MLP with plain
    `nn.Linear` projections and transformers' exact GELU, no hooks and no forward replaced on the instance
    or the class. A replaced or
    wrapped projection (LoRA adapters, quantized layers), a hook or a wrapped forward keeps the module path,
    so nothing attached to the MLP is bypassed."""
    if type(mlp) is not DINOv3ViTMLP or type(mlp.up_proj) is not nn.Linear:
        return False
    # A forward replaced on the instance (a user's wrapper) is behaviour attached to it. Looked up as an
    # attribute, which Dynamo guards (whether the instance holds a `forward`, and which one); it does not
    # guard what `vars(mlp)` contains, so a graph traced for a plain MLP would run for a wrapped one.
    if not (_runs_forward(mlp, _MLP_FORWARD) and _runs_forward(mlp.up_proj, _LINEAR_FORWARD)):
        return False
    # The kernel computes the exact (erf) GELU: the activation must be transformers' GELU module as built for
    # `hidden_act="gelu"`, running `F.gelu` (not replaced, wrapped or switched to its Python form).
    act = mlp.act_fn
    if type(act) is not GELUActivation or not _runs_forward(act, _GELU_FORWARD) or act.act is not F.gelu:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in (mlp, mlp.up_proj, mlp.act_fn)):
        return False
    return not (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _runs_forward(module: nn.Module, function) -> bool:
    """Whether `module.forward` is `function` bound to `module` itself: not another module's forward set on
    the instance (which computes with that module's weights), not a wrapper on the instance or the class."""
    forward = module.forward
    # Not `getattr(forward, "__func__", None)`: Dynamo (torch 2.14) traces that to None for a bound method.
    return isinstance(forward, types.MethodType) and forward.__self__ is module and forward.__func__ is function


def _run(mlp: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return mlp.down_proj(linear_gelu(x, mlp.up_proj.weight, mlp.up_proj.bias))
    return mlp(x)


def feed_forward(mlp: nn.Module, x: torch.Tensor, batch: PackedBatch, recompute: bool = False) -> torch.Tensor:
    """`mlp(x)`, with the up-projection + bias + GELU fused where `batch.fused_mlp` allows it.

    `recompute`: when autograd records, keep only `x` for backward and run the MLP (fused or not) again
    there instead of keeping its 4D-wide activations. The fused op has a backward of its own, so it is
    recomputed like any other op.
    """
    # Decided here, outside the checkpoint: backward's recomputation runs the path the forward took, also
    # when a hook was added or removed in between (the other path would rebuild other saved tensors).
    fused = batch.fused_mlp and _is_plain(mlp)
    if recompute and torch.is_grad_enabled():
        return checkpoint(_run, mlp, x, fused, use_reentrant=False)
    return _run(mlp, x, fused)
