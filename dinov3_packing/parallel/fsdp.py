"""Data-parallel training, applied from outside the model (as torchtitan does).

    model = random_packing_model(arch_config("vitl16"))
    apply_recompute(model, "mlp")             # optional: parallel/recompute.py, or transformers'
                                              # per-block model.gradient_checkpointing_enable()
    compile_model(model, scope="block")       # optional: one graph per block (parallel/compile.py)
    apply_fsdp(model)                         # after torch.distributed.init_process_group

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every block, then the root (embeddings, final norm),
so each block's parameters are all-gathered just before it runs and freed after. Each rank runs its own
packed batch (any mix of sizes; ranks need not have equal token counts). Gradients are averaged over
ranks, so a per-rank loss `sum(per-image losses on this rank) * world_size / global_num_images` gives
exactly the gradient of the global mean loss.

Recomputation needs nothing here: `apply_recompute` and transformers' `GradientCheckpointingLayer` (which
the blocks subclass) both checkpoint inside the block, not its `__call__`, so FSDP2's hooks stay outside
the recomputed region. Compilation must leave them outside its graphs too: `compile_model(model,
scope="block")` compiles each block's `forward`, so the hooks on its `__call__` run between the graphs;
the default `scope="stack"` would put them inside one graph, which torch cannot trace, so `apply_fsdp`
rejects a stack-compiled model (and `compile_model` rejects the stack scope for a sharded one).
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model.modeling import DINOv3ViTPackingModel
from .compile import STACK_UNDER_FSDP, stack_compiled


def apply_fsdp(
    model: DINOv3ViTPackingModel,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> DINOv3ViTPackingModel:
    """Shard `model` in place with FSDP2: one unit per block, plus the root.

    Args:
        model: a `DINOv3ViTPackingModel` (fp32 master weights recommended).
        mesh: a 1-D `DeviceMesh`; default all ranks of the default process group.
        param_dtype: compute dtype of the all-gathered parameters (e.g. torch.bfloat16 on GPU); default
            the parameters' own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps the averaging exact).
        reshard_after_forward: free gathered block parameters after forward (re-gather in backward).

    Returns:
        The same model, its parameters now `DTensor`s sharded on dim 0.
    """
    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    if not torch.distributed.is_initialized():
        raise ValueError("model: apply_fsdp needs torch.distributed.init_process_group() to have been called")
    if stack_compiled(model):
        raise ValueError(f"model: its block stack was compiled as one graph: {STACK_UNDER_FSDP}")
    kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    for layer in model.model.layer:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # The root's parameters (embeddings, norm) are needed first and last: keep them gathered in between.
    fully_shard(model, reshard_after_forward=False, **kw)
    return model
