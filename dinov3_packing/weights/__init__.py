"""Checkpoints: every spelling (random:<arch>, Hub id, folder, .safetensors, Meta/timm .pth) -> a model and
its normalization."""
