"""The attention registry (`ops/attention.py`): backend selection, the exact SDPA path, `attend`.

Reference for the kernel: PyTorch's `scaled_dot_product_attention` run on each segment alone, fp32;
tolerance 1e-6 relative (the same kernel on the same rows; only the batching of equal-length runs differs).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from dinov3_packing.ops import attention
from dinov3_packing.ops.attention import ATTENTION_BACKENDS, packed_attention, resolve_attention
from dinov3_packing.packing import PackedBatch, PackedLayout

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_picks_by_device_dtype_and_dropout():
    assert resolve_attention("auto", CPU, torch.float32) == "sdpa"
    assert resolve_attention("auto", CPU, torch.bfloat16) == "sdpa"
    assert resolve_attention("auto", CUDA, torch.float32) == "sdpa"  # the flash kernels are fp16/bf16 only
    assert resolve_attention("auto", CUDA, torch.bfloat16) in ("varlen", "flash_attn")
    assert resolve_attention("auto", CUDA, torch.bfloat16, dropout=0.1) in ("sdpa", "flash_attn")
    # Inference on CUDA in bf16 takes the Triton kernel where triton is installed and the head size fits.
    expected = "triton" if attention._triton_missing() is None else "varlen"
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True, head_dim=64) == expected
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True, head_dim=48) in ("varlen", "flash_attn")
    assert resolve_attention("auto", CUDA, torch.bfloat16, inference=True, head_dim=None) != "triton"


def test_backend_names_are_the_registry():
    """The names the model and the CLI accept are the registry's, plus "auto"."""
    assert ATTENTION_BACKENDS == ("auto", *attention._REGISTRY)
    assert set(attention._AUTO_ORDER) <= set(attention._REGISTRY)


def test_auto_skips_a_backend_whose_package_is_missing(monkeypatch):
    """A kernel whose package is absent is never chosen by "auto", and asking for it by name says which
    package is missing."""
    varlen = attention._REGISTRY["varlen"]
    monkeypatch.setitem(
        attention._REGISTRY, "varlen", attention.Backend(**{**varlen.__dict__, "missing": lambda: "needs X"})
    )
    monkeypatch.setitem(
        attention._REGISTRY,
        "flash_attn",
        attention.Backend(**{**attention._REGISTRY["flash_attn"].__dict__, "missing": lambda: "needs Y"}),
    )
    assert resolve_attention("auto", CUDA, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match=r"attn_backend: 'varlen' needs X"):
        resolve_attention("varlen", CUDA, torch.bfloat16)


def test_triton_is_refused_when_gradients_are_needed(monkeypatch):
    # The gate itself, whether or not triton is installed here (the floors' environment has none).
    monkeypatch.setitem(
        attention._REGISTRY,
        "triton",
        attention.Backend(**{**attention._REGISTRY["triton"].__dict__, "missing": lambda: None}),
    )
    with pytest.raises(ValueError, match=r"attn_backend: 'triton' is forward-only"):
        resolve_attention("triton", CUDA, torch.bfloat16, inference=False, head_dim=64)
    with pytest.raises(ValueError, match=r"attn_backend: 'triton' needs a head_dim that is a power of two"):
        resolve_attention("triton", CUDA, torch.bfloat16, inference=True, head_dim=48)


@pytest.mark.parametrize(
    ("backend", "device", "dtype", "dropout"),
    [
        ("varlen", CPU, torch.bfloat16, 0.0),
        ("varlen", CUDA, torch.float32, 0.0),
        ("varlen", CUDA, torch.bfloat16, 0.1),
        ("flash_attn", CPU, torch.float16, 0.0),
        ("xformers", CPU, torch.float32, 0.0),
    ],
)
def test_unusable_backend_is_refused_naming_the_argument(backend, device, dtype, dropout):
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_attention(backend, device, dtype, dropout)


def test_sdpa_path_equals_sdpa_per_segment():
    g = torch.Generator().manual_seed(0)
    grid = [(1, 2, 3), (1, 2, 3), (1, 1, 1), (2, 3, 2), (1, 4, 1)]
    layout = PackedLayout.build(grid, num_prefix=5, device="cpu")
    q, k, v = (torch.randn(layout.num_tokens, 4, 8, generator=g) for _ in range(3))
    out = packed_attention(q, k, v, layout, "sdpa")
    for start, end in itertools.pairwise(layout.cu_seqlens_host.tolist()):
        ref = F.scaled_dot_product_attention(*(x[start:end].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
        assert_close(out[start:end], ref, rel_tol=1e-6)


def test_attend_is_hf_rope_then_per_segment_attention():
    """`apply_rope` with the model's signed table equals Hugging Face's `x * cos + rotate_half(x) * sin`, and
    `attend` is that rotation of q and k (not v) followed by attention per segment, heads flattened."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import rotate_half

    from dinov3_packing.ops.attention import apply_rope, attend

    g = torch.Generator().manual_seed(0)
    layout = PackedLayout.build([(1, 2, 3), (1, 1, 4), (1, 3, 3)], 2, "cpu")
    t, h, d = layout.num_tokens, 2, 8
    qkv = torch.randn(t, 3, h, d, generator=g)
    angles = torch.rand(t, d // 2, generator=g).mul(6.3).tile(2)
    cos, sin = angles.cos(), angles.sin()
    sin_signed = torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], 1)
    q, k, v = qkv.unbind(1)
    q_hf, k_hf = (x * cos[:, None] + rotate_half(x) * sin[:, None] for x in (q, k))
    assert_close(apply_rope(q, cos, sin_signed), q_hf, rel_tol=1e-6)
    out = attend(qkv, PackedBatch(layout, cos, sin_signed, attention="sdpa")).unflatten(1, (h, d))
    starts = layout.cu_seqlens_host.tolist()
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (q_hf, k_hf, v))).transpose(0, 1)
            for s, e in itertools.pairwise(starts)
        ]
    )
    assert_close(out, ref, rel_tol=1e-6)
