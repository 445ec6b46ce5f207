"""CUDA graphs for the inference block stack: one launch per pack instead of hundreds.

The compiled ViT-L stack issues about ten kernels per block; launching them from Python took about as long as
the device took to run them on the H200 (23 ms per 16,384-token pack, `embed_throughput.py`'s "forward launch
on an idle device"), so any other work on the host (GPU JPEG decoding in a thread, the writer) slowed the
model. `enable_cuda_graphs(model)` records the stack once per pack shape and replays it.

Shapes are made few by padding: a pack of T tokens in n segments runs as `bucket_tokens(T)` tokens (T rounded
up to a multiple of `token_bucket`) in `bucket_segments(n)` segments (n + 1 rounded up to the attention
kernel's search width, at least 64): the padding tokens are one extra segment of zeros (cos 1, sin 0: finite
through every block), and the segments past it are empty. Every block's work is per token except attention,
which stays inside each segment, so the real tokens come out as without padding (`padded_stack_inputs`,
checked on the CPU through the Triton kernel's interpreter in `tests/test_cuda_graphs.py`). Packs of at most
64 images and 16,384 tokens meet at most 16384 / 512 = 32 shapes; each is recorded once (a warm-up run and a
capture), all in one memory pool. Other threads may use the device while a shape is recorded
(`CAPTURE_ERROR_MODE`).

What replays: the blocks only, for forwards autograd does not record, with the "triton" attention kernel
(its grid and arguments follow from the shapes and `cu_seqlens` on the device; kernels taking the longest
segment as a host int are left to the normal path), no chunking (CPU) and no per-layer states. Anything
else runs the normal path. A graph reads the weights where they were when it was recorded: a weight
replaced or changed in place (a new `_version`) drops every graph, and the next pack records again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..ops.triton.varlen_attention import segment_search_width
from ..packing import PackedBatch, PackedLayout

GRAPH_ATTENTION = ("triton",)  # kernels whose launch depends on shapes and device tensors only
TOKEN_BUCKET = 512
CAPTURE_ERROR_MODE = "thread_local"
"""`torch.cuda.graph(capture_error_mode=...)`: only the recording thread is barred from calls that are unsafe
during a capture (cudaMalloc, synchronizations). Other threads go on working on the device meanwhile:
`embed`'s GPU decoding thread (nvImageCodec, torch's allocator) and the DataLoader's pin-memory thread. In
the default mode ("global") their calls invalidated the capture: on the H200 (2026-12-03) a second `embed`
call in one process, whose warm model recorded its first shape while the decoding thread ran, stopped with
"operation failed due to a previous error during capture". Their work is on streams of their own, which
the capture does not record, and their allocations come from the allocator's other pools."""


def bucket_tokens(tokens: int, token_bucket: int = TOKEN_BUCKET) -> int:
    """`tokens` rounded up to a multiple of `token_bucket` (at least one bucket)."""
    return max(1, -(-tokens // token_bucket)) * token_bucket


def bucket_segments(segments: int) -> int:
    """Segments of a padded pack of `segments` images: room for the padding segment, rounded up to the
    Triton attention kernel's search width (so the kernel compiled for the bucket is the one it runs)."""
    return segment_search_width(segments + 1)


@dataclass
class PaddedInputs:
    """The block stack's inputs for a pack padded to `tokens` tokens and `segments` segments."""

    x: torch.Tensor
    batch: PackedBatch
    tokens: int
    segments: int


def padded_stack_inputs(x: torch.Tensor, batch: PackedBatch, tokens: int, segments: int) -> PaddedInputs:
    """`x [T, D]` and `batch` padded to `tokens` >= T tokens and `segments` > n segments (module docstring):
    rows past T are zeros with cos 1 and sin 0 in one extra segment, then empty segments. The layout keeps
    only what the blocks read (cu_seqlens on the device and the host, equal-length runs, the longest
    segment, token segments); its `max_seqlen` is `tokens`, which no graph-safe kernel reads."""
    layout = batch.layout
    t, n = x.shape[0], layout.num_segments
    if tokens < t or segments <= n:
        raise ValueError(f"padding: {t} tokens in {n} segments do not fit {tokens} tokens in {segments} segments")
    offsets = np.full(segments + 1, tokens, dtype=np.int64)
    offsets[: n + 1] = layout.cu_seqlens_host.numpy()
    lens = np.diff(offsets)
    run_first = np.flatnonzero(np.r_[True, lens[1:] != lens[:-1]])
    runs = np.stack([offsets[run_first], np.diff(np.r_[run_first, segments]), lens[run_first]], axis=1)
    pad = tokens - t
    device = x.device
    padded_x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    cos = torch.cat([batch.cos, batch.cos.new_ones(pad, batch.cos.shape[1])])
    sin = torch.cat([batch.sin, batch.sin.new_zeros(pad, batch.sin.shape[1])])
    token_segment = torch.cat([layout.token_segment, layout.token_segment.new_full((pad,), n)])
    cu_host = torch.from_numpy(offsets.astype(np.int32))
    padded_layout = PackedLayout(
        segment_hw=[*layout.segment_hw, *[(0, 0)] * (segments - n)],
        seq_lens=lens.tolist(),
        cu_seqlens=cu_host.to(device),
        cu_seqlens_host=cu_host,
        equal_runs_host=torch.from_numpy(runs.ravel()),
        max_seqlen=tokens,
        patch_index=layout.patch_index,
        prefix_index=layout.prefix_index,
        token_source=layout.token_source,
        token_segment=token_segment,
        num_tokens=tokens,
    )
    padded = replace(batch, layout=padded_layout, cos=cos, sin=sin, chunks=())
    return PaddedInputs(padded_x, padded, tokens, segments)


class _Graph:
    """One recorded shape: static input buffers, the graph and its output."""

    def __init__(self, stack, inputs: PaddedInputs, num_layers: int, pool) -> None:
        self.inputs = inputs
        stream = torch.cuda.Stream(inputs.x.device)
        stream.wait_stream(torch.cuda.current_stream(inputs.x.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: compiles, autotunes, allocates
            for _ in range(2):
                stack(inputs.x, inputs.batch, num_layers, False)
        torch.cuda.current_stream(inputs.x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=CAPTURE_ERROR_MODE):
            self.out, _ = stack(inputs.x, inputs.batch, num_layers, False)

    def run(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        static, t, n = self.inputs, x.shape[0], batch.layout.num_segments
        static.x[:t].copy_(x)
        static.x[t:].zero_()
        static.batch.cos[:t].copy_(batch.cos)
        static.batch.cos[t:].fill_(1)
        static.batch.sin[:t].copy_(batch.sin)
        static.batch.sin[t:].zero_()
        offsets = torch.full((static.segments + 1,), static.tokens, dtype=torch.int32)
        offsets[: n + 1] = batch.layout.cu_seqlens_host
        if x.is_cuda:
            offsets = offsets.pin_memory()
        static.batch.layout.cu_seqlens.copy_(offsets, non_blocking=True)
        self.graph.replay()
        return self.out[:t].clone()  # the next replay of any graph of the pool overwrites `out`


class StackGraphs:
    """Records and replays the block stack of `model` per padded pack shape (module docstring)."""

    def __init__(self, model, token_bucket: int = TOKEN_BUCKET) -> None:
        if not isinstance(token_bucket, int) or isinstance(token_bucket, bool) or token_bucket < 1:
            raise ValueError(f"token_bucket: expected a positive int, got {token_bucket!r}")
        self.model, self.token_bucket = model, token_bucket
        self.graphs: dict[tuple, _Graph] = {}
        self.recorded = 0  # graphs recorded over the object's life (a weight change records again)
        self._pool = None
        self._weights: tuple | None = None
        self._slots: list | None = None  # (dict, name) of every parameter and buffer of the stack (`_weights_key`)
        self._structure: list = []

    def takes(self, x: torch.Tensor, batch: PackedBatch, keep_states: bool) -> bool:
        """Whether this call replays a graph (module docstring: what replays)."""
        return (
            x.is_cuda
            and batch.inference
            and not torch.is_grad_enabled()
            and batch.attention in GRAPH_ATTENTION
            and not batch.chunks
            and not keep_states
            and not self.model.training
        )

    def _weights_key(self) -> tuple:
        """Where the stack's weights are and their versions (inference tensors, such as the fused q/k/v
        caches made under `torch.inference_mode`, have no version: the cache's own key holds its sources').

        The stack's modules are walked once, not per call (walking them cost about 1 ms of host time per
        forward, in the H200 profile of ViT-B embedding of 2026-12-03): each call reads every parameter and
        buffer from its module's own dict, so a tensor replaced by any means (assignment, `load_state_dict`
        with `assign=True`, `.to()`) is seen, and walks again when a submodule was replaced or a tensor
        added or removed."""
        if self._slots is None or any(
            len(owner) != n or any(owner.get(name) is not child for name, child in children)
            for owner, n, children in self._structure
        ):
            modules = list(self.model.model.modules())
            self._structure = [(m._modules, len(m._modules), list(m._modules.items())) for m in modules]
            self._structure += [(d, len(d), []) for m in modules for d in (m._parameters, m._buffers)]
            self._slots = [(d, name) for m in modules for d in (m._parameters, m._buffers) for name in d]
        tensors = [t for d, name in self._slots if (t := d[name]) is not None]
        key = [(t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors]
        for layer in self.model.model.layer:
            fused = layer.attention._fused
            if fused is not None:
                key.append((fused[0], *(t.data_ptr() for t in fused[1] if t is not None)))
        return tuple(key)

    def __call__(self, x: torch.Tensor, batch: PackedBatch, num_layers: int) -> torch.Tensor:
        weights = self._weights_key()
        if weights != self._weights:
            self.graphs.clear()  # recorded against other weights
            self._pool = None  # their pool went with them: the next graph starts a new one
            self._weights = weights
        tokens = bucket_tokens(x.shape[0], self.token_bucket)
        segments = bucket_segments(batch.layout.num_segments)
        key = (tokens, segments, num_layers, x.dtype, batch.attention, batch.fused_mlp, batch.fused_rope)
        graph = self.graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode(False):  # static buffers that later calls may fill under no_grad too
                inputs = padded_stack_inputs(x, batch, tokens, segments)
            graph = _Graph(self.model.model, inputs, num_layers, self._pool)
            self.graphs[key] = graph
            self.recorded += 1
        return graph.run(x, batch)


def enable_cuda_graphs(model, token_bucket: int = TOKEN_BUCKET) -> StackGraphs:
    """Have `model`'s inference forwards on CUDA replay its block stack as CUDA graphs (module docstring);
    compile the model first (`parallel.compile.compile_model`) for the compiled kernels to be recorded.
    Returns the `StackGraphs` (its `recorded` counts the graphs recorded); `disable_cuda_graphs` undoes it."""
    from ..model.modeling import DINOv3ViTPackingModel

    if not isinstance(model, DINOv3ViTPackingModel):
        raise TypeError(f"model: expected a DINOv3ViTPackingModel, got {type(model).__name__}")
    model.stack_graphs = StackGraphs(model, token_bucket)
    return model.stack_graphs


def disable_cuda_graphs(model) -> None:
    """Back to launching the stack's kernels one by one (the recorded graphs are freed)."""
    model.stack_graphs = None
