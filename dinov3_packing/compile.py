"""torch.compile applied from outside the model, one block at a time.

Each `DINOv3ViTPackedLayer` is compiled once for any pack: the token dimension of its inputs and the
length of `cu_seqlens` are marked dynamic before every call, while widths stay static so that norms and
GEMM epilogues get kernels specialised for the model's width. Attention is an opaque op taking
`cu_seqlens`, so the mix of image sizes never enters the graph; only `max_seqlen` (an int) is specialised
on the first pack and made symbolic by the first pack with another longest image.
"""

from __future__ import annotations

import torch

from .modeling import DINOv3ViTPackingModel


def _mark_token_dims_dynamic(module, args):
    x, cos, sin, layout = args[:4]
    for t in (x, cos, sin, layout.cu_seqlens):
        torch._dynamo.mark_dynamic(t, 0)


def compile_model(
    model: DINOv3ViTPackingModel, mode: str | None = None, fullgraph: bool = True, dynamic: str = "tokens"
) -> DINOv3ViTPackingModel:
    """Compile every block of `model` in place and return the model.

    Args:
        model: a `DINOv3ViTPackingModel`.
        mode: passed to `torch.compile` (e.g. "max-autotune-no-cudagraphs").
        fullgraph: require each block to compile without graph breaks.
        dynamic: "tokens" (token counts symbolic, widths static; default) or "all" (`dynamic=True`).
    """
    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    if dynamic not in ("tokens", "all"):
        raise ValueError(f"dynamic: expected 'tokens' or 'all', got {dynamic!r}")
    for layer in model.model.layer:
        if dynamic == "tokens":
            layer.register_forward_pre_hook(_mark_token_dims_dynamic)
        layer.forward = torch.compile(
            layer.forward, mode=mode, fullgraph=fullgraph, dynamic=True if dynamic == "all" else None
        )
    return model


def compile_stats() -> dict[str, int]:
    """Dynamo's counters: how many graphs were compiled so far (for recompilation checks)."""
    stats = torch._dynamo.utils.counters["stats"]
    return {"unique_graphs": int(stats["unique_graphs"]), "calls_captured": int(stats["calls_captured"])}
