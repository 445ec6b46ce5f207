"""Shared fixtures: small DINOv3 configs and the Hugging Face reference with the same weights.

Parity tolerance (fp32, CPU): max |packed - reference| / max |reference| <= 1e-5 and min token cosine
>= 0.99999. The packed model computes the same operations as Hugging Face in a different summation order
(one GEMM for q/k/v, patch embedding as a Linear instead of a Conv2d); fp32 rounding then differs by
~1e-6 relative (measured), so 1e-5 is tight while leaving room for BLAS blocking differences.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

REL_TOL = 1e-5
MIN_COS = 0.99999


def tiny_config(**overrides) -> DINOv3ViTConfig:
    """A small DINOv3 config (2 layers, width 32, 4 heads of 8, 4 registers, patch 16) with overrides."""
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        patch_size=16,
        image_size=32,
        layerscale_value=1.0,
    )
    kw.update(overrides)
    return DINOv3ViTConfig(**kw)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL, min_cos: float = MIN_COS):
    """max |got - ref| / max |ref| <= rel_tol and every row's cosine >= min_cos."""
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= rel_tol, f"relative max diff {rel:.3e} > {rel_tol:.0e}"
    cos = F.cosine_similarity(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
    assert cos.min().item() >= min_cos, f"min cosine {cos.min().item():.8f} < {min_cos}"


@pytest.fixture
def tiny():
    return tiny_config


def random_images(sizes, patch_size: int, seed: int = 0, channels: int = 3) -> list[torch.Tensor]:
    """Random pixel tensors of the given sizes in patches: (h, w) -> `[C, h*p, w*p]`, (t, h, w) -> `[t, C, ...]`."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for size in sizes:
        *t, h, w = size
        images.append(torch.randn((*t, channels, h * patch_size, w * patch_size), generator=g))
    return images


@torch.no_grad()
def reference_per_image(ref, images, **kwargs) -> list:
    """Hugging Face `DINOv3ViTModel` run image by image (a clip's frames as one batch): one output each."""
    return [ref(img if img.ndim == 4 else img[None], **kwargs) for img in images]
