"""What the suite runs: workloads (sets of image sizes), their FLOPs, and their inputs in every system's layout."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DINOv3ViTConfig

from ...packing import patchify

SCALING_TOKENS = (4096, 8192, 16384, 32768, 65536, 131072)
FLOPS_DEFINITION = (
    "forward FLOPs = sum over segments of [2 * N_block * n + 2 * N_patch * hw + 4 * n^2 * D * L], "
    "n = tokens of the segment incl. CLS and registers, hw = its patch tokens, N_block = weights of every "
    "Linear in the blocks (q, k, v, o, MLP), N_patch = patch-embedding weights (D * p*p*C), D = width, "
    "L = layers; matmul FLOPs only (norms, biases, RoPE, softmax not counted); padding never counts"
)


@dataclass(frozen=True)
class Workload:
    """A set of images, as pixel sizes `(H, W)`, run through every system as one batch."""

    name: str
    sizes: tuple[tuple[int, int], ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1

    def segments(self, patch_size: int) -> list[tuple[int, int]]:
        return [(h // patch_size, w // patch_size) for h, w in self.sizes]

    def tokens(self, config: DINOv3ViTConfig) -> int:
        prefix = 1 + config.num_register_tokens
        return sum(prefix + h * w for h, w in self.segments(config.patch_size))

    def describe(self, config: DINOv3ViTConfig) -> dict:
        segments = self.segments(config.patch_size)
        return {
            "images": len(self.sizes),
            "tokens": self.tokens(config),
            "patches": sum(h * w for h, w in segments),
            "max_seqlen": 1 + config.num_register_tokens + max(h * w for h, w in segments),
            "tflop": forward_flops(config, segments) / 1e12,
        }


def mixed_sizes(n: int, lo: int = 14, hi: int = 48, seed: int = 0, patch_size: int = 16) -> list[tuple[int, int]]:
    """The issue's mixed-size stream: `rng = random.Random(seed)`, then for each image in turn
    `(16 * rng.randint(lo, hi), 16 * rng.randint(lo, hi))` pixels (height, width)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not cryptography
    return [(patch_size * rng.randint(lo, hi), patch_size * rng.randint(lo, hi)) for _ in range(n)]


def pack_of_tokens(target: int, config: DINOv3ViTConfig, lo: int = 14, hi: int = 48) -> Workload:
    """The longest prefix of the mixed-size stream whose tokens (prefix included) stay within `target`
    (at least one image), so every pack is drawn from the mixed-64 distribution."""
    prefix, p = 1 + config.num_register_tokens, config.patch_size
    stream = mixed_sizes(4 * target // (prefix + lo * lo) + 1, lo, hi, patch_size=p)
    sizes, total = [], 0
    for h, w in stream:
        n = prefix + (h // p) * (w // p)
        if sizes and total + n > target:
            break
        sizes.append((h, w))
        total += n
    return Workload(f"pack-{target // 1024}k" if target >= 1024 else f"pack-{target}", tuple(sizes))


def workloads(config: DINOv3ViTConfig, smoke: bool) -> dict[str, list[Workload]]:
    """The workloads of each section; `smoke` gives tiny ones of the same shapes."""
    if smoke:
        return {
            "mixed": [Workload("mixed-6", tuple(mixed_sizes(6, 1, 4)))],
            "uniform": [Workload("uniform-4x32", ((32, 32),) * 4), Workload("uniform-2x64", ((64, 64),) * 2)],
            "scaling": [pack_of_tokens(t, config, 1, 4) for t in (64, 128)],
        }
    return {
        "mixed": [Workload("mixed-64", tuple(mixed_sizes(64)))],
        "uniform": [Workload("uniform-64x224", ((224, 224),) * 64), Workload("uniform-32x512", ((512, 512),) * 32)],
        "scaling": [pack_of_tokens(t, config) for t in SCALING_TOKENS],
    }


def matmul_params(config: DINOv3ViTConfig) -> tuple[int, int]:
    """`(N_block, N_patch)`: weights of all Linear layers in the blocks, and of the patch embedding."""
    d, i = config.hidden_size, config.intermediate_size
    mlp = (3 if config.use_gated_mlp else 2) * d * i
    n_block = config.num_hidden_layers * (4 * d * d + mlp)
    n_patch = d * config.patch_size**2 * config.num_channels
    return n_block, n_patch


def forward_flops(config: DINOv3ViTConfig, segments: Sequence[tuple[int, int]]) -> float:
    """Useful forward FLOPs of a packed batch, computed from the config alone (no model needed).

    forward FLOPs = sum over segments of [2 * N_block * n + 2 * N_patch * h*w + 4 * n^2 * D * L], where
    n = h*w + 1 + registers is the segment's token count, N_block the weights of every Linear in the blocks
    (q, k, v, o and the MLP's two or three), N_patch = D * p*p*C the patch embedding (applied to patch tokens
    only), D the width and L the layers; 4 * n^2 * D per layer is q k^T plus attn v. Biases, norms, RoPE
    and softmax are not counted. Padding is never counted, so a padded system's MFU is its useful MFU.
    ViT-L/16 on mixed-64 gives 43.31 TFLOP (the issue's 43.3).

    Args:
        config: the model's `DINOv3ViTConfig`.
        segments: `(h, w)` in patches of every segment (frame).
    """
    n_block, n_patch = matmul_params(config)
    prefix, d, layers = 1 + config.num_register_tokens, config.hidden_size, config.num_hidden_layers
    total = 0
    for h, w in segments:
        n = prefix + h * w
        total += 2 * n_block * n + 2 * n_patch * h * w + 4 * n * n * d * layers
    return float(total)


@dataclass
class Inputs:
    """One workload's inputs for every system, already on the device."""

    images: list[torch.Tensor]  # [1, C, H, W] each (HF loop)
    batch: torch.Tensor | None  # [B, C, H, W], uniform workloads only
    hidden_states: torch.Tensor  # [total_patches, p*p*C] (packed)
    grid_thw: torch.Tensor  # [B, 3] int64 on the CPU (host-side metadata)
    naflex: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # padded patches, coords, valid mask


def make_inputs(wl: Workload, patch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random normalized pixels for `wl`, in every layout the systems take, built outside any timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = [torch.randn(1, 3, h, w, device=device, generator=g).to(dtype) for h, w in wl.sizes]
    hidden_states = torch.cat([patchify(img[0], patch_size) for img in images])
    segments = wl.segments(patch_size)
    grid_thw = torch.tensor([(1, h, w) for h, w in segments], dtype=torch.long)
    if wl.uniform:
        return Inputs(images, torch.cat(images), hidden_states, grid_thw, None)
    # Pad to the longest image with a validity mask, as timm's NaFlex collator does.
    longest = max(h * w for h, w in segments)
    patches = hidden_states.new_zeros(len(segments), longest, hidden_states.shape[1])
    coords = torch.zeros(len(segments), longest, 2, dtype=torch.long, device=device)
    valid = torch.zeros(len(segments), longest, dtype=torch.bool, device=device)
    rows = hidden_states.split([h * w for h, w in segments])
    for i, ((h, w), r) in enumerate(zip(segments, rows, strict=True)):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        patches[i, : h * w] = r
        coords[i, : h * w] = torch.stack([ys.flatten(), xs.flatten()], -1)
        valid[i, : h * w] = True
    return Inputs(images, None, hidden_states, grid_thw, (patches, coords, valid))
