"""The systems the suite times: the packed model (eager, compiled), Hugging Face (looped, batched, compiled)
and timm's NaFlexViT, all built from one fp32 CPU model so they share its weights."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from functools import cached_property

import torch
from transformers import DINOv3ViTConfig

from ...model.modeling import DINOv3ViTPackingModel
from ...weights.load import reference_model
from .workloads import Inputs

SYSTEMS = ("packed", "packed-compiled", "hf-loop", "hf-batched", "hf-compiled", "timm-naflex")
BASELINES = ("hf-loop", "hf-batched", "hf-compiled", "timm-naflex")
TIMM_MODELS = {
    "vits16": "vit_small_patch16_dinov3_qkvb",
    "vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "vitb16": "vit_base_patch16_dinov3_qkvb",
    "vitl16": "vit_large_patch16_dinov3_qkvb",
    "vith16plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "vit7b16": "vit_7b_patch16_dinov3",
}


def has_timm() -> bool:
    return importlib.util.find_spec("timm") is not None


def build_timm_naflex(arch: str, depth: int) -> torch.nn.Module:
    """timm's NaFlexViT with the DINOv3 architecture `arch` (Eva DINOv3 config, `use_naflex=True`: RoPE
    'dinov3', 4 registers, layer scale; CLS pooling, no head) and `depth` blocks, random weights, on the CPU."""
    import timm

    return timm.create_model(
        TIMM_MODELS[arch], pretrained=False, use_naflex=True, num_classes=0, global_pool="token", depth=depth
    )


def build_on_device(config: DINOv3ViTConfig, device: torch.device, dtype: torch.dtype) -> DINOv3ViTPackingModel:
    """Random weights of a released architecture, initialised directly on `device` by Hugging Face's own
    init, then cast: building vit7b16 on the CPU in fp32 would take minutes and 27 GB of host memory.
    Speed does not depend on the values (ViT-L mixed-64 on one H100: 92.94 ms with this init, 92.86 ms with
    `random:vitl16`, benchmarks/results/archive/2026-11-25_7f35be6/init_speed_h100.jsonl)."""
    with torch.device(device):
        model = DINOv3ViTPackingModel(config)
    return model.to(dtype=dtype).eval()


class ArchSystems:
    """Every system of one architecture, built on first use from one fp32 CPU model (same weights)."""

    def __init__(self, arch: str, base: DINOv3ViTPackingModel, device: torch.device, dtype: torch.dtype):
        self.arch, self.base, self.device, self.dtype = arch, base, device, dtype
        self.failed: set[str] = set()

    @cached_property
    def packed(self) -> DINOv3ViTPackingModel:
        return copy.deepcopy(self.base).to(self.device, self.dtype).eval()

    @cached_property
    def packed_compiled(self) -> DINOv3ViTPackingModel:
        from ...parallel.compile import compile_model

        return compile_model(copy.deepcopy(self.base).to(self.device, self.dtype).eval())

    @cached_property
    def hf(self) -> torch.nn.Module:
        ref = reference_model(self.base).to(self.device, self.dtype).eval()
        if ref.config._attn_implementation != "sdpa":
            ref.set_attn_implementation("sdpa")
        return ref

    @cached_property
    def hf_compiled(self) -> Callable:
        # Static shapes: each uniform workload gets its own graph, HF's best case.
        return torch.compile(self.hf, dynamic=False)

    @cached_property
    def timm(self) -> torch.nn.Module:
        depth = self.base.config.num_hidden_layers
        return build_timm_naflex(self.arch, depth).to(self.device, self.dtype).eval()

    def runner(self, system: str, x: Inputs) -> tuple[Callable[[], object], dict] | None:
        """`(call, details)` running `system` on `x`, or None where the system does not apply."""
        if system in ("packed", "packed-compiled"):
            model = self.packed if system == "packed" else self.packed_compiled
            backend = model.resolved_attn_backend(inference=True)
            return (lambda: model(x.hidden_states, x.grid_thw)), {"attn_backend": backend, "fused_mlp": model.fused_mlp}
        if system == "hf-loop":
            if x.batch is not None:
                return None
            hf = self.hf

            def loop():
                for img in x.images:
                    hf(pixel_values=img)

            return loop, {"attn": hf.config._attn_implementation}
        if system in ("hf-batched", "hf-compiled"):
            if x.batch is None:
                return None
            hf = self.hf if system == "hf-batched" else self.hf_compiled
            return (lambda: hf(pixel_values=x.batch)), {"attn": self.hf.config._attn_implementation}
        if system == "timm-naflex":
            m = self.timm
            details = {"timm_model": TIMM_MODELS[self.arch], "params": sum(p.numel() for p in m.parameters())}
            if x.naflex is None:
                return (lambda: m.forward_features(x.batch)), {**details, "input": "[B, 3, H, W] batch, no mask"}
            patches, coords, valid = x.naflex
            call = lambda: m.forward_features(patches, patch_coord=coords, patch_valid=valid)  # noqa: E731
            return call, {**details, "input": f"padded to {patches.shape[1]} patches + mask"}
        raise ValueError(f"system: unknown {system!r}")
