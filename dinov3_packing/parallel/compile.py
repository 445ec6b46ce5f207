"""torch.compile applied from outside the model.

`scope="stack"` (default) compiles the whole block stack as one graph: one guard check and one launch
sequence per forward, and fusions across block boundaries (a block's last residual add with the next
block's LayerNorm). `scope="block"` compiles each block on its own (faster to compile, one guard check per
block). Either way the token dimension of the inputs and the length of `cu_seqlens` are marked dynamic
before every call while widths stay static, so norms and GEMM epilogues get kernels specialised for the
model's width. Attention is an opaque op taking `cu_seqlens`, so the mix of image sizes never enters the
graph; only `max_seqlen` (an int) is specialised on the first pack and made symbolic by the first pack with
another longest image: after those two warm-up packs nothing recompiles.

With FSDP2 (`parallel.fsdp.apply_fsdp`) use `scope="block"`, before or after `apply_fsdp`, as torchtitan
compiles each block: FSDP2 runs hooks around every block's call (all-gather, reshard), and torch marks
them untraceable (`torch._dynamo.disable`), so a stack holding FSDP-wrapped blocks cannot be one graph.
`compile_model` and `apply_fsdp` each raise a ValueError for the stack scope on a sharded model.
"""

from __future__ import annotations

import torch

from ..model.modeling import DINOv3ViTPackingModel

STACK_UNDER_FSDP = (
    "compile_model(scope='stack') compiles the block stack as one graph, and FSDP2's per-block hooks "
    "cannot run inside a compiled graph; pass scope='block' (one graph per block, before or after apply_fsdp)"
)


def _sharded(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():  # torch builds without distributed have no FSDP
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _mark_token_dims_dynamic(module, args):
    x, batch = args[:2]
    layout = batch.layout
    for t in (x, batch.cos, batch.sin, layout.token_segment):
        torch._dynamo.mark_dynamic(t, 0)
    # The segment count may be specialised: training with drop path draws one number per segment, and a
    # pack of a single segment makes that a size-1 tensor, which compiles its own graph.
    for t in (layout.cu_seqlens, layout.cu_seqlens_host, layout.equal_runs_host):
        torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_model(
    model: DINOv3ViTPackingModel,
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: str = "tokens",
    scope: str = "stack",
) -> DINOv3ViTPackingModel:
    """Compile `model`'s blocks in place and return the model.

    Args:
        model: a `DINOv3ViTPackingModel`.
        mode: passed to `torch.compile` (e.g. "max-autotune-no-cudagraphs").
        fullgraph: require the compiled region to have no graph breaks.
        dynamic: "tokens" (token counts symbolic, widths static; default) or "all" (`dynamic=True`).
        scope: "stack" (all blocks in one graph; default) or "block" (one graph per block; the one that
            composes with FSDP2, see the module docstring).
    """
    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    if dynamic not in ("tokens", "all"):
        raise ValueError(f"dynamic: expected 'tokens' or 'all', got {dynamic!r}")
    if scope not in ("stack", "block"):
        raise ValueError(f"scope: expected 'stack' or 'block', got {scope!r}")
    if scope == "stack" and any(_sharded(layer) for layer in model.model.layer):
        raise ValueError(f"scope: the blocks are sharded with FSDP2: {STACK_UNDER_FSDP}")
    modules = [model.model] if scope == "stack" else list(model.model.layer)
    for module in modules:
        if dynamic == "tokens":
            module.register_forward_pre_hook(_mark_token_dims_dynamic)
        module.forward = torch.compile(
            module.forward, mode=mode, fullgraph=fullgraph, dynamic=True if dynamic == "all" else None
        )
    model.model.compiled_scope = scope  # read by `stack_compiled` (parallel.fsdp refuses the stack scope)
    return model


def stack_compiled(model: DINOv3ViTPackingModel) -> bool:
    """Whether `compile_model(model, scope="stack")` ran on `model` (it records the scope on the encoder)."""
    return getattr(model.model, "compiled_scope", None) == "stack"


def compile_stats() -> dict[str, int]:
    """Dynamo's counters: how many graphs were compiled so far (for recompilation checks)."""
    stats = torch._dynamo.utils.counters["stats"]
    return {"unique_graphs": int(stats["unique_graphs"]), "calls_captured": int(stats["calls_captured"])}
