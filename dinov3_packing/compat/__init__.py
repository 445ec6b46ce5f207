"""The seed document's interface (`DINOv3ViTPacking`, `Dinov3`), kept for `model_factory/` and old callers."""
