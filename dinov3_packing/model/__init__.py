"""The packed DINOv3 ViT: `layers` (one class per concept) and `modeling` (the model); `archs` (released configs)."""
