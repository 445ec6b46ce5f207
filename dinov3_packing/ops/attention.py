"""Attention over packed segments: the one place that knows the attention kernels.

`attend(qkv, batch)` applies RoPE to q and k and attends within each segment of the packed sequence, never
across segments, with the kernel named by `batch.attention`. `resolve_attention` turns a requested backend
(a name from `ATTENTION_BACKENDS`, "auto" included) into the concrete kernel for a device, dtype and grad
mode, or raises before any compute. The model calls only these two; adding a kernel is one `Backend` entry
in `_REGISTRY` below (plus its tests).

Kernels:
    "fa4":        FlashAttention-4 (`flash_attn.cute.flash_attn_varlen_func`, the flash-attn-4 package: the
                  `dinov3-packing[hopper]` extra) as one custom op with its backward (`ops/fa4.py`); CUDA of
                  compute capability >= 9.0 (Hopper and newer), fp16/bf16, no dropout.
    "triton":     this package's Triton varlen forward (`ops/triton/varlen_attention.py`; CUDA, fp16/bf16,
                  head_dim a power of two). Forward only: inference under `torch.no_grad()` /
                  `torch.inference_mode()`.
    "varlen":     PyTorch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 varlen; CUDA, fp16/bf16).
    "flash_attn": `flash_attn.flash_attn_varlen_func` from the flash-attn package, when installed.
    "sdpa":       the exact reference: `scaled_dot_product_attention` per run of equal-length segments; any
                  device and dtype; what CPU and fp32 use.
    "auto":       the first kernel in `_AUTO_ORDER` that can run the call (see `resolve_attention`): on SM90+
                  with flash-attn-4 installed, "fa4" for training and for inference packs whose longest
                  segment reaches `FA4_INFERENCE_MIN_SEQLEN`; "triton" for other inference packs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module imports without torch, so the CLI can list the backends in a blink
    import torch

    from ..packing import PackedBatch, PackedLayout


def _missing(module: str, package: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        return None if found else f"needs the {package} package, which is not installed"

    return check


def _fa4_missing() -> str | None:
    reason = _missing("flash_attn.cute", "flash-attn-4")()
    return reason and f'{reason}: pip install "dinov3-packing[hopper]"'


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (a host query, no device sync); None without CUDA."""
    import torch

    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None


def _triton_missing() -> str | None:
    from .triton import varlen_attention

    return None if varlen_attention.triton_available() else "needs triton, which is not installed"


def _power_of_two_16_to_256(head_dim: int | None) -> bool:
    return head_dim is not None and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _multiple_of_8_to_256(head_dim: int | None) -> bool:
    return head_dim is not None and 8 <= head_dim <= 256 and head_dim % 8 == 0


def _run_varlen(q, k, v, layout: PackedLayout, dropout_p: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu, n = layout.cu_seqlens, layout.max_seqlen
    return varlen_attn(q, k, v, cu, cu, n, n)


def _run_flash_attn(q, k, v, layout: PackedLayout, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu, n = layout.cu_seqlens, layout.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout_p)


def _run_fa4(q, k, v, layout: PackedLayout, dropout_p: float) -> torch.Tensor:
    from .fa4 import fa4_varlen_attention

    return fa4_varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen)


def _run_fa4_qkv(qkv, cos, sin, layout: PackedLayout, dropout_p: float, qk_bias=None) -> torch.Tensor:
    from .fa4 import fa4_rope_attention

    return fa4_rope_attention(qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen, qk_bias)


def _run_triton(q, k, v, layout: PackedLayout, dropout_p: float) -> torch.Tensor:
    from .triton.varlen_attention import triton_varlen_attention

    return triton_varlen_attention(q, k, v, layout.cu_seqlens)


def _run_sdpa(q, k, v, layout: PackedLayout, dropout_p: float) -> torch.Tensor:
    from .sdpa import sdpa_runs, sdpa_varlen

    if dropout_p > 0.0:
        return sdpa_runs(q, k, v, layout.equal_runs_host.view(-1, 3).tolist(), dropout_p)
    return sdpa_varlen(q, k, v, layout.equal_runs_host)


@dataclass(frozen=True)
class Backend:
    """One attention kernel and what it can run.

    Attributes:
        name: the `attn_backend=` / `--attn-backend` value.
        run: `(q, k, v, layout, dropout_p) -> out`, all `[tokens, heads, head_dim]`.
        cuda_half: needs a CUDA device and fp16/bf16.
        backward: has a backward (usable when autograd records the call).
        dropout: supports attention dropout.
        missing: None when the package it needs is importable, else the reason.
        head_dim_ok: which head sizes it runs (None: unknown).
        head_dims: those sizes in words, for the error.
        min_capability: the lowest CUDA compute capability it runs on (None: any).
        inference_min_seqlen: "auto" takes it for a forward without autograd only when the pack's longest
            segment has at least this many tokens (training takes it whatever the lengths).
        run_qkv: `(qkv, cos, sin, layout, dropout_p, qk_bias) -> out`, the kernel with RoPE inside (`qkv [tokens,
            3, heads, head_dim]`, the RoPE tables, None or a `[2, heads, head_dim]` bias to add to q and k before
            the rotation), which `attend` calls instead of RoPE + `run` when the batch allows it
            (`PackedBatch.fused_rope`); None: the kernel takes rotated q and k only.
    """

    name: str
    run: Callable[..., torch.Tensor]
    cuda_half: bool
    backward: bool
    dropout: bool
    missing: Callable[[], str | None] = lambda: None
    head_dim_ok: Callable[[int | None], bool] = lambda d: True
    head_dims: str = "any head_dim"
    min_capability: tuple[int, int] | None = None
    inference_min_seqlen: int = 0
    run_qkv: Callable[..., torch.Tensor] | None = None


# FlashAttention-4's forward against this package's Triton kernel, ViT-L heads, bf16, on the H200
# (../shared/docs/gpu-notes.md, 2026-12-01): 0.61x on 224 px images (201 tokens), on par on 512 px (1029:
# 1.02x) and on mixed-64 (segments of 201..2309 tokens: 1.04x), 1.28x on 2048 px (16389). Up to the longest
# on-par length it gains nothing (and its first use compiles for tens of seconds), so auto switches at the
# first power of two above 2309; 1024 px images (4101 tokens) are the first past it, a length between the
# measured ones that benchmarks/fa4_gpu_check.py times.
FA4_INFERENCE_MIN_SEQLEN = 4096


_REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "fa4",
            _run_fa4,
            True,
            True,
            False,
            _fa4_missing,
            _multiple_of_8_to_256,
            "a head_dim that is a multiple of 8 in 8..256",
            min_capability=(9, 0),
            inference_min_seqlen=FA4_INFERENCE_MIN_SEQLEN,
            run_qkv=_run_fa4_qkv,
        ),
        Backend("varlen", _run_varlen, True, True, False, _missing("torch.nn.attention.varlen", "PyTorch >= 2.10")),
        # flash-attn-4 installs `flash_attn.cute` into the same `flash_attn` namespace: look for FA2's own module.
        Backend(
            "flash_attn", _run_flash_attn, True, True, True, _missing("flash_attn.flash_attn_interface", "flash-attn")
        ),
        Backend(
            "triton",
            _run_triton,
            True,
            False,
            False,
            _triton_missing,
            _power_of_two_16_to_256,
            "a head_dim that is a power of two in 16..256",
        ),
        Backend("sdpa", _run_sdpa, False, True, True),
    )
}
# What "auto" tries, first match wins. FA4 leads where it runs: fwd+bwd 1.77x FlashAttention-2 on mixed-64 on
# the H200 (../shared/docs/gpu-notes.md), and for inference only past `inference_min_seqlen`. Triton leads
# the rest of inference: 1.45x FlashAttention-2 on the mixed-64 lengths on the H100
# (benchmarks/results/RESULTS.md); it has no backward, so training falls through.
_AUTO_ORDER = ("fa4", "triton", "flash_attn", "varlen", "sdpa")
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", *_REGISTRY)


def _why_not(
    b: Backend, device: torch.device, dtype: torch.dtype, dropout: float, inference: bool, head_dim: int | None
) -> str | None:
    """Why `b` cannot run this call (None: it can)."""
    import torch

    if b.cuda_half and not (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        return f"needs a CUDA device and fp16/bf16, got {device.type} and {dtype}"
    if b.min_capability is not None:
        got = _capability(device)
        if got is None or got < b.min_capability:
            have = "no CUDA device" if got is None else ".".join(map(str, got))
            return f"needs a GPU of compute capability >= {'.'.join(map(str, b.min_capability))}, got {have}"
    reason = b.missing()
    if reason:
        return reason
    if dropout > 0.0 and not b.dropout:
        return (
            f"has no attention dropout (config.attention_dropout={dropout} in training); use 'flash_attn' or "
            "'sdpa', or set attention_dropout to 0"
        )
    if not inference and not b.backward:
        return (
            "is forward-only; run the model under torch.no_grad() or torch.inference_mode(), or use 'varlen' "
            "(or 'auto') when gradients are needed"
        )
    if not b.head_dim_ok(head_dim):
        return f"needs {b.head_dims}, got head_dim={head_dim}; use 'varlen'"
    return None


def resolve_attention(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    dropout: float = 0.0,
    *,
    inference: bool = False,
    head_dim: int | None = None,
    max_seqlen: int | None = None,
) -> str:
    """The concrete kernel for `backend` on this device and dtype, given the attention dropout, whether
    autograd is off (`inference`), the head size and the pack's longest segment (`max_seqlen`, a host int;
    None: unknown); raises ValueError naming `attn_backend` if it cannot run. "auto" takes the first of
    `_AUTO_ORDER` that can, skipping for inference a kernel whose `inference_min_seqlen` the pack does not
    reach (an unknown length reaches none but 0)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
    import torch

    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER:
            b = _REGISTRY[name]
            if inference and b.inference_min_seqlen and (max_seqlen or 0) < b.inference_min_seqlen:
                continue
            if _why_not(b, device, dtype, dropout, inference, head_dim) is None:
                return name
        return "sdpa"
    reason = _why_not(_REGISTRY[backend], device, dtype, dropout, inference, head_dim)
    if reason:
        hint = "" if backend == "sdpa" else "; 'sdpa' (exact, any device) or 'auto' always run"
        raise ValueError(f"attn_backend: {backend!r} {reason}{hint}")
    return backend


def check_attention_backend(backend: object) -> str:
    """Validate a requested backend name (before any model is built)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [x2, x1]` along the last dim (rotate_half without its sign, which RoPE's table carries)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` for `x [tokens, ..., head_dim]` and tables `[tokens, head_dim]`,
    `sin` carrying rotate_half's sign (`cat(-sin_1, sin_2)`)."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    return x * cos.view(shape) + swap_halves(x) * sin.view(shape)


def rope_in_kernel(batch: PackedBatch) -> bool:
    """Whether `attend` rotates q and k inside the kernel's op (`Backend.run_qkv`, "fa4", with
    `batch.fused_rope`)."""
    return batch.fused_rope and _REGISTRY[batch.attention].run_qkv is not None


def check_qk_bias(qk_bias: torch.Tensor | None, qkv: torch.Tensor) -> None:
    """`qk_bias` for `attend` / `fa4_rope_attention` and the `[tokens, 3, heads, head_dim]` projection `qkv`: None, or a
    contiguous floating `[2, heads, head_dim]` tensor on qkv's device; raises TypeError / ValueError naming it."""
    if qk_bias is None:
        return
    import torch  # (this module imports without torch)

    if not isinstance(qk_bias, torch.Tensor) or not qk_bias.is_floating_point():
        raise TypeError(f"qk_bias: expected None or a floating-point tensor, got {type(qk_bias).__name__}")
    want = (2, *qkv.shape[2:])
    if tuple(qk_bias.shape) != want or qk_bias.device != qkv.device or not qk_bias.is_contiguous():
        raise ValueError(
            f"qk_bias: expected a contiguous [2, heads, head_dim] = {list(want)} tensor on {qkv.device} (q's and k's "
            f"biases), got {'a non-contiguous ' if not qk_bias.is_contiguous() else ''}{list(qk_bias.shape)} on "
            f"{qk_bias.device}"
        )


def attend(qkv: torch.Tensor, batch: PackedBatch, qk_bias: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k (rows with cos = 1, sin = 0 stay unrotated), then attention per segment: inside the
    kernel's op where it has one (`Backend.run_qkv`, "fa4") and `batch.fused_rope` is set, else as below.

    Args:
        qkv: `[num_tokens, 3, heads, head_dim]`, the fused projection's output.
        batch: the forward's `PackedBatch` (layout, RoPE tables, the kernel and dropout to use).
        qk_bias: None, or a contiguous `[2, heads, head_dim]` bias to add to q and k before the rotation (inside
            the kernel's op where RoPE runs there).

    Returns:
        `[num_tokens, heads * head_dim]`.

    RoPE is one elementwise pass over q and k (fused by torch.compile); rotating inside the Triton kernel
    was measured slower on the H100 (benchmarks/results/RESULTS.md).
    """
    check_qk_bias(qk_bias, qkv)
    if rope_in_kernel(batch):
        run_qkv = _REGISTRY[batch.attention].run_qkv
        return run_qkv(qkv, batch.cos, batch.sin, batch.layout, batch.dropout, qk_bias).flatten(1)
    qk = apply_rope(qkv[:, :2] if qk_bias is None else qkv[:, :2] + qk_bias, batch.cos, batch.sin)
    out = packed_attention(qk[:, 0], qk[:, 1], qkv[:, 2], batch.layout, batch.attention, batch.dropout)
    return out.flatten(1)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, backend: str, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax attention within each segment of `layout` with a concrete kernel (not "auto");
    q, k, v and the result `[num_tokens, heads, head_dim]`."""
    if backend not in _REGISTRY:
        raise ValueError(f"backend: expected a concrete backend {tuple(_REGISTRY)}, got {backend!r}")
    return _REGISTRY[backend].run(q, k, v, layout, dropout_p)
