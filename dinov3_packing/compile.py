"""torch.compile applied from outside the model, one block at a time.

Each `DINOv3ViTPackedLayer` is compiled with dynamic shapes: the token count and `max_seqlen` are symbolic
and attention is an opaque op taking `cu_seqlens`, so packs of any size and mix reuse the same graph.
"""

from __future__ import annotations

import torch

from .modeling import DINOv3ViTPackingModel


def compile_model(model: DINOv3ViTPackingModel, mode: str | None = None, fullgraph: bool = True):
    """Compile every block of `model` in place (dynamic token counts) and return the model.

    Args:
        model: a `DINOv3ViTPackingModel`.
        mode: passed to `torch.compile` (e.g. "max-autotune-no-cudagraphs").
        fullgraph: require each block to compile without graph breaks.
    """
    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    for layer in model.model.layer:
        layer.compile(dynamic=True, mode=mode, fullgraph=fullgraph)
    return model


def compile_stats() -> dict[str, int]:
    """Dynamo's counters: how many graphs were compiled so far (for recompilation checks)."""
    stats = torch._dynamo.utils.counters["stats"]
    return {"unique_graphs": int(stats["unique_graphs"]), "calls_captured": int(stats["calls_captured"])}
