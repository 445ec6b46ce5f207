"""The packed format: images <-> rows of patches, and the per-batch layout the model runs on.

A packed batch is `hidden_states [total_patches, p*p*C]` (each row one patch, flattened in
(patch_row, patch_col, channel) order; the patches of one image in raster order; images one after another)
and `grid_thw [num_images, 3]` with rows (t, h, w) in patches. Each of the t frames of an image is its own
*segment*: the model gives it its own CLS and register tokens and its own attention block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut one image into packed rows.

    Args:
        image: `[C, H, W]` with H and W multiples of `patch_size`.
        patch_size: side of a square patch in pixels.

    Returns:
        `[(H/p) * (W/p), p*p*C]`, patches in raster order, each flattened as (row, col, channel).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise TypeError(f"image: expected a [C, H, W] tensor, got {_describe(image)}")
    c, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image: height and width must be multiples of patch_size={patch_size}, got {height}x{width}")
    h, w = height // patch_size, width // patch_size
    return image.reshape(c, h, patch_size, w, patch_size).permute(1, 3, 2, 4, 0).reshape(h * w, patch_size**2 * c)


def unpatchify(rows: torch.Tensor, h: int, w: int, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify`: `[h*w, p*p*C]` rows back to a `[C, h*p, w*p]` image."""
    if rows.ndim != 2 or rows.shape[0] != h * w or rows.shape[1] % (patch_size**2):
        raise ValueError(f"rows: expected [{h}*{w}, p*p*C] with p={patch_size}, got {tuple(rows.shape)}")
    c = rows.shape[1] // patch_size**2
    return (
        rows.reshape(h, w, patch_size, patch_size, c).permute(4, 0, 2, 1, 3).reshape(c, h * patch_size, w * patch_size)
    )


def pack(images: Sequence[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack images of different sizes into one batch.

    Args:
        images: `[C, H, W]` images (one frame each), or `[T, C, H, W]` clips whose T frames share one size.
        patch_size: patch side in pixels; H and W must be multiples of it.

    Returns:
        `(hidden_states [total_patches, p*p*C], grid_thw [num_images, 3] int64)`.
    """
    if isinstance(images, torch.Tensor) or not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(
            f"images: expected a non-empty list of [C, H, W] or [T, C, H, W] tensors, got {_describe(images)}"
        )
    rows, grid = [], []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4):
            raise TypeError(f"images[{i}]: expected a [C, H, W] or [T, C, H, W] tensor, got {_describe(img)}")
        frames = img if img.ndim == 4 else img[None]
        for frame in frames:
            rows.append(patchify(frame, patch_size))
        t, (_, height, width) = frames.shape[0], frames.shape[1:]
        grid.append((t, height // patch_size, width // patch_size))
    channels = {r.shape[1] for r in rows}
    if len(channels) != 1:
        raise ValueError(f"images: all images need the same number of channels, got patch dims {sorted(channels)}")
    return torch.cat(rows), torch.tensor(grid, dtype=torch.long)


def split(packed: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Split packed per-patch rows (model output or input) back into per-image `[t, h, w, D]` maps."""
    grid = _grid_list(grid_thw)
    sizes = [t * h * w for t, h, w in grid]
    if packed.ndim != 2 or packed.shape[0] != sum(sizes):
        raise ValueError(f"packed: expected [{sum(sizes)}, D] rows for grid_thw, got {tuple(packed.shape)}")
    return [chunk.reshape(t, h, w, -1) for chunk, (t, h, w) in zip(packed.split(sizes), grid, strict=True)]


def validate_packed_input(
    hidden_states: object, grid_thw: object, patch_dim: int, bool_masked_pos: object = None
) -> list[tuple[int, int, int]]:
    """Check a packed batch before any compute; return grid_thw as a list of (t, h, w) tuples.

    Devices: each tensor may sit on any real device, independently of the others and of the model. The
    model copies `hidden_states` and `bool_masked_pos` to its own device and reads `grid_thw` on the host
    (it needs the sizes there to lay out the batch), so CPU inputs for a CUDA model, or a CPU mask beside
    CUDA patches, give the same result as inputs on the model's device. A meta tensor holds no values and
    is refused, naming the argument.

    Raises:
        TypeError: hidden_states is not a floating tensor, grid_thw not an integer `[N, 3]`, or
            bool_masked_pos not a bool tensor.
        ValueError: wrong patch_dim, non-positive grid entries, row count != sum(t*h*w), a bool_masked_pos
            of another length than the rows, or a meta tensor.
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(
            f"hidden_states: expected a torch.Tensor [total_patches, {patch_dim}], got {_describe(hidden_states)}"
        )
    _refuse_meta(hidden_states, "hidden_states")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states: expected a floating-point tensor, got dtype {hidden_states.dtype}")
    if hidden_states.ndim != 2:
        raise ValueError(
            f"hidden_states: expected 2 dims [total_patches, {patch_dim}], got shape {tuple(hidden_states.shape)}"
        )
    if hidden_states.shape[1] != patch_dim:
        raise ValueError(
            f"hidden_states: expected patch_dim {patch_dim} (patch_size*patch_size*num_channels) in dim 1, "
            f"got {hidden_states.shape[1]}; rows must be patches of this model's patch size in (p, p, C) order"
        )
    grid = _grid_list(grid_thw)
    total = sum(t * h * w for t, h, w in grid)
    if hidden_states.shape[0] != total:
        raise ValueError(
            f"hidden_states: expected sum(t*h*w) = {total} rows for grid_thw, got {hidden_states.shape[0]}"
        )
    if bool_masked_pos is not None:
        if not isinstance(bool_masked_pos, torch.Tensor) or bool_masked_pos.dtype != torch.bool:
            got = bool_masked_pos.dtype if isinstance(bool_masked_pos, torch.Tensor) else type(bool_masked_pos)
            raise TypeError(f"bool_masked_pos: expected a bool tensor of shape [{total}], got {got}")
        _refuse_meta(bool_masked_pos, "bool_masked_pos")
        if bool_masked_pos.shape != (total,):
            raise ValueError(
                f"bool_masked_pos: expected shape [{total}] (one flag per input row), "
                f"got {tuple(bool_masked_pos.shape)}"
            )
    return grid


def _refuse_meta(t: torch.Tensor, name: str) -> None:
    if t.is_meta:
        raise ValueError(f"{name}: got a meta tensor, which holds no values; pass it on a real device (cpu, cuda)")


def _grid_list(grid_thw: object) -> list[tuple[int, int, int]]:
    if isinstance(grid_thw, torch.Tensor):
        _refuse_meta(grid_thw, "grid_thw")
        if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
            raise TypeError(f"grid_thw: expected an integer tensor [num_images, 3], got dtype {grid_thw.dtype}")
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(
                f"grid_thw: expected shape [num_images, 3] with rows (t, h, w), got {tuple(grid_thw.shape)}"
            )
        grid = [tuple(r) for r in grid_thw.tolist()]
    elif isinstance(grid_thw, Sequence) and not isinstance(grid_thw, str):
        grid = [tuple(r) if isinstance(r, Sequence) else r for r in grid_thw]
        if not all(isinstance(r, tuple) and len(r) == 3 and all(_is_int(v) for v in r) for r in grid):
            raise TypeError(f"grid_thw: expected integer rows (t, h, w), got {grid_thw!r}")
    else:
        raise TypeError(f"grid_thw: expected an integer tensor [num_images, 3], got {_describe(grid_thw)}")
    if not grid:
        raise ValueError("grid_thw: expected at least one image, got 0 rows")
    bad = [r for r in grid if min(r) < 1]
    if bad:
        raise ValueError(f"grid_thw: t, h and w must be positive, got row {bad[0]}")
    return [(int(t), int(h), int(w)) for t, h, w in grid]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


@dataclass
class PackedLayout:
    """Where every token of a packed batch sits; computed once per forward and shared by all layers.

    The token sequence is, for each segment in turn, `[CLS, register_1..R, patch_1..patch_hw]`.

    Attributes:
        segment_hw: (h, w) of every segment (one per frame).
        seq_lens: tokens per segment (prefix + h*w), host-side, for kernels that loop over segments.
        cu_seqlens: int32 `[num_segments + 1]` cumulative token offsets, on the model's device.
        cu_seqlens_host: the same offsets on the CPU (reading them never waits for the device).
        equal_runs_host: int64 `[3 * num_runs]` on the CPU: (first token, segment count, segment length) of
            each run of consecutive equal-length segments, flattened (so that its size is never 0 or 1, which
            torch.compile would specialise on), for kernels that loop over segments on the host.
        max_seqlen: longest segment in tokens.
        patch_index: long `[total_patches]`: token position of each input row.
        prefix_index: long `[num_segments, 1 + R]`: token positions of CLS and the registers.
        token_source: long `[num_tokens]`: for each token, its row in `cat([prefix rows of all segments
            (segment-major), patch rows])`, so the whole sequence is assembled by one gather.
        token_segment: long `[num_tokens]`: the segment of each token (for per-image drop path).
        num_tokens: total tokens including prefix tokens.

    The device-side indices arrive in one copy from pinned memory that does not block the host.
    """

    segment_hw: list[tuple[int, int]]
    seq_lens: list[int]
    cu_seqlens: torch.Tensor
    cu_seqlens_host: torch.Tensor
    equal_runs_host: torch.Tensor
    max_seqlen: int
    patch_index: torch.Tensor
    prefix_index: torch.Tensor
    token_source: torch.Tensor
    token_segment: torch.Tensor
    num_tokens: int

    @property
    def num_segments(self) -> int:
        return len(self.segment_hw)

    @property
    def num_patches(self) -> int:
        return self.patch_index.numel()

    @classmethod
    def build(cls, grid: Sequence[tuple[int, int, int]], num_prefix: int, device: torch.device | str) -> PackedLayout:
        # Host-side index arithmetic in numpy: it runs before every forward, and on mixed-64 (60k tokens) it
        # takes 0.36 ms where the torch CPU ops it replaced took 1.3-3.0 ms (benchmarks/layout_build_time.py).
        segment_hw = [(h, w) for t, h, w in grid for _ in range(t)]
        n = len(segment_hw)
        seq_lens = [num_prefix + h * w for h, w in segment_hw]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(seq_lens, out=offsets[1:])
        total = int(offsets[-1])
        # Token order per segment: [CLS, registers, patches]; prefix positions are segment start + 0..P-1.
        prefix_index = offsets[:-1, None] + np.arange(num_prefix, dtype=np.int64)
        is_patch = np.ones(total, dtype=bool)
        is_patch[prefix_index.ravel()] = False
        patch_index = np.flatnonzero(is_patch)
        # Gather map for `cat([prefix rows of all segments (segment-major), patch rows])`.
        token_source = np.empty(total, dtype=np.int64)
        token_source[prefix_index.ravel()] = np.arange(prefix_index.size, dtype=np.int64)
        token_source[patch_index] = prefix_index.size + np.arange(patch_index.size, dtype=np.int64)
        token_segment = np.repeat(np.arange(n, dtype=np.int64), seq_lens)
        lens = np.asarray(seq_lens, dtype=np.int64)
        run_first = np.flatnonzero(np.r_[True, lens[1:] != lens[:-1]])
        runs = np.stack([offsets[run_first], np.diff(np.r_[run_first, n]), lens[run_first]], axis=1)
        parts = [offsets, patch_index, prefix_index.ravel(), token_source, token_segment]
        packed, device = torch.from_numpy(np.concatenate(parts)), torch.device(device)
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            packed = packed.to(device)
        cu, patch_index, prefix_flat, token_source, token_segment = packed.split([p.size for p in parts])
        return cls(
            segment_hw=segment_hw,
            seq_lens=seq_lens,
            cu_seqlens=cu.int(),
            cu_seqlens_host=torch.from_numpy(offsets.astype(np.int32)),
            equal_runs_host=torch.from_numpy(runs.ravel()),
            max_seqlen=max(seq_lens),
            patch_index=patch_index,
            prefix_index=prefix_flat.view(n, num_prefix),
            token_source=token_source,
            token_segment=token_segment,
            num_tokens=total,
        )


@dataclass
class PackedBatch:
    """Everything the blocks need besides their input, built once per forward and handed to every layer.

    Attributes:
        layout: the `PackedLayout` (token positions, cu_seqlens).
        cos, sin: RoPE tables `[num_tokens, head_dim]` in the compute dtype, `sin` carrying rotate_half's
            sign; prefix rows have cos = 1, sin = 0.
        attention: the concrete attention kernel (`ops.resolve_attention`).
        fused_mlp: whether the MLPs run the fused up-projection + GELU kernel (`ops.fused_mlp_runs`).
        fused_rope: whether attention kernels with RoPE inside their op ("fa4") rotate q and k there
            (`DINOv3ViTPackingModel.fused_rope`); the others always rotate first.
        mlp_gemms: the GEMM kernels of the fused MLP's training op, one of `ops.mlp.MLP_GEMMS`
            (`ops.mlp.resolve_mlp_gemms`).
        fold_layer_scale: the blocks multiply their LayerScale into the weight and bias of the projection before
            it (attention output, MLP down-projection) instead of into its output
            (`DINOv3ViTPackingModel.fold_layer_scale`; set only where autograd records).
        fold_qkv_bias: where RoPE runs inside the attention kernel's op (`ops.attention.rope_in_kernel`) and
            there is no attention dropout, the q and k biases are added in that op and the v bias goes into the
            output projection's bias (`DINOv3ViTPackingModel.fold_qkv_bias`; set only where autograd records).
        fused_norm: the blocks run their second norm as `ops.norm.residual_layer_norm`, with the attention's output
            bias and the MLP's down-projection bias taken apart (`DINOv3ViTPackingModel.fused_norm`; set only where
            autograd records).
        dropout: attention dropout for this forward (0 outside training).
        inference: autograd does not record this forward (blocks may use cached fused weights).
        chunks: when not empty, the block stack runs over each of these groups of whole segments in turn
            instead of over the whole sequence (see `chunked`); empty: one pass over the whole sequence.
    """

    layout: PackedLayout
    cos: torch.Tensor
    sin: torch.Tensor
    attention: str
    fused_mlp: bool = False
    fused_rope: bool = True
    mlp_gemms: str = "triton"
    fold_layer_scale: bool = False
    fold_qkv_bias: bool = False
    fused_norm: bool = False
    dropout: float = 0.0
    inference: bool = True
    chunks: tuple[PackedChunk, ...] = ()

    def chunked(self, max_tokens: int) -> tuple[PackedChunk, ...]:
        """Consecutive whole segments grouped greedily into chunks of at most `max_tokens` tokens (a longer
        segment is a chunk of its own), each with its own layout and RoPE rows; () when that is one chunk.

        Every operation of a block is per token except attention, which stays inside a segment, so running
        the blocks chunk by chunk computes exactly what one pass over the whole sequence does.
        """
        layout = self.layout
        bounds, first, tokens = [], 0, 0
        for i, n in enumerate(layout.seq_lens):
            if tokens and tokens + n > max_tokens:
                bounds.append((first, i))
                first, tokens = i, 0
            tokens += n
        if not bounds:
            return ()
        bounds.append((first, layout.num_segments))
        offsets = layout.cu_seqlens_host.tolist()
        num_prefix, device = layout.prefix_index.shape[1], layout.patch_index.device
        chunks = []
        for first, end in bounds:
            rows = slice(offsets[first], offsets[end])
            grid = [(1, h, w) for h, w in layout.segment_hw[first:end]]
            sub = PackedLayout.build(grid, num_prefix, device)
            part = replace(self, layout=sub, cos=self.cos[rows], sin=self.sin[rows], chunks=())
            chunks.append(PackedChunk(rows, part))
        return tuple(chunks)


@dataclass(frozen=True)
class PackedChunk:
    """Consecutive whole segments of a `PackedBatch`, run through the blocks on their own.

    Attributes:
        tokens: the chunk's rows of the whole token sequence.
        batch: the chunk's `PackedBatch`: its segments' layout (token positions counted from the chunk's
            first token) and RoPE rows, the parent's kernel choices.
    """

    tokens: slice
    batch: PackedBatch
