"""The released DINOv3 ViT architectures, as explicit `DINOv3ViTConfig`s.

Hugging Face's config defaults differ from the released models (no registers, layerscale 1.0), so every
configuration is spelled out here rather than inherited from the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in `arch_config`: this module loads without transformers (the CLI reads it)
    from transformers import DINOv3ViTConfig

# The offline default checkpoint of every entry point: seeded random weights of the released ViT-S/16.
DEFAULT_CKPT = "random:vits16"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


@dataclass(frozen=True)
class Arch:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    use_gated_mlp: bool
    hub_id: str
    qv_bias: bool = True


ARCHS: dict[str, Arch] = {
    "vits16": Arch(384, 12, 6, 1536, False, "facebook/dinov3-vits16-pretrain-lvd1689m"),
    "vits16plus": Arch(384, 12, 6, 1536, True, "facebook/dinov3-vits16plus-pretrain-lvd1689m"),
    "vitb16": Arch(768, 12, 12, 3072, False, "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    "vitl16": Arch(1024, 24, 16, 4096, False, "facebook/dinov3-vitl16-pretrain-lvd1689m"),
    "vith16plus": Arch(1280, 32, 20, 5120, True, "facebook/dinov3-vith16plus-pretrain-lvd1689m"),
    "vit7b16": Arch(4096, 40, 32, 8192, True, "facebook/dinov3-vit7b16-pretrain-lvd1689m", qv_bias=False),
}

# Names from the seed document, which never existed on the Hub.
SEED_ALIASES: dict[str, str] = {
    "facebook/dinov3-small": "vits16",
    "facebook/dinov3-base": "vitb16",
    "facebook/dinov3-large": "vitl16",
    "facebook/dinov3-huge": "vith16plus",
    "facebook/dinov3-giant": "vit7b16",
}


def arch_config(name: str) -> DINOv3ViTConfig:
    """The `DINOv3ViTConfig` of a released architecture (`vits16`, `vitl16`, ...)."""
    if name not in ARCHS:
        raise ValueError(f"arch: unknown DINOv3 architecture {name!r}; expected one of {sorted(ARCHS)}")
    from transformers import DINOv3ViTConfig

    a = ARCHS[name]
    return DINOv3ViTConfig(
        patch_size=16,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        hidden_act="silu" if a.use_gated_mlp else "gelu",
        use_gated_mlp=a.use_gated_mlp,
        num_register_tokens=4,
        rope_theta=100.0,
        layer_norm_eps=1e-5,
        layerscale_value=1e-5,
        query_bias=a.qv_bias,
        key_bias=False,
        value_bias=a.qv_bias,
        proj_bias=True,
        mlp_bias=True,
        image_size=224,
        num_channels=3,
    )


def normalization_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std a checkpoint expects: SAT-493M models use their own, everything else ImageNet's."""
    if "sat493m" in name.lower():
        return SAT493M_MEAN, SAT493M_STD
    return IMAGENET_MEAN, IMAGENET_STD
