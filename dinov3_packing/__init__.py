"""DINOv3 vision transformers on packed, mixed-resolution input."""

from .archs import ARCHS, arch_config
from .checkpoints import load_packing_model, random_packing_model, reference_model
from .modeling import DINOv3ViTPackingModel, PackedModelOutput
from .packing import PackedLayout, pack, patchify, split, unpatchify
from .wrappers import DINOv3ViTPacking

__all__ = [
    "ARCHS",
    "DINOv3ViTPacking",
    "DINOv3ViTPackingModel",
    "PackedLayout",
    "PackedModelOutput",
    "arch_config",
    "load_packing_model",
    "pack",
    "patchify",
    "random_packing_model",
    "reference_model",
    "split",
    "unpatchify",
]
