"""DINOv3 ViT on packed input.

Parameter names are those of `transformers.DINOv3ViTModel`, so any Hugging Face DINOv3 checkpoint loads
as is and `DINOv3ViTModel(config).load_state_dict(model.state_dict())` is exact. The forward takes
`hidden_states [total_patches, p*p*C]` and `grid_thw [num_images, 3]` (see `packing.py`), builds the
batch's `PackedBatch` once (layout, RoPE tables, kernel choices) and runs every image in one sequence:
one matmul embeds all patches, every layer runs once over all tokens, attention stays inside each image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DINOv3ViTConfig
from transformers.modeling_outputs import ModelOutput
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTPreTrainedModel

from ..ops.attention import check_attention_backend, resolve_attention
from ..ops.mlp import fused_mlp_runs, fused_mlp_setting, mlp_gemms_setting, resolve_mlp_gemms
from ..packing import PackedBatch, PackedLayout, validate_packed_input
from .layers import DINOv3ViTPackedEmbeddings, DINOv3ViTPackedEncoder, DINOv3ViTPackedRopeEmbedding

# CPU chunk budget: measured in docs/cpu.md (benchmarks/cpu_forward.py).
CPU_CHUNK_TOKENS = 2048


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


class DINOv3ViTPackingModel(DINOv3ViTPreTrainedModel):
    """DINOv3 ViT that runs natively on packed patches of many images of different sizes.

    Args:
        config: a `DINOv3ViTConfig` (see `archs.arch_config` for the released ones).
        attn_backend: "auto" (default) or a kernel of `ops.ATTENTION_BACKENDS`; see `ops/attention.py`.
        fused_mlp: run each MLP's up-projection, bias and exact (erf) GELU as one Triton GEMM
            (`ops/triton/linear_gelu.py`) when the model runs on CUDA in fp16/bf16 without autograd; elsewhere
            the plain ops run. None (default) turns it on wherever it applies: plain GELU MLPs (ViT-S/B/L),
            not the gated (SwiGLU) MLPs of ViT-H+ and 7B. On the H100 it made the compiled ViT-L forward 2-4%
            faster (benchmarks/results/RESULTS.md). A block whose MLP has hooks or a replaced up-projection
            (e.g. a LoRA adapter) runs its module instead, so nothing attached to it is bypassed. True on a
            gated MLP or another activation raises ValueError. Settable after construction (validated the
            same way).
        fused_rope: with the "fa4" kernel, rotate q and k inside its op (one Triton pass) and, in training,
            have its backward write the fused q/k/v gradient and un-rotate it in place (`ops/fa4.py`); the
            other kernels always take q and k rotated by an elementwise op. Default True; False keeps RoPE
            outside the op (what torch.compile fuses on its own), for comparison. Settable after
            construction.
        mlp_gemms: the GEMM kernels of the fused MLP when autograd records (training): "auto" (default:
            "quack-dgelu" where quack runs, Hopper with the `hopper` extra installed, else "triton"), "triton"
            (this package's kernels: `ops/triton/linear_gelu.py`), "triton-dgelu" (the same kernels keeping the
            GELU's derivative instead of the pre-activation, so the backward's epilogue multiplies instead of
            computing the erf), "quack" (quack-kernels' warp-specialized GEMMs with the GELU and its derivative in
            their epilogues, `ops/quack.py`) or "quack-dgelu" (quack's GEMMs keeping the GELU's derivative, as
            "triton-dgelu" does). On the H100, a ViT-L mixed-64 step (benchmarks/results/RESULTS.md,
            2026-12-07): "quack-dgelu" 270-272 ms against 276-278 for "quack" (seventeenth session); "triton"
            and "triton-dgelu" 286-287 ms (fourteenth session). All keep 887 KiB of activations per token;
            under `apply_recompute(model, "gelu")` "triton", "quack" and "quack-dgelu" (which runs as "quack"
            there) keep 695 KiB, "triton-dgelu" still 887. "quack" or
            "quack-dgelu" where the fused MLP runs but quack cannot raises ValueError at the forward. Settable
            after construction.
        fold_layer_scale: when autograd records, each block multiplies its LayerScale into the weight and bias of
            the projection it scales (the attention's output projection; the MLP's down-projection where the fused
            training op runs) instead of into that projection's output. The same function; the backward then
            needs neither the projection's output (one `[num_tokens, D]` activation less per LayerScale) nor a
            reduction over the tokens for the LayerScale's gradient, which comes from the `[D, D_in]` weight
            instead. Rounding differs: the scaled weight is rounded to the compute dtype. A projection or
            LayerScale that is replaced, wrapped or hooked is not folded. Forwards without autograd never fold.
            Default True; settable after construction.
        fold_qkv_bias: when autograd records, RoPE runs inside the attention kernel's op ("fa4" with
            `fused_rope`) and there is no attention dropout, each block leaves the q, k and v biases out of the
            q/k/v projection: the op adds q's and k's in its RoPE pass and sums their gradient in the backward's,
            and v's goes into the output projection's bias (``o(attn(q, k, v + b_v)) = o(attn(q, k, v)) + W_o
            b_v``: each softmax row sums to one), so no pass sums the `[num_tokens, 3 D]` q/k/v gradient for the
            biases' gradients. The same function; rounding differs. Where the output projection is replaced,
            wrapped or hooked it cannot take v's bias, and then nothing moves (the q/k biases too, unless there is
            no v bias). Default True; settable after construction.
        fused_norm: when autograd records and LayerScale folds, each block runs its second LayerNorm with the
            residual add before it as one op (`ops.norm.residual_layer_norm`) that takes the attention's output
            bias and, where the fused MLP leaves it out (`ops.mlp.down_bias_apart`), the MLP's down-projection
            bias: its backward computes the gradient of the stream and the sums over the tokens for both biases
            and the norm's weight and bias in one pass (`ops/triton/residual_norm.py` on CUDA), where torch.compile
            summed each bias's `[num_tokens, D]` gradient in a pass of its own. The same function; rounding
            differs. Not where the block drops paths (stochastic depth in training) or its norm is replaced or
            hooked. Default False until its speed is measured on a GPU (it replaces torch.compile's kernels with
            one of this package's; tested on the CPU and in Triton's interpreter); settable after construction.

    Attributes:
        cpu_chunk_tokens: on the CPU, without autograd and in eval mode, the blocks run over consecutive whole
            segments of at most this many tokens at a time rather than over the whole pack: the same
            computation on activations that stay in the CPU's caches (docs/cpu.md: packs of many images are
            otherwise slower than Hugging Face's per-image loop). None: always the whole pack. Compiled
            blocks and other devices always take the whole pack.
        stack_graphs: set by `parallel.graphs.enable_cuda_graphs`: inference forwards on CUDA replay the block
            stack as CUDA graphs, one per padded pack shape (None: the kernels are launched one by one).
        recompute_policy: the part of every block that `parallel.recompute.apply_recompute` recomputes in
            backward (None: nothing). Set by that function only; while it is set, transformers' gradient
            checkpointing refuses to turn on (see `_set_gradient_checkpointing`).
    """

    main_input_name = "hidden_states"
    recompute_policy: str | None = None
    stack_graphs = None  # a `parallel.graphs.StackGraphs` replays the blocks (`enable_cuda_graphs`)
    _can_record_outputs: dict = {}  # noqa: RUF012 - overrides the parent's output-capturing hooks with none

    def __init__(
        self,
        config: DINOv3ViTConfig,
        attn_backend: str = "auto",
        fused_mlp: bool | None = None,
        fused_rope: bool = True,
        mlp_gemms: str = "auto",
        fold_layer_scale: bool = True,
        fold_qkv_bias: bool = True,
        fused_norm: bool = False,
    ):
        super().__init__(config)
        self.attn_backend = check_attention_backend(attn_backend)
        self.fused_mlp = fused_mlp  # validated by the property below
        self.fused_rope = fused_rope
        self.mlp_gemms = mlp_gemms
        self.fold_layer_scale = fold_layer_scale
        self.fold_qkv_bias = fold_qkv_bias
        self.fused_norm = fused_norm
        self.cpu_chunk_tokens = CPU_CHUNK_TOKENS
        self.embeddings = DINOv3ViTPackedEmbeddings(config)
        self.rope_embeddings = DINOv3ViTPackedRopeEmbedding(config)
        self.model = DINOv3ViTPackedEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @property
    def fused_rope(self) -> bool:
        """With the "fa4" kernel, RoPE runs inside its op (forward and backward)."""
        return self._fused_rope

    @fused_rope.setter
    def fused_rope(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fused_rope: expected a bool, got {type(value).__name__}")
        self._fused_rope = value

    @property
    def fold_layer_scale(self) -> bool:
        """When autograd records, LayerScale multiplies the projection's weight and bias (see the class docstring)."""
        return self._fold_layer_scale

    @fold_layer_scale.setter
    def fold_layer_scale(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fold_layer_scale: expected a bool, got {type(value).__name__}")
        self._fold_layer_scale = value

    @property
    def fold_qkv_bias(self) -> bool:
        """When autograd records, q/k/v biases move into the attention op and the output projection (see the class
        docstring)."""
        return self._fold_qkv_bias

    @fold_qkv_bias.setter
    def fold_qkv_bias(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fold_qkv_bias: expected a bool, got {type(value).__name__}")
        self._fold_qkv_bias = value

    @property
    def fused_norm(self) -> bool:
        """When autograd records, each block's second norm runs as one op with the biases around it (see the class
        docstring)."""
        return self._fused_norm

    @fused_norm.setter
    def fused_norm(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"fused_norm: expected a bool, got {type(value).__name__}")
        self._fused_norm = value

    @property
    def mlp_gemms(self) -> str:
        """The GEMM kernels of the fused MLP in training: "auto" or one of `ops.mlp.MLP_GEMMS` (see the class
        docstring)."""
        return self._mlp_gemms

    @mlp_gemms.setter
    def mlp_gemms(self, value: str) -> None:
        self._mlp_gemms = mlp_gemms_setting(value)

    @property
    def fused_mlp(self) -> bool:
        """Run the MLP up-projection + bias + exact GELU as one Triton GEMM where it applies."""
        return self._fused_mlp

    @fused_mlp.setter
    def fused_mlp(self, value: bool | None) -> None:
        self._fused_mlp = fused_mlp_setting(value, self.config.use_gated_mlp, self.config.hidden_act)

    @property
    def cpu_chunk_tokens(self) -> int | None:
        """Token budget of one chunk of segments on the CPU (see the class docstring); None: no chunking."""
        return self._cpu_chunk_tokens

    @cpu_chunk_tokens.setter
    def cpu_chunk_tokens(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"cpu_chunk_tokens: expected a positive int or None, got {value!r}")
        self._cpu_chunk_tokens = value

    def resolved_attn_backend(self, inference: bool = True, max_seqlen: int | None = None) -> str:
        """The attention kernel `attn_backend` runs on this model's device and dtype; `inference`: no
        autograd (under `torch.no_grad()` / `torch.inference_mode()`, or no tensor requiring grad);
        `max_seqlen`: the pack's longest segment, which "auto" weighs for inference."""
        return resolve_attention(
            self.attn_backend,
            self.norm.weight.device,
            self.norm.weight.dtype,
            self.config.attention_dropout if self.training else 0.0,
            inference=inference,
            head_dim=self.config.hidden_size // self.config.num_attention_heads,
            max_seqlen=max_seqlen,
        )

    def packed_batch(
        self,
        layout: PackedLayout,
        inference: bool = True,
        rope_generator: torch.Generator | None = None,
    ) -> PackedBatch:
        """The `PackedBatch` every block of this forward receives: RoPE tables for `layout` (augmented per
        segment in training mode) and the kernels for this device, dtype and grad mode (`inference`: autograd
        does not record the forward), split into chunks of segments on the CPU (`cpu_chunk_tokens`).
        Refreshes the blocks' cached fused q/k/v weights for inference."""
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        if inference:
            for layer in self.model.layer:
                layer.attention.refresh_fused_qkv()
        cos, sin = self.rope_embeddings(layout, dtype, rope_generator)
        fused = fused_mlp_runs(self.fused_mlp, device, dtype)
        batch = PackedBatch(
            layout=layout,
            cos=cos,
            sin=sin,
            attention=self.resolved_attn_backend(inference=inference, max_seqlen=layout.max_seqlen),
            fused_mlp=fused,
            fused_rope=self.fused_rope,
            mlp_gemms="triton" if inference else resolve_mlp_gemms(self.mlp_gemms, device, fused),
            fold_layer_scale=self.fold_layer_scale and not inference,
            fold_qkv_bias=self.fold_qkv_bias and not inference,
            fused_norm=self.fused_norm and not inference,
            dropout=self.config.attention_dropout if self.training else 0.0,
            inference=inference,
        )
        if device.type == "cpu" and inference and not self.training and self.cpu_chunk_tokens is not None:
            batch.chunks = batch.chunked(self.cpu_chunk_tokens)
        return batch

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs) -> None:
        """Where transformers' `gradient_checkpointing_enable()` (and `activation_checkpointing_enable()` where
        it exists) and their `_disable` set the blocks' checkpointing flag, in every supported version.

        Refuses to turn it on after `apply_recompute`: transformers would nest its checkpoint of each whole
        block around the one `apply_recompute` put in (a recomputed attention or MLP then runs three times a
        step). `apply_recompute` refuses the other order. No parameter is named `value`: transformers takes a
        `_set_gradient_checkpointing` with one for its pre-4.35 format."""
        if enable and self.recompute_policy is not None:
            around = (
                "would recompute each whole block, the GELU output included, with the policy's recomputation inside"
                if self.recompute_policy == "gelu"
                else "would checkpoint each whole block around it (nested checkpoints)"
            )
            raise ValueError(
                f"model: apply_recompute(model, {self.recompute_policy!r}) already recomputes part of every block; "
                f"transformers' gradient checkpointing (gradient_checkpointing_enable()) {around}: use "
                "apply_recompute(model, 'block') alone for whole blocks"
            )
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

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
        # Inputs on any real device are moved to the model's (see `validate_packed_input`).
        grid = validate_packed_input(hidden_states, grid_thw, self.patch_dim, bool_masked_pos)
        num_layers = self.config.num_hidden_layers
        if select_layer is not None:
            if not isinstance(select_layer, int) or isinstance(select_layer, bool):
                raise TypeError(f"select_layer: expected an int, got {type(select_layer).__name__}")
            if not -(num_layers + 1) <= select_layer <= num_layers:
                raise ValueError(
                    f"select_layer: expected an index into {num_layers + 1} hidden states "
                    f"(-{num_layers + 1}..{num_layers}), got {select_layer}"
                )

        device = self.norm.weight.device
        # Inference (forward-only kernels allowed) unless autograd will record this call: grad mode on and
        # training, or the input or any parameter requiring grad.
        inference = not (
            torch.is_grad_enabled()
            and (self.training or hidden_states.requires_grad or any(p.requires_grad for p in self.parameters()))
        )
        layout = PackedLayout.build(grid, self.num_prefix_tokens, device)
        batch = self.packed_batch(layout, inference, rope_generator)

        if bool_masked_pos is not None:
            bool_masked_pos = bool_masked_pos.to(device)
        x = self.embeddings(hidden_states.to(device), layout, bool_masked_pos)
        # Blocks after the selected hidden state are skipped unless every hidden state is asked for.
        selected = None if select_layer is None else select_layer % (num_layers + 1)
        stop = num_layers if selected is None or output_hidden_states else selected
        graphs = self.stack_graphs
        if graphs is not None and graphs.takes(x, batch, output_hidden_states):
            x, states = graphs(x, batch, stop), None
        else:
            x, states = self.model(x, batch, stop, output_hidden_states)
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
