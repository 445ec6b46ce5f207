"""Seed interface: the standard (unpacked) `Dinov3` wrapper (implemented in dinov3_packing)."""

from dinov3_packing.compat.seed import Dinov3

__all__ = ["Dinov3"]
