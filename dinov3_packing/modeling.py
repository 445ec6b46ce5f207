"""DINOv3 ViT on packed input.

Parameter names are those of `transformers.DINOv3ViTModel`, so any Hugging Face DINOv3 checkpoint loads
as is and `DINOv3ViTModel(config).load_state_dict(model.state_dict())` is exact. The forward takes
`hidden_states [total_patches, p*p*C]` and `grid_thw [num_images, 3]` (see `packing.py`) and runs every
image in one sequence: one matmul embeds all patches, every layer runs once over all tokens, and
attention stays inside each image through `attention.rotary_packed_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTEmbeddings,
    DINOv3ViTGatedMLP,
    DINOv3ViTLayerScale,
    DINOv3ViTMLP,
    DINOv3ViTPreTrainedModel,
    DINOv3ViTRopePositionEmbedding,
    get_patches_center_coordinates,
)

from .attention import BACKENDS, resolve_backend, rotary_packed_attention
from .attention import swap_halves as swap_halves  # re-exported: it lived here before
from .kernels.linear_gelu import linear_gelu
from .packing import PackedLayout, validate_packed_input


@dataclass
class PackedModelOutput(ModelOutput):
    """Output of `DINOv3ViTPackingModel`.

    Attributes:
        last_hidden_state: `[total_patches, D]` patch tokens, rows aligned with the input rows; after the
            final LayerNorm, or the raw output of layer `select_layer` when that is given.
        pooler_output: `[num_segments, D]` CLS token of each segment (frame), normed like `last_hidden_state`.
        register_tokens: `[num_segments, R, D]`, normed like `last_hidden_state`.
        hidden_states: with `output_hidden_states=True`, `num_layers + 1` tensors `[total_patches, D]`:
            the embeddings, then each layer's output (before the final norm), as in Hugging Face.
        layout: the `PackedLayout` of the batch (token positions, cu_seqlens).
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    register_tokens: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    layout: PackedLayout | None = None


class DINOv3ViTPackedEmbeddings(DINOv3ViTEmbeddings):
    """Patch embedding as one matmul over packed rows, plus CLS and registers per segment.

    Keeps the Conv2d parameter (`patch_embeddings.weight [D, C, p, p]`) for checkpoint compatibility and
    applies it as a Linear on (p, p, C)-flattened rows.
    """

    def forward(
        self, hidden_states: torch.Tensor, layout: PackedLayout, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        conv = self.patch_embeddings
        weight = conv.weight.permute(0, 2, 3, 1).flatten(1)
        patches = F.linear(hidden_states.to(weight.dtype), weight, conv.bias)
        if bool_masked_pos is not None:
            patches = torch.where(bool_masked_pos[:, None], self.mask_token[0].to(patches.dtype), patches)
        prefix = torch.cat([self.cls_token[0], self.register_tokens[0]]).to(patches.dtype)
        prefix_rows = prefix.expand(layout.num_segments, -1, -1).flatten(0, 1)
        return torch.cat([prefix_rows, patches])[layout.token_source]


class DINOv3ViTPackedRopeEmbedding(DINOv3ViTRopePositionEmbedding):
    """RoPE tables for every token of a packed batch: `(cos, sin_signed)`, each `[num_tokens, head_dim]`,
    where `sin_signed` carries rotate_half's sign (see `attention.swap_halves`).

    Coordinates are normalised by each segment's own (h, w). Prefix tokens get cos = 1, sin = 0, which
    leaves them unrotated without a gather or scatter inside the layers. Angles are cached per (h, w).
    """

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__(config)
        self.num_prefix = 1 + config.num_register_tokens
        self._angle_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def segment_angles(self, h: int, w: int, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Angles `[num_prefix + h*w, head_dim]` in fp32 for one segment (prefix rows are zero)."""
        if coords is None:
            key = (h, w, str(self.inv_freq.device))
            if key not in self._angle_cache:
                self._angle_cache[key] = self.segment_angles(h, w, self.patch_coords(h, w))
            return self._angle_cache[key]
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cat([angles.new_zeros(self.num_prefix, angles.shape[1]), angles])

    def load_periods(self, periods: torch.Tensor) -> None:
        """Use a checkpoint's RoPE periods (`inv_freq = 1 / periods`) instead of those from `rope_theta`.

        Meta's original files store the periods rounded to bf16 and the original model uses them as
        stored; recomputing them moves outputs by ~1e-3 relative. `inv_freq` is not persistent, so a
        `save_pretrained` copy falls back to `rope_theta` (see `convert.py`).
        """
        if periods.shape != self.inv_freq.shape:
            raise ValueError(f"periods: expected shape {tuple(self.inv_freq.shape)}, got {tuple(periods.shape)}")
        with torch.no_grad():
            self.inv_freq.copy_(1 / periods.to(device=self.inv_freq.device, dtype=torch.float32))
        self._angle_cache.clear()

    def patch_coords(self, h: int, w: int) -> torch.Tensor:
        return get_patches_center_coordinates(h, w, dtype=torch.float32, device=self.inv_freq.device)

    def augmented_coords(self, h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
        """Training-time coordinate augmentation for one segment, drawn as Hugging Face draws it for one
        image (shift, then jitter, then rescale), from `generator` or the global RNG."""
        cfg, coords = self.config, self.patch_coords(h, w)
        draw = {"device": coords.device, "dtype": coords.dtype}
        if cfg.pos_embed_shift is not None:
            s = cfg.pos_embed_shift
            coords = coords + torch.empty(1, 2, **draw).uniform_(-s, s, generator=generator)
        if cfg.pos_embed_jitter is not None:
            r = math.log(cfg.pos_embed_jitter)
            coords = coords * torch.empty(1, 2, **draw).uniform_(-r, r, generator=generator).exp()
        if cfg.pos_embed_rescale is not None:
            r = math.log(cfg.pos_embed_rescale)
            coords = coords * torch.empty(1, **draw).uniform_(-r, r, generator=generator).exp()
        return coords

    def forward(
        self, layout: PackedLayout, dtype: torch.dtype, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            # A fresh draw per segment and forward; never cached.
            segments = [self.segment_angles(h, w, self.augmented_coords(h, w, generator)) for h, w in layout.segment_hw]
        else:
            segments = [self.segment_angles(h, w) for h, w in layout.segment_hw]
        angles = torch.cat(segments)
        # rotate_half(x) * sin == swap_halves(x) * sin_signed, with sin_signed = cat(-sin_1, sin_2): the
        # sign moves into the table (exactly: negation is exact), and the layers avoid a cat and a neg.
        sin = angles.sin()
        sin_signed = torch.cat([-sin[:, : sin.shape[1] // 2], sin[:, sin.shape[1] // 2 :]], dim=1)
        return angles.cos().to(dtype), sin_signed.to(dtype)


class DINOv3ViTPackedAttention(nn.Module):
    """Self-attention over packed tokens. q/k/v stay separate parameters (Hugging Face names) and run as
    one GEMM on their concatenated weights."""

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        d = config.hidden_size
        self.k_proj = nn.Linear(d, d, bias=config.key_bias)
        self.v_proj = nn.Linear(d, d, bias=config.value_bias)
        self.q_proj = nn.Linear(d, d, bias=config.query_bias)
        self.o_proj = nn.Linear(d, d, bias=config.proj_bias)

    def qkv_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projs])
        if all(p.bias is None for p in projs):
            return weight, None
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
        return weight, bias

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout, backend: str
    ) -> torch.Tensor:
        qkv = F.linear(x, *self.qkv_weight_bias()).unflatten(-1, (3, self.num_heads, self.head_dim))
        out = rotary_packed_attention(qkv, cos, sin, layout, backend, self.dropout if self.training else 0.0)
        return self.o_proj(out.flatten(1))


class DINOv3ViTPackedDropPath(nn.Module):
    """Stochastic depth per segment (Hugging Face drops per image)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One draw per segment in segment order, as Hugging Face draws one per image. The count comes from
        # a tensor size, not a Python int, so a compiled block keeps it symbolic.
        num_segments = layout.cu_seqlens.shape[0] - 1
        keep = torch.floor(torch.rand(num_segments, dtype=x.dtype, device=x.device) + keep_prob)
        return x.div(keep_prob) * keep[layout.token_segment][:, None]


class DINOv3ViTPackedLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention and MLP, each with LayerScale and a residual."""

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DINOv3ViTPackedAttention(config)
        self.layer_scale1 = DINOv3ViTLayerScale(config)
        self.drop_path = DINOv3ViTPackedDropPath(config.drop_path_rate)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DINOv3ViTGatedMLP(config) if config.use_gated_mlp else DINOv3ViTMLP(config)
        self.layer_scale2 = DINOv3ViTLayerScale(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout,
        backend: str,
        fused_mlp: bool = False,
    ) -> torch.Tensor:
        h = self.attention(self.norm1(x), cos, sin, layout, backend)
        x = self.drop_path(self.layer_scale1(h), layout) + x
        if fused_mlp and self.mlp_is_plain():
            # Up-projection, bias and exact GELU in one Triton GEMM (kernels/linear_gelu.py).
            mlp = self.mlp
            h = mlp.down_proj(linear_gelu(self.norm2(x), mlp.up_proj.weight, mlp.up_proj.bias))
        else:
            h = self.mlp(self.norm2(x))
        return self.drop_path(self.layer_scale2(h), layout) + x

    def mlp_is_plain(self) -> bool:
        """Whether the fused kernel computes exactly what `self.mlp` would: the Hugging Face GELU MLP with plain
        `nn.Linear` projections and no hooks on them. A replaced or wrapped projection (LoRA adapters,
        quantized layers) or a hook keeps the module path, so nothing attached to the MLP is bypassed."""
        mlp = self.mlp
        if type(mlp) is not DINOv3ViTMLP or type(mlp.up_proj) is not nn.Linear:
            return False
        modules = (mlp, mlp.up_proj, mlp.act_fn)
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            return False
        from torch.nn.modules import module as module_globals

        return not (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


class DINOv3ViTPackedEncoder(nn.Module):
    """The block stack. One call runs the first `num_layers` blocks (all by default)."""

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList([DINOv3ViTPackedLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout,
        backend: str,
        num_layers: int | None = None,
        keep_states: bool = False,
        fused_mlp: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Returns the last block's output and, with `keep_states`, the input and every block's output."""
        states = [x] if keep_states else None
        for layer in self.layer[:num_layers]:
            x = layer(x, cos, sin, layout, backend, fused_mlp)
            if keep_states:
                states.append(x)
        return x, states


class DINOv3ViTPackingModel(DINOv3ViTPreTrainedModel):
    """DINOv3 ViT that runs natively on packed patches of many images of different sizes.

    Args:
        config: a `DINOv3ViTConfig` (see `archs.arch_config` for the released ones).
        attn_backend: "auto" (default), "varlen", "flash_attn", "triton" or "sdpa"; see `attention.py`.
        fused_mlp: run each MLP's up-projection, bias and exact (erf) GELU as one Triton GEMM
            (`kernels/linear_gelu.py`) when the model runs on CUDA in fp16/bf16 without autograd; elsewhere
            the plain ops run. None (default) turns it on wherever it applies: plain GELU MLPs (ViT-S/B/L),
            not the gated (SwiGLU) MLPs of ViT-H+ and 7B. On the H100 it made the compiled ViT-L forward 2-4%
            faster (benchmarks/results/RESULTS.md). A block whose MLP has hooks or a replaced up-projection
            (e.g. a LoRA adapter) runs its module instead, so nothing attached to it is bypassed. True on a
            gated MLP or another activation raises ValueError. Settable after construction (validated the
            same way).
    """

    main_input_name = "hidden_states"
    _can_record_outputs: dict = {}  # noqa: RUF012 - overrides the parent's output-capturing hooks with none

    def __init__(self, config: DINOv3ViTConfig, attn_backend: str = "auto", fused_mlp: bool | None = None):
        super().__init__(config)
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend: expected one of {BACKENDS}, got {attn_backend!r}")
        self.attn_backend = attn_backend
        self.fused_mlp = fused_mlp  # validated by the property below
        self.embeddings = DINOv3ViTPackedEmbeddings(config)
        self.rope_embeddings = DINOv3ViTPackedRopeEmbedding(config)
        self.model = DINOv3ViTPackedEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @property
    def fused_mlp(self) -> bool:
        """Run the MLP up-projection + bias + exact GELU as one Triton GEMM where it applies."""
        return self._fused_mlp

    @fused_mlp.setter
    def fused_mlp(self, value: bool | None) -> None:
        if value is None:  # auto: wherever the kernel applies
            value = not self.config.use_gated_mlp and self.config.hidden_act == "gelu"
        if not isinstance(value, bool):
            raise TypeError(f"fused_mlp: expected a bool or None (auto), got {type(value).__name__}")
        if value and self.config.use_gated_mlp:
            raise ValueError(
                "fused_mlp: the fused up-projection + GELU kernel needs a plain GELU MLP; this config has a "
                "gated (SwiGLU) MLP"
            )
        if value and self.config.hidden_act != "gelu":
            raise ValueError(
                f"fused_mlp: the kernel computes the exact GELU; config.hidden_act is {self.config.hidden_act!r}"
            )
        self._fused_mlp = value

    def resolved_attn_backend(self, inference: bool = True) -> str:
        """The attention kernel `attn_backend` runs on this model's device and dtype; `inference`: no
        autograd (under `torch.no_grad()` / `torch.inference_mode()`, or no tensor requiring grad)."""
        dropout = self.config.attention_dropout if self.training else 0.0
        return resolve_backend(
            self.attn_backend,
            self.norm.weight.device,
            self.norm.weight.dtype,
            dropout,
            inference=inference,
            head_dim=self.config.hidden_size // self.config.num_attention_heads,
        )

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.config.num_channels

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        select_layer: int | None = None,
        rope_generator: torch.Generator | None = None,
    ) -> PackedModelOutput:
        """Run a packed batch.

        Args:
            hidden_states: `[total_patches, p*p*C]` normalized pixels, rows as `packing.patchify` gives them.
            grid_thw: integer `[num_images, 3]`, rows (t, h, w) in patches.
            bool_masked_pos: optional bool `[total_patches]`; True rows are replaced by the mask token.
            output_hidden_states: also return every layer's patch tokens.
            select_layer: index into the `num_layers + 1` hidden states (LLaVA towers use -2); the outputs
                are then that layer's tokens without the final norm, and later layers are skipped.
            rope_generator: in training mode, the generator for the per-image RoPE coordinate augmentation
                (shift / jitter / rescale from the config); default the global RNG.

        Returns:
            `PackedModelOutput`.
        """
        grid = validate_packed_input(hidden_states, grid_thw, self.patch_dim)
        num_layers = self.config.num_hidden_layers
        if select_layer is not None:
            if not isinstance(select_layer, int) or isinstance(select_layer, bool):
                raise TypeError(f"select_layer: expected an int, got {type(select_layer).__name__}")
            if not -(num_layers + 1) <= select_layer <= num_layers:
                raise ValueError(
                    f"select_layer: expected an index into {num_layers + 1} hidden states "
                    f"(-{num_layers + 1}..{num_layers}), got {select_layer}"
                )
        if bool_masked_pos is not None:
            rows = hidden_states.shape[0]
            if not isinstance(bool_masked_pos, torch.Tensor) or bool_masked_pos.dtype != torch.bool:
                got = bool_masked_pos.dtype if isinstance(bool_masked_pos, torch.Tensor) else type(bool_masked_pos)
                raise TypeError(f"bool_masked_pos: expected a bool tensor of shape [{rows}], got {got}")
            if bool_masked_pos.shape != (rows,):
                raise ValueError(
                    f"bool_masked_pos: expected shape [{rows}] (one flag per input row), "
                    f"got {tuple(bool_masked_pos.shape)}"
                )

        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        # Inference (forward-only kernels allowed) unless autograd will record this call: grad mode on and
        # training, or the input or any parameter requiring grad.
        inference = not (
            torch.is_grad_enabled()
            and (self.training or hidden_states.requires_grad or any(p.requires_grad for p in self.parameters()))
        )
        backend = self.resolved_attn_backend(inference=inference)
        backend_inference_ok = inference and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        layout = PackedLayout.build(grid, self.num_prefix_tokens, device)

        if bool_masked_pos is not None:
            bool_masked_pos = bool_masked_pos.to(device)
        x = self.embeddings(hidden_states.to(device), layout, bool_masked_pos)
        cos, sin = self.rope_embeddings(layout, dtype, rope_generator)
        # Blocks after the selected hidden state are skipped unless every hidden state is asked for.
        selected = None if select_layer is None else select_layer % (num_layers + 1)
        stop = num_layers if selected is None or output_hidden_states else selected
        fused_mlp = self.fused_mlp and backend_inference_ok
        x, states = self.model(x, cos, sin, layout, backend, stop, output_hidden_states, fused_mlp)
        if selected is None:
            out = self.norm(x)
        else:
            out = states[selected] if output_hidden_states else x

        return PackedModelOutput(
            last_hidden_state=out[layout.patch_index],
            pooler_output=out[layout.prefix_index[:, 0]],
            register_tokens=out[layout.prefix_index[:, 1:]],
            hidden_states=tuple(s[layout.patch_index] for s in states) if states is not None else None,
            layout=layout,
        )
