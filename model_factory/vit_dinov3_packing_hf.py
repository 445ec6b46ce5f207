"""Seed interface: `from vit_dinov3_packing_hf import DINOv3ViTPacking` (implemented in dinov3_packing)."""

from dinov3_packing.modeling import DINOv3ViTPackingModel
from dinov3_packing.wrappers import DINOv3ViTPacking

__all__ = ["DINOv3ViTPacking", "DINOv3ViTPackingModel"]
