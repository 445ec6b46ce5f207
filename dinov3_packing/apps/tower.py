"""A LLaVA-style vision tower over the packed model.

    tower = DINOv3VisionTower("random:vitl16", select_layer=-2, merge=True)
    feats = tower([img_a, img_b])          # [C, H, W] tensors of any patch-multiple sizes
    feats[0].shape                         # [(h/2) * (w/2), 4 * D]

One packed forward runs every image; the tower then cuts the chosen layer's tokens per image.

Features of one image, frame after frame (a clip `[T, C, H, W]` or a grid row with t > 1 has t frames):
    `[CLS, registers, patches]` rows per frame (`keep_prefix=True`) or the patches only (default), from
    hidden state `select_layer` (an index into the `num_layers + 1` states; -2 = the input of the last
    block, before the final norm, as LLaVA towers use).

2x2 merge (`merge=True`): the patch grid is cut into 2x2 groups in raster order over the (h/2, w/2)
grid; each group's four patch features, in the order (top-left, top-right, bottom-left, bottom-right),
are concatenated into one `4 * D` feature. Odd grids are an error (ValueError naming the image and its
grid): padding would invent features the LLM cannot tell from real ones, so resize images to multiples
of 2 * patch_size (32 px) instead. With `keep_prefix=True` and merge, the prefix rows are not merged
and keep width D, so they come back separately: see `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.modeling import DINOv3ViTPackingModel
from ..packing import pack, validate_packed_input


class DINOv3VisionTower(nn.Module):
    """Per-image features of a packed DINOv3 for a multimodal LLM.

    Args:
        model: a `DINOv3ViTPackingModel`, or a checkpoint string for `load_packing_model`.
        select_layer: hidden state to return (default -2: before the final norm). `None` = the final,
            normed output.
        keep_prefix: also return CLS and register tokens.
        merge: 2x2 spatial merge of patch features (see module docstring).
        trainable: False (default) freezes the tower: no parameter requires grad, it stays in eval mode
            whatever `.train()` says, and its forward runs without autograd.
        device, dtype: where and in which precision the tower runs; inputs are moved there and outputs
            come back in it.
    """

    def __init__(
        self,
        model: DINOv3ViTPackingModel | str,
        select_layer: int | None = -2,
        keep_prefix: bool = False,
        merge: bool = False,
        trainable: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(model, str):
            from ..weights.load import load_packing_model

            model = load_packing_model(model)
        if not isinstance(model, DINOv3ViTPackingModel):
            raise TypeError(
                f"model: expected a DINOv3ViTPackingModel or a checkpoint string, got {type(model).__name__}"
            )
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        n = model.config.num_hidden_layers
        if select_layer is not None and (
            not isinstance(select_layer, int) or isinstance(select_layer, bool) or not -(n + 1) <= select_layer <= n
        ):
            raise ValueError(f"select_layer: expected None or an int in -{n + 1}..{n}, got {select_layer!r}")
        self.model = model.to(device=device, dtype=dtype)
        self.select_layer = select_layer
        self.keep_prefix = keep_prefix
        self.merge = merge
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        self.train(False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def hidden_size(self) -> int:
        """Width of one output feature: D, or 4 * D with the 2x2 merge."""
        return self.model.config.hidden_size * (4 if self.merge else 1)

    def train(self, mode: bool = True) -> DINOv3VisionTower:
        super().train(mode and self.trainable)
        return self

    def forward(
        self,
        images: Sequence[torch.Tensor] | None = None,
        hidden_states: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features per image, from a list of images or from packed input (exactly one of the two).

        Args:
            images: `[C, H, W]` images or `[T, C, H, W]` clips, H and W multiples of the patch size.
            hidden_states, grid_thw: a packed batch (see `packing.py`).

        Returns:
            One tensor per image: `[t * (P + h*w), D]` (P = 1 + registers with `keep_prefix`, else 0), or
            with `merge` `[t * (h/2) * (w/2), 4D]`. With both `merge` and `keep_prefix`, a pair
            `(merged patch features per image, prefix tokens per image [t * P, D])`.
        """
        if (images is None) == (hidden_states is None):
            raise ValueError("images: pass either images or hidden_states with grid_thw, not both or neither")
        if images is not None:
            hidden_states, grid_thw = pack(images, self.model.patch_size)
        elif grid_thw is None:
            raise ValueError("grid_thw: required with hidden_states")
        grid = validate_packed_input(hidden_states, grid_thw, self.model.patch_dim)
        if self.merge:
            odd = [(i, (t, h, w)) for i, (t, h, w) in enumerate(grid) if h % 2 or w % 2]
            if odd:
                i, thw = odd[0]
                raise ValueError(
                    f"grid_thw: image {i} has grid (t, h, w) = {thw}; the 2x2 merge needs even h and w "
                    f"(sizes that are multiples of {2 * self.model.patch_size} px)"
                )
        hidden_states = hidden_states.to(device=self.device, dtype=self.dtype)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.model(hidden_states, grid_thw, select_layer=self.select_layer)
        return self._per_image(out, grid)

    def _per_image(self, out, grid):
        d = out.last_hidden_state.shape[-1]
        patches = out.last_hidden_state.split([t * h * w for t, h, w in grid])
        prefix = torch.cat([out.pooler_output[:, None], out.register_tokens], dim=1)  # [segments, P, D]
        prefix = prefix.split([t for t, _, _ in grid])
        feats = []
        for rows, pre, (t, h, w) in zip(patches, prefix, grid, strict=True):
            if self.merge:
                # [t, h/2, 2, w/2, 2, D] -> [t, h/2, w/2, 2 (row), 2 (col), D] -> 4D per group, raster order
                g = rows.reshape(t, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
                feats.append(g.reshape(t * (h // 2) * (w // 2), 4 * d))
            elif self.keep_prefix:
                feats.append(torch.cat([pre, rows.reshape(t, h * w, d)], dim=1).reshape(-1, d))
            else:
                feats.append(rows)
        if self.merge and self.keep_prefix:
            return feats, [pre.reshape(-1, d) for pre in prefix]
        return feats
