"""DINOv3 vision transformers on packed, mixed-resolution input.

The names below load on first use, so `import dinov3_packing` (and the CLI's argument parsing) does not pay
for torch and transformers until a model or tensor is needed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ARCHS": "model.archs",
    "arch_config": "model.archs",
    "normalization_for": "model.archs",
    "DINOv3ViTPackingModel": "model.modeling",
    "PackedModelOutput": "model.modeling",
    "PackedBatch": "packing",
    "PackedLayout": "packing",
    "pack": "packing",
    "patchify": "packing",
    "split": "packing",
    "unpatchify": "packing",
    "load_checkpoint": "weights.load",
    "Loaded": "weights.load",
    "load_packing_model": "weights.load",
    "random_packing_model": "weights.load",
    "reference_model": "weights.load",
    "model_from_pth": "weights.convert",
    "Preprocessor": "data.preprocess",
    "EmbedReader": "apps.embed",
    "embed": "apps.embed",
    "DINOv3VisionTower": "apps.tower",
    "pca_picture": "apps.pca",
    "compile_model": "parallel.compile",
    "apply_fsdp": "parallel.fsdp",
    "apply_recompute": "parallel.recompute",
    "DINOv3ViTPacking": "compat.seed",
    "Dinov3": "compat.seed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinov3_packing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
