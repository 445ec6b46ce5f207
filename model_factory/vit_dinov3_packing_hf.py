"""Seed interface: `from vit_dinov3_packing_hf import DINOv3ViTPacking` (implemented in dinov3_packing)."""

from dinov3_packing.compat.seed import DINOv3ViTPacking
from dinov3_packing.model.modeling import DINOv3ViTPackingModel

__all__ = ["DINOv3ViTPacking", "DINOv3ViTPackingModel"]
