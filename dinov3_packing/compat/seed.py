"""The seed document's interface: `DINOv3ViTPacking` (packed) and `Dinov3` (standard, the reference)."""

from __future__ import annotations

import torch
from torch import nn

from ..weights.load import DEFAULT_CKPT, load_checkpoint, parse_device, reference_model


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (the seed's defaults)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class DINOv3ViTPacking(nn.Module):
    """Packed DINOv3: `forward(hidden_states [total_patches, p*p*C], grid_thw [N, 3]) -> [total_patches, D]`.

    Args:
        ckpt: checkpoint (see `weights/load.py`); default an offline random ViT-S/16.
        device: default CUDA when available, else CPU.
        dtype: default bf16 on CUDA, fp32 on CPU.
        attn_backend: "auto", "triton", "varlen", "flash_attn" or "sdpa".
        fused_mlp: as in `DINOv3ViTPackingModel`: None (default) runs the fused up-projection + GELU kernel
            wherever it applies, False never.

    Attributes:
        model: the underlying `DINOv3ViTPackingModel`.
        patch_size: the model's patch size (16 for DINOv3).
        image_mean, image_std: the normalization the checkpoint expects.
    """

    def __init__(
        self,
        ckpt: str = DEFAULT_CKPT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attn_backend: str = "auto",
        fused_mlp: bool | None = None,
    ):
        super().__init__()
        device = parse_device(device)
        loaded = load_checkpoint(ckpt, device, dtype or default_dtype(device), attn_backend, fused_mlp)
        self.model = loaded.model
        self.patch_size = self.model.patch_size
        self.image_mean, self.image_std = loaded.mean, loaded.std

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Packed patch tokens after the final LayerNorm, CLS and registers removed: `[total_patches, D]`."""
        return self.model(hidden_states, grid_thw).last_hidden_state


class Dinov3(nn.Module):
    """Standard (unpacked) Hugging Face `DINOv3ViTModel` with the same weights as `DINOv3ViTPacking(ckpt)`.

    `forward(pixel_values [B, C, H, W])` returns the patch tokens after the final LayerNorm,
    `[B, h*w, D]`; `.model` is the `DINOv3ViTModel`.
    """

    def __init__(
        self, ckpt: str = DEFAULT_CKPT, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        device = parse_device(device)
        loaded = load_checkpoint(ckpt, "cpu", torch.float32, "sdpa")
        self.model = reference_model(loaded.model).to(device=device, dtype=dtype or default_dtype(device))
        self.patch_size = loaded.model.patch_size
        self.num_prefix_tokens = loaded.model.num_prefix_tokens
        self.image_mean, self.image_std = loaded.mean, loaded.std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            raise ValueError("pixel_values: expected a [B, C, H, W] tensor")
        param = self.model.embeddings.patch_embeddings.weight
        out = self.model(pixel_values.to(device=param.device, dtype=param.dtype))
        return out.last_hidden_state[:, self.num_prefix_tokens :]
