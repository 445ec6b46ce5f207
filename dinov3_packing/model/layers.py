"""The pieces of the packed DINOv3 ViT, one class per concept, with Hugging Face parameter names.

Every block takes `(x, batch)`: `x [num_tokens, D]` and the forward's `PackedBatch` (layout, RoPE tables,
kernel choices), built once by the model. Kernels are reached only through `ops.attend` and
`ops.feed_forward`.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from transformers import DINOv3ViTConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTEmbeddings,
    DINOv3ViTGatedMLP,
    DINOv3ViTLayerScale,
    DINOv3ViTMLP,
    DINOv3ViTRopePositionEmbedding,
    get_patches_center_coordinates,
)

from ..ops.attention import attend, rope_in_kernel
from ..ops.mlp import down_bias_apart, feed_forward, runs_forward
from ..ops.norm import residual_layer_norm
from ..packing import PackedBatch, PackedLayout


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


def packed_patch_coords(segment_hw: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """`[num_patches, 2]` fp32 (y, x) patch-centre coordinates in [-1, 1] of every segment in turn, in raster
    order: `get_patches_center_coordinates(h, w)` of each segment on `device`, concatenated, with the same fp32
    operations, so the same bits; computed on the host and sent in one copy that does not block it.

    Hugging Face computes `(i + 0.5) / n`, then `2 * c - 1`. Its division by the Python int `n` is a true division
    on the CPU, but on CUDA ATen turns a division by a host scalar into a product with its fp32 reciprocal
    (`div_true_kernel_cuda`), which differs in the last bit for some `(i, n)`; the coordinates for a CUDA device
    repeat that."""
    out = torch.from_numpy(_packed_patch_coords(segment_hw, reciprocal=device.type == "cuda"))
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def _packed_patch_coords(segment_hw: list[tuple[int, int]], reciprocal: bool) -> np.ndarray:
    """`packed_patch_coords` on the host; `reciprocal`: divide as ATen does on CUDA (by a product with the
    fp32 reciprocal)."""
    hs = np.array([h for h, _ in segment_hw], dtype=np.int64)
    ws = np.array([w for _, w in segment_hw], dtype=np.int64)
    counts = hs * ws
    starts = np.cumsum(counts) - counts
    index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    w_tok = np.repeat(ws, counts)
    centre = np.stack([index // w_tok, index % w_tok], axis=1).astype(np.float32) + np.float32(0.5)
    sizes = np.stack([np.repeat(hs, counts), w_tok], axis=1).astype(np.float32)
    coords = centre * (np.float32(1.0) / sizes) if reciprocal else centre / sizes
    return np.float32(2.0) * coords - np.float32(1.0)


class DINOv3ViTPackedRopeEmbedding(DINOv3ViTRopePositionEmbedding):
    """RoPE tables for every token of a packed batch: `(cos, sin_signed)`, each `[num_tokens, head_dim]`,
    where `sin_signed` carries rotate_half's sign (see `ops.attention.swap_halves`).

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

    def augmented_angles(self, layout: PackedLayout, generator: torch.Generator | None) -> torch.Tensor:
        """Angles `[num_tokens, head_dim]` of a training forward: every segment's patch coordinates augmented by
        a draw of its own (shift, then jitter, then rescale, from `generator` or the global RNG), in segment
        order, as Hugging Face draws them for one image after another; prefix rows are zero.

        Only the draws go segment by segment (their random streams must be Hugging Face's); the coordinates
        and angles of all segments are computed at once, so a pack of many images costs a few kernels instead
        of some twenty per image (which left the GPU waiting on the host at the start of every step).
        """
        cfg, device = self.config, self.inv_freq.device
        coords = packed_patch_coords(layout.segment_hw, device)
        segment = layout.token_segment[layout.patch_index]
        n = layout.num_segments
        draws = torch.empty(n, 5, device=device, dtype=torch.float32)  # shift y, x; log jitter y, x; log rescale
        shift, jitter, rescale = cfg.pos_embed_shift, cfg.pos_embed_jitter, cfg.pos_embed_rescale
        for i in range(n):
            if shift is not None:
                draws[i, 0:2].uniform_(-shift, shift, generator=generator)
            if jitter is not None:
                draws[i, 2:4].uniform_(-math.log(jitter), math.log(jitter), generator=generator)
            if rescale is not None:
                draws[i, 4:5].uniform_(-math.log(rescale), math.log(rescale), generator=generator)
        if shift is not None:
            coords = coords + draws[:, 0:2][segment]
        if jitter is not None:
            coords = coords * draws[:, 2:4].exp()[segment]
        if rescale is not None:
            coords = coords * draws[:, 4:5].exp()[segment]
        angles = 2 * math.pi * coords[:, :, None] * self.inv_freq[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        prefix_rows = angles.new_zeros(layout.prefix_index.numel(), angles.shape[1])
        return torch.cat([prefix_rows, angles])[layout.token_source]

    def forward(
        self, layout: PackedLayout, dtype: torch.dtype, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            # A fresh draw per segment and forward; never cached.
            angles = self.augmented_angles(layout, generator)
        else:
            angles = torch.cat([self.segment_angles(h, w) for h, w in layout.segment_hw])
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
        d = config.hidden_size
        self.k_proj = nn.Linear(d, d, bias=config.key_bias)
        self.v_proj = nn.Linear(d, d, bias=config.value_bias)
        self.q_proj = nn.Linear(d, d, bias=config.query_bias)
        self.o_proj = nn.Linear(d, d, bias=config.proj_bias)
        self._fused: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def qkv_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q, k and v projections as one `[3D, D]` weight and `[3D]` bias (None if none has a bias)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projs])
        if all(p.bias is None for p in projs):
            return weight, None
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
        return weight, bias

    def refresh_fused_qkv(self) -> None:
        """Keep `qkv_weight_bias()` cached for forwards autograd does not record. The cache is rebuilt when a
        projection's tensor is replaced (`.to()`, a new Parameter) or changed in place (`load_state_dict`, an
        optimizer step): each bumps the tensor's version counter. Costs one fused copy (3 D^2 per block)."""
        tensors = [t for p in (self.q_proj, self.k_proj, self.v_proj) for t in (p.weight, p.bias) if t is not None]
        if any(type(t.data) is not torch.Tensor for t in tensors):
            # Sharded (FSDP's DTensor) or otherwise wrapped parameters are whole only inside the block's
            # forward: concatenate there.
            self._fused = None
            return
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                self._fused = (key, self.qkv_weight_bias())

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, out_scale: torch.Tensor | None = None, split_bias: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """`out_scale`: a `[D]` LayerScale folded into the output projection: its weight rows and bias are multiplied
        by it (the function of `o_proj(...) * out_scale`, with no `[tokens, D]` output kept for the scale's
        gradient); the caller passes it only where `o_proj` is a plain `nn.Linear` (`plain_linear`).
        `split_bias` (also only where `o_proj` is plain): return the output without the output projection's bias and
        that bias (None if none) apart, for the caller to add (`ops.norm.residual_layer_norm`)."""
        v_bias = None
        if self._moves_biases(batch):
            out, v_bias = self._attend_biases_moved(x, batch)
        else:
            # Under autograd the concatenation is part of the graph, so gradients reach q, k and v.
            fused = self._fused[1] if batch.inference and self._fused is not None else self.qkv_weight_bias()
            qkv = F.linear(x, *fused).unflatten(-1, (3, self.num_heads, self.head_dim))
            out = attend(qkv, batch)
        if out_scale is None and v_bias is None and not split_bias:
            return self.o_proj(out)
        o = self.o_proj
        weight, bias = o.weight, o.bias
        if v_bias is not None:  # each softmax row sums to one: o(attn(q, k, v + b_v)) == o(attn(q, k, v)) + W b_v
            moved = F.linear(v_bias, weight)
            bias = moved if bias is None else bias + moved
        if out_scale is not None:  # (out W^T + b) * s == out (s W)^T + s b
            weight, bias = weight * out_scale[:, None], bias * out_scale if bias is not None else None
        if split_bias:
            return F.linear(out, weight), bias
        return F.linear(out, weight, bias)

    def _moves_biases(self, batch: PackedBatch) -> bool:
        """`PackedBatch.fold_qkv_bias` applies: RoPE inside the kernel's op, no attention dropout (the softmax rows
        sum to one), a bias to move, and, for a v bias, a plain output projection to take it."""
        return (
            batch.fold_qkv_bias
            and batch.dropout == 0.0
            and rope_in_kernel(batch)
            and any(p.bias is not None for p in (self.q_proj, self.k_proj, self.v_proj))
            and (self.v_proj.bias is None or plain_linear(self.o_proj))
        )

    def _attend_biases_moved(self, x: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention with the q/k/v projection's biases moved (`DINOv3ViTPackingModel.fold_qkv_bias`): q's and
        k's into the attention op (added before RoPE, their gradient summed in its backward); v's returned for the
        output projection's bias, since each segment's softmax rows sum to one (``attn(q, k, v + b_v) = attn(q, k,
        v) + b_v``). Returns the attention's output and v's bias (None if there is none)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        qkv = F.linear(x, torch.cat([p.weight for p in projs])).unflatten(-1, (3, self.num_heads, self.head_dim))
        qk_bias = None
        if self.q_proj.bias is not None or self.k_proj.bias is not None:
            biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs[:2]]
            qk_bias = torch.stack(biases).view(2, self.num_heads, self.head_dim)
        return attend(qkv, batch, qk_bias=qk_bias), self.v_proj.bias


class DINOv3ViTPackedDropPath(nn.Module):
    """Stochastic depth per segment (Hugging Face drops per image)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One draw per segment in segment order, as Hugging Face draws one per image. The count comes from
        # a tensor size, not a Python int, so a compiled block keeps it symbolic.
        num_segments = batch.layout.cu_seqlens.shape[0] - 1
        keep = torch.floor(torch.rand(num_segments, dtype=x.dtype, device=x.device) + keep_prob)
        return x.div(keep_prob) * keep[batch.layout.token_segment][:, None]


class DINOv3ViTPackedLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention and MLP, each with LayerScale and a residual.

    Attributes:
        recompute_mlp: run the MLP under checkpoint when autograd records (set by `parallel.recompute`'s
            "mlp" policy; a plain attribute, so a compiled block's graph is guarded on it).
        recompute_gelu: the fused MLP's training op keeps no GELU output and its backward recomputes it (set by
            the "gelu" policy; a plain attribute too).
    """

    recompute_mlp: bool = False
    recompute_gelu: bool = False

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DINOv3ViTPackedAttention(config)
        self.layer_scale1 = DINOv3ViTLayerScale(config)
        self.drop_path = DINOv3ViTPackedDropPath(config.drop_path_rate)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DINOv3ViTGatedMLP(config) if config.use_gated_mlp else DINOv3ViTMLP(config)
        self.layer_scale2 = DINOv3ViTLayerScale(config)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        # Where LayerScale is not folded it multiplies the output here, outside the recomputed part of the
        # "attention" and "mlp" policies (so its gradient reads the output the forward computed); the folding is
        # decided here too. (Under whole-block recomputation the block itself runs again in backward.)
        attention = self.attention
        fold1 = batch.fold_layer_scale and _plain_attention(attention) and plain_linear(attention.o_proj)
        scale1 = _foldable(self.layer_scale1) if fold1 else None
        scale2 = _foldable(self.layer_scale2) if batch.fold_layer_scale else None
        if scale1 is not None and scale2 is not None and self._norm_takes_biases(batch):
            # The second norm's op adds the attention's output bias and returns the gradients of both biases around
            # it (`ops.norm`); the down-projection's bias joins the residual stream after `s`, detached.
            h, bias_o = attention(self.norm1(x), batch, out_scale=scale1, split_bias=True)
            bias_2 = down_bias_apart(self.mlp, batch, scale2)
            s, y = residual_layer_norm(x, h, self.norm2, bias_o, bias_2)
            h = feed_forward(
                self.mlp,
                y,
                batch,
                recompute=self.recompute_mlp,
                out_scale=scale2,
                recompute_gelu=self.recompute_gelu,
                down_bias=bias_2 is None,
            )
            return s + h if bias_2 is None else s + h + bias_2.detach()
        if scale1 is None:  # the module's own call, as before folding (a replaced forward takes (x, batch))
            h = self.layer_scale1(attention(self.norm1(x), batch))
        else:
            h = attention(self.norm1(x), batch, out_scale=scale1)
        x = self.drop_path(h, batch) + x
        # feed_forward multiplies by scale2 itself where it does not fold it.
        h = feed_forward(
            self.mlp,
            self.norm2(x),
            batch,
            recompute=self.recompute_mlp,
            out_scale=scale2,
            recompute_gelu=self.recompute_gelu,
        )
        return self.drop_path(h if scale2 is not None else self.layer_scale2(h), batch) + x

    def _norm_takes_biases(self, batch: PackedBatch) -> bool:
        """Whether the block may run its second norm as `ops.norm.residual_layer_norm` (`batch.fused_norm`): no
        stochastic depth in this forward (the attention's output joins the stream unscaled; the drop-path module, which
        the op bypasses, unhooked and running its own forward) and the norm torch's `nn.LayerNorm` running its own
        forward with no hooks (which the op would bypass too)."""
        drop = self.drop_path
        return (
            batch.fused_norm
            and type(drop) is DINOv3ViTPackedDropPath
            and runs_forward(drop, _DROP_PATH_FORWARD)
            and _no_hooks(drop)
            and (drop.drop_prob == 0.0 or not drop.training)
            and type(self.norm2) is nn.LayerNorm
            and runs_forward(self.norm2, _LAYER_NORM_FORWARD)
            and _no_hooks(self.norm2)
            and self.norm2.weight is not None
            and self.norm2.bias is not None
        )


# The forwards of the modules a block may fold, as they were at import (see `ops.mlp`'s note on patched classes).
_LINEAR_FORWARD = nn.Linear.forward
_LAYER_NORM_FORWARD = nn.LayerNorm.forward
_DROP_PATH_FORWARD = DINOv3ViTPackedDropPath.forward
_LAYER_SCALE_FORWARD = DINOv3ViTLayerScale.forward
_ATTENTION_FORWARD = DINOv3ViTPackedAttention.forward
RECOMPUTES = "_dinov3_packing_recomputes"
"""The attribute `parallel.recompute`'s wrapper of a module's forward keeps the forward it wraps in."""


def _no_hooks(module: nn.Module) -> bool:
    """No forward or backward hook on `module` or on every module (a backward hook of a folded module would never
    fire: its output is not computed)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
        or _module_globals._global_backward_pre_hooks
    )


def _plain_attention(attention: nn.Module) -> bool:
    """Whether `attention` is this package's attention module running its own forward (or that forward under
    `parallel.recompute`'s checkpoint wrapper) with no hooks: then its output projection may take the LayerScale
    and no hook or replaced forward sees a scaled output."""
    if type(attention) is not DINOv3ViTPackedAttention or not _no_hooks(attention):
        return False
    forward = attention.forward
    if not isinstance(forward, types.MethodType):  # a function set on the instance: the recompute wrapper?
        forward = getattr(forward, RECOMPUTES, None)
    return (
        isinstance(forward, types.MethodType)
        and forward.__self__ is attention
        and forward.__func__ is _ATTENTION_FORWARD
    )


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` running its own forward with no hooks (so `F.linear` with its weight and
    bias computes what it would): not a subclass, wrapper or adapter (LoRA)."""
    return type(module) is nn.Linear and runs_forward(module, _LINEAR_FORWARD) and _no_hooks(module)


def _foldable(layer_scale: nn.Module) -> torch.Tensor | None:
    """`layer_scale.lambda1` where the module is Hugging Face's LayerScale running its own forward with no hooks
    (so multiplying by `lambda1` elsewhere computes what it would), else None (the module runs)."""
    if type(layer_scale) is not DINOv3ViTLayerScale or not runs_forward(layer_scale, _LAYER_SCALE_FORWARD):
        return None
    return layer_scale.lambda1 if _no_hooks(layer_scale) else None


class DINOv3ViTPackedEncoder(nn.Module):
    """The block stack. One call runs the first `num_layers` blocks (all by default)."""

    def __init__(self, config: DINOv3ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList([DINOv3ViTPackedLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, num_layers: int | None = None, keep_states: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Returns the last block's output and, with `keep_states`, the input and every block's output.

        With `batch.chunks` the stack runs over each chunk of whole segments in turn (the same computation:
        see `PackedBatch.chunked`). A compiled stack always runs the whole sequence, so the chunk count never
        enters its graph.
        """
        # is_compiling() first: a traced stack must not read the chunk plan, or it would guard on its length.
        if not torch.compiler.is_compiling() and batch.chunks:
            parts = [self._run(x[c.tokens], c.batch, num_layers, keep_states) for c in batch.chunks]
            states = [torch.cat(s) for s in zip(*(s for _, s in parts), strict=True)] if keep_states else None
            return torch.cat([out for out, _ in parts]), states
        return self._run(x, batch, num_layers, keep_states)

    def _run(
        self, x: torch.Tensor, batch: PackedBatch, num_layers: int | None, keep_states: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        states = [x] if keep_states else None
        for layer in self.layer[:num_layers]:
            x = layer(x, batch)
            if keep_states:
                states.append(x)
        return x, states
