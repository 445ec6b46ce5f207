"""The "fa4" backend (`ops/fa4.py`): backend selection, the missing-package error, the custom ops.

No GPU and no flash-attn-4 here. Selection runs the real registry with availability and compute capability
patched. The ops' wrapper runs end to end against a stand-in `flash_attn.cute` package that a fixture
writes to disk: the two functions the wrapper calls, with the real package's signatures, computing
attention per segment with SDPA (forward) and the attention backward from the saved output and
log-sum-exp (backward). Gradient tolerance: fp32,
`conftest.assert_close` (1e-5 relative), because the stand-in and the "sdpa" backend run the same fp32
operations, the one in another grouping of segments.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap

import pytest
import torch
from conftest import assert_close, random_images, tiny_config
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import FakeTensorMode

from dinov3_packing import pack, random_packing_model
from dinov3_packing.ops import attention
from dinov3_packing.ops.attention import FA4_INFERENCE_MIN_SEQLEN, packed_attention, resolve_attention
from dinov3_packing.ops.fa4 import fa4_varlen_attention
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.recompute import apply_recompute

CUDA = torch.device("cuda")
BF16 = torch.bfloat16

# The stand-in package. Parameter names and order are those of flash-attn-4 4.0.0b36's
# `flash_attn.cute.flash_attn_varlen_func` and `flash_attn.cute.interface._flash_attn_bwd` (the arguments
# the wrapper does not pass are left out, so a misspelt keyword fails here as it would there).
STAND_IN = """
import torch
import torch.nn.functional as F

CALLS = []


def _attend(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    assert cu_seqlens.dtype == torch.int32 and isinstance(max_seqlen, int)
    bounds = cu_seqlens.tolist()
    assert max_seqlen == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale).transpose(0, 1))
        lses.append(torch.logsumexp(qs @ ks.transpose(-1, -2) * softmax_scale, dim=-1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def flash_attn_varlen_func(
    q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
    softmax_scale=None, causal=False, return_lse=False,
):
    assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k and not causal
    CALLS.append("forward")
    out, lse = _attend(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale)
    return out, lse if return_lse else None
"""

STAND_IN_INTERFACE = """
import torch

from . import CALLS, flash_attn_varlen_func


def _flash_attn_bwd(
    q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
    window_size_right=None, m_block_size=64, n_block_size=128, num_threads=256, pack_gqa=False,
    num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False, dKV_swapAB=False, dQ_swapAB=False,
    AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2, V_in_regs=False, cu_seqlens_q=None,
    cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
    deterministic=False, dq=None, dk=None, dv=None,
):
    assert not causal and lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    outs = (dq, dk, dv)
    assert all(t is None for t in outs) or all(t is not None and t.shape == q.shape for t in outs)
    CALLS.append("backward" if dq is None else "backward into given tensors")
    # The attention backward from the saved output and log-sum-exp, as the real kernel computes it (this
    # runs below autograd, inside the wrapper's backward op).
    grads = []
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs, os, dos = (t[a:b].transpose(0, 1) for t in (q, k, v, out, dout))
        p = torch.exp(qs @ ks.transpose(-1, -2) * softmax_scale - lse[:, a:b, None])
        dp = dos @ vs.transpose(-1, -2)
        ds = p * (dp - (dos * os).sum(-1, keepdim=True))
        grads.append([ds @ ks * softmax_scale, ds.transpose(-1, -2) @ qs * softmax_scale, p.transpose(-1, -2) @ dos])
    got = tuple(torch.cat([g[i] for g in grads], dim=1).transpose(0, 1) for i in range(3))
    if dq is None:
        return got
    for given, g in zip(outs, got):
        given.copy_(g)
    return outs
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A `flash_attn.cute` package on sys.path (a namespace `flash_attn`, as flash-attn-4 installs it);
    returns its call log."""
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    (cute / "interface.py").write_text(textwrap.dedent(STAND_IN_INTERFACE))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    yield importlib.import_module("flash_attn.cute").CALLS
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device of compute capability 9.0 with flash-attn-4 and triton importable, as the registry
    sees it; returns a setter for the capability."""
    capability = [(9, 0)]
    monkeypatch.setattr(attention, "_capability", lambda device: capability[0])
    for name in ("fa4", "triton"):
        b = attention._REGISTRY[name]
        monkeypatch.setitem(attention._REGISTRY, name, dataclasses.replace(b, missing=lambda: None))

    def set_capability(c):
        capability[0] = c

    return set_capability


def test_auto_takes_fa4_for_training_on_sm90(hopper):
    for n in (None, 201, 16389):
        assert resolve_attention("auto", CUDA, BF16, inference=False, head_dim=64, max_seqlen=n) == "fa4"
    assert resolve_attention("auto", CUDA, torch.float16, inference=False, head_dim=128) == "fa4"
    hopper((10, 0))
    assert resolve_attention("auto", CUDA, BF16, inference=False, head_dim=64) == "fa4"


def test_auto_inference_takes_fa4_from_the_threshold_on(hopper):
    def auto(n):
        return resolve_attention("auto", CUDA, BF16, inference=True, head_dim=64, max_seqlen=n)

    assert auto(201) == auto(2309) == auto(FA4_INFERENCE_MIN_SEQLEN - 1) == auto(None) == "triton"
    assert auto(FA4_INFERENCE_MIN_SEQLEN) == auto(16389) == "fa4"
    # An explicit request runs it at any length.
    assert resolve_attention("fa4", CUDA, BF16, inference=True, head_dim=64, max_seqlen=201) == "fa4"


def test_auto_skips_fa4_where_it_cannot_run(hopper):
    train = {"inference": False, "head_dim": 64}
    hopper((8, 0))
    assert resolve_attention("auto", CUDA, BF16, **train) in ("flash_attn", "varlen")
    with pytest.raises(ValueError, match=r"attn_backend: 'fa4' needs a GPU of compute capability >= 9\.0, got 8\.0"):
        resolve_attention("fa4", CUDA, BF16, **train)
    hopper((9, 0))
    assert resolve_attention("auto", CUDA, torch.float32, **train) == "sdpa"
    assert resolve_attention("auto", torch.device("cpu"), BF16, **train) == "sdpa"
    assert resolve_attention("auto", CUDA, BF16, 0.1, **train) in ("flash_attn", "sdpa")  # no dropout in fa4
    assert resolve_attention("auto", CUDA, BF16, inference=False, head_dim=12) in ("flash_attn", "varlen")
    with pytest.raises(ValueError, match="attn_backend: 'fa4' needs a head_dim that is a multiple of 8"):
        resolve_attention("fa4", CUDA, BF16, inference=False, head_dim=12)
    hopper(None)  # no CUDA at all
    with pytest.raises(ValueError, match=r"compute capability >= 9\.0, got no CUDA device"):
        resolve_attention("fa4", CUDA, BF16, **train)


def test_missing_package_is_a_clear_error(monkeypatch):
    """Without flash-attn-4 (this machine), auto never picks fa4 and asking for it names the extra."""
    monkeypatch.setattr(attention, "_capability", lambda device: (9, 0))
    assert attention._fa4_missing() is not None
    assert resolve_attention("auto", CUDA, BF16, inference=False, head_dim=64) != "fa4"
    assert resolve_attention("auto", CUDA, BF16, inference=True, head_dim=64, max_seqlen=16389) != "fa4"
    expected = r'attn_backend: .fa4. needs the flash-attn-4 package.*pip install "dinov3-packing\[hopper\]"'
    with pytest.raises(ValueError, match=expected):
        resolve_attention("fa4", CUDA, BF16, inference=False, head_dim=64)


def test_installed_package_is_found_and_is_not_flash_attn_2(stand_in, monkeypatch):
    """flash-attn-4 installs a namespace `flash_attn` holding only `cute`: fa4 is available, FlashAttention-2
    ("flash_attn") is still missing."""
    monkeypatch.setattr(attention, "_capability", lambda device: (9, 0))
    assert attention._fa4_missing() is None
    assert attention._REGISTRY["flash_attn"].missing() is not None
    assert resolve_attention("fa4", CUDA, BF16, inference=False, head_dim=64) == "fa4"


def test_model_passes_the_longest_segment_to_resolution(monkeypatch):
    seen = []
    real = attention.resolve_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_seqlen"))
        return real(*args, **kwargs)

    monkeypatch.setattr("dinov3_packing.model.modeling.resolve_attention", spy)
    model = random_packing_model(tiny_config(), seed=0).eval()
    hidden_states, grid = pack(random_images([(2, 3), (4, 5), (1, 1)], 16), 16)
    with torch.no_grad():
        out = model(hidden_states, grid)
    assert seen == [out.layout.max_seqlen] == [model.num_prefix_tokens + 20]


def test_ops_are_registered_with_autograd_and_fake():
    for name in ("fa4_varlen", "fa4_varlen_backward", "fa4_rope_varlen", "fa4_rope_varlen_backward"):
        assert hasattr(torch.ops.dinov3_packing, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dinov3_packing::{name}", "Meta")
    for name in ("fa4_varlen", "fa4_rope_varlen"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dinov3_packing::{name}", "Autograd")


def test_fake_gives_the_kernels_shapes():
    with FakeTensorMode():
        q, k, v = (torch.empty(300, 16, 64, dtype=BF16) for _ in range(3))
        cu = torch.tensor([0, 201, 300], dtype=torch.int32)
        out, lse = torch.ops.dinov3_packing.fa4_varlen(q, k, v, cu, 201)
        assert out.shape == (300, 16, 64) and out.dtype == BF16
        assert lse.shape == (16, 300) and lse.dtype == torch.float32
        grads = torch.ops.dinov3_packing.fa4_varlen_backward(out, q, k, v, out, lse, cu, 201)
        assert [g.shape for g in grads] == [q.shape] * 3
        qkv, cos = torch.empty(300, 3, 16, 64, dtype=BF16), torch.empty(300, 64, dtype=BF16)
        out, lse, qk = torch.ops.dinov3_packing.fa4_rope_varlen(qkv, cos, cos, cu, 201)
        assert out.shape == (300, 16, 64) and lse.shape == (16, 300) and qk.shape == (300, 2, 16, 64)
        dqkv, dbias = torch.ops.dinov3_packing.fa4_rope_varlen_backward(out, qkv, qk, out, lse, cos, cos, cu, 201)
        assert dqkv.shape == qkv.shape and dqkv.dtype == BF16 and dbias.numel() == 0
        bias = torch.empty(2, 16, 64, dtype=BF16)
        out, lse, qk = torch.ops.dinov3_packing.fa4_rope_varlen(qkv, cos, cos, cu, 201, bias)
        assert out.shape == (300, 16, 64) and qk.shape == (300, 2, 16, 64)
        backward = torch.ops.dinov3_packing.fa4_rope_varlen_backward
        dqkv, dbias = backward(out, qkv, qk, out, lse, cos, cos, cu, 201, bias)
        assert dqkv.shape == qkv.shape and dbias.shape == (2, 16, 64) and dbias.dtype == BF16
        # the bias's gradient comes back in the bias's dtype (an fp32 bias beside a bf16 projection: autocast)
        dqkv, dbias = backward(out, qkv, qk, out, lse, cos, cos, cu, 201, bias.float())
        assert dqkv.dtype == BF16 and dbias.dtype == torch.float32


def _qkv(layout, heads=4, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.num_tokens, heads, head_dim, generator=g, requires_grad=True) for _ in range(3)]


def test_forward_and_backward_match_sdpa(stand_in):
    layout = PackedLayout.build([(1, 2, 3), (2, 1, 1), (1, 4, 4)], 5, "cpu")
    grad_out = torch.randn(layout.num_tokens, 4, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("fa4", "sdpa"):
        q, k, v = _qkv(layout)
        out = packed_attention(q, k, v, layout, backend)
        out.backward(grad_out)
        results[backend] = (out.detach(), q.grad, k.grad, v.grad)
    assert stand_in == ["forward", "backward"]
    for got, want in zip(results["fa4"], results["sdpa"], strict=True):
        assert_close(got, want)


def _rope_tables(layout, head_dim=8, seed=3):
    """Tables of RoPE's shape and sign convention: cos and sin of angles whose halves repeat, sin signed
    `cat(-sin_1, sin_2)`, the prefix-free rows of a real model (any angles test the rotation)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(layout.num_tokens, head_dim // 2, generator=g).mul(6.3).repeat(1, 2)
    sin = angles.sin()
    return angles.cos(), torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], dim=1)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rope_op_equals_rope_then_attention(stand_in, monkeypatch, direct, with_bias):
    """`fa4_rope_attention` (RoPE inside the op, its inverse inside the backward) gives the output and the
    fused q/k/v gradient of `apply_rope` then the unfused fa4 op under autograd (the same kernel, so what is
    compared is the rotation and the assembly of the gradient), whether the backward kernel writes into the
    gradient's planes (`DIRECT_GRADS`) or allocates its own; `with_bias`: a q/k bias given to the op (added
    before the rotation, its gradient summed in the backward's un-rotating pass) against the same bias added
    before `apply_rope`."""
    from dinov3_packing.ops import fa4
    from dinov3_packing.ops.attention import apply_rope
    from dinov3_packing.ops.fa4 import fa4_rope_attention

    monkeypatch.setattr(fa4, "DIRECT_GRADS", direct)
    layout = PackedLayout.build([(1, 2, 3), (2, 1, 1), (1, 4, 4)], 5, "cpu")
    cos, sin = _rope_tables(layout)
    g = torch.Generator().manual_seed(4)
    qkv0 = torch.randn(layout.num_tokens, 3, 4, 8, generator=g) * 3
    bias0 = torch.randn(2, 4, 8, generator=g) * 0.5
    grad_out = torch.randn(layout.num_tokens, 4, 8, generator=g)
    results = {}
    for name in ("fused", "unfused"):
        qkv = qkv0.clone().requires_grad_(True)
        bias = bias0.clone().requires_grad_(True) if with_bias else None
        if name == "fused":
            out = fa4_rope_attention(qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen, bias)
        else:
            qk = apply_rope(qkv[:, :2] if bias is None else qkv[:, :2] + bias, cos, sin)
            out = packed_attention(qk[:, 0], qk[:, 1], qkv[:, 2], layout, "fa4")
        out.backward(grad_out)
        results[name] = (out.detach(), qkv.grad) + ((bias.grad,) if with_bias else ())
    assert stand_in == ["forward", "backward into given tensors" if direct else "backward", "forward", "backward"]
    for got, want in zip(results["fused"], results["unfused"], strict=True):
        assert_close(got, want)
    # The gradient is not trivially equal: v's plane, q's and k's all carry attention's gradient.
    assert all(results["fused"][1][:, p].abs().max() > 1e-3 for p in range(3))
    if with_bias:  # the bias's gradient is the sum over the tokens of q's and k's planes
        assert_close(results["fused"][2], results["fused"][1][:, :2].sum(0))
        assert results["fused"][2].abs().max() > 1e-3


def test_rope_op_refuses_gradients_for_the_tables(stand_in):
    from dinov3_packing.ops.fa4 import fa4_rope_attention

    layout = PackedLayout.build([(1, 2, 3)], 5, "cpu")
    cos, sin = _rope_tables(layout)
    qkv = torch.randn(layout.num_tokens, 3, 4, 8, requires_grad=True)
    out = fa4_rope_attention(qkv, cos, sin.requires_grad_(True), layout.cu_seqlens, layout.max_seqlen)
    with pytest.raises(RuntimeError, match="no gradient for the RoPE tables"):
        out.sum().backward()


def test_opcheck_rope_op(stand_in):
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 3)], 5, "cpu")
    cos, sin = _rope_tables(layout)
    qkv = torch.randn(layout.num_tokens, 3, 4, 8, requires_grad=True)
    op = torch.ops.dinov3_packing.fa4_rope_varlen.default
    torch.library.opcheck(op, (qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen))
    bias = torch.randn(2, 4, 8, requires_grad=True)
    torch.library.opcheck(op, (qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen, bias))


def test_opcheck(stand_in):
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 3)], 5, "cpu")
    q, k, v = _qkv(layout)
    torch.library.opcheck(torch.ops.dinov3_packing.fa4_varlen.default, (q, k, v, layout.cu_seqlens, layout.max_seqlen))


def _fa4_and_sdpa_gradients(monkeypatch, config: dict, prepare=lambda model: None) -> tuple[dict, list, object]:
    """One training step of the same random model (`tiny_config(**config)`, no RoPE augmentation: it draws from the
    global RNG) on the fa4 op and on "sdpa", q and k weights scaled up so attention is far from uniform and its
    gradient matters, and biases of a size that matters too; `prepare(model)` before each. Returns each backend's
    parameter gradients, the `qk_bias` every block handed to `attend` (fa4's blocks first), and the fa4 model."""
    from dinov3_packing.model import layers

    qk_biases = []
    attend = layers.attend
    monkeypatch.setattr(layers, "attend", lambda *a, **k: qk_biases.append(k.get("qk_bias")) or attend(*a, **k))
    hidden_states, grid = pack(random_images([(2, 3), (1, 1), (2, 2, 1), (3, 3)], 16, seed=2), 16)
    grads, models = {}, {}
    for backend in ("fa4", "sdpa"):
        model = random_packing_model(tiny_config(pos_embed_rescale=None, **config), seed=0).train()
        with torch.no_grad():
            for layer in model.model.layer:
                layer.attention.q_proj.weight.mul_(10)
                layer.attention.k_proj.weight.mul_(10)
                for proj in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
                    if proj.bias is not None:
                        proj.bias.mul_(20)
        prepare(model)
        model.resolved_attn_backend = lambda inference=True, max_seqlen=None, b=backend: b
        out = model(hidden_states, grid)
        (out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        models[backend] = model
    assert grads["fa4"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 15
    for name, want in grads["sdpa"].items():
        assert_close(grads["fa4"][name], want)
    return grads, qk_biases, models["fa4"]


@pytest.mark.parametrize(
    ("fused_rope", "fold_qkv_bias"), [(True, True), (True, False), (False, True)], ids=["fused", "no-fold", "outside"]
)
def test_model_gradients_through_fa4_match_sdpa(stand_in, monkeypatch, fused_rope, fold_qkv_bias):
    """A whole model's training step with every block's attention on the fa4 op equals the sdpa one, with
    RoPE inside the op (`fused_rope`, the default) and outside it, and inside it with the q/k/v biases moved (q's
    into the op, v's into the output projection's bias: `fold_qkv_bias`, the default) and not. The biases moved
    exactly where RoPE ran in the op (the q/k bias handed to `attend`)."""

    def prepare(model):
        model.fused_rope = fused_rope
        model.fold_qkv_bias = fold_qkv_bias

    _, qk_biases, model = _fa4_and_sdpa_gradients(monkeypatch, {}, prepare)
    moved = fused_rope and fold_qkv_bias
    layer_count = model.config.num_hidden_layers
    assert [b is not None for b in qk_biases] == [moved] * layer_count + [False] * layer_count
    if moved:  # q's bias and k's zeros (the config has no k bias)
        q_bias = model.model.layer[-1].attention.q_proj.bias
        assert qk_biases[layer_count - 1].shape == (2, 4, 8) and not qk_biases[layer_count - 1][1].any()
        assert torch.equal(qk_biases[layer_count - 1][0].flatten(), q_bias.detach())
    calls = "backward into given tensors" if fused_rope else "backward"
    assert stand_in.count(calls) == len(stand_in) - stand_in.count("forward") == model.config.num_hidden_layers


def _hook_o_proj(model):
    for layer in model.model.layer:
        layer.attention.o_proj.register_forward_hook(lambda module, args, output: output)


@pytest.mark.parametrize(
    ("config", "prepare", "qk_moved"),
    [
        ({"query_bias": False}, None, False),  # v's bias alone: moved into the output projection, no q/k bias
        ({"value_bias": False, "key_bias": True}, None, True),  # q's and k's alone
        ({"proj_bias": False}, None, True),  # v's bias becomes the output projection's only bias
        ({"query_bias": False, "value_bias": False}, None, False),  # nothing to move
        ({}, _hook_o_proj, False),  # a hooked output projection cannot take v's bias: nothing moves
        ({"value_bias": False}, _hook_o_proj, True),  # ... but with no v bias q's still moves, the hook runs
        ({}, lambda model: apply_recompute(model, "attention"), True),  # inside the recomputed attention
    ],
    ids=["v-only", "qk-only", "no-o-bias", "no-bias", "hooked-o", "hooked-o-no-v", "recompute-attention"],
)
def test_moved_biases_match_sdpa_for_every_bias_layout(stand_in, monkeypatch, config, prepare, qk_moved):
    """`fold_qkv_bias` over the configs' other bias layouts, a hooked output projection and the "attention"
    recompute policy: the fa4 step's gradients equal the sdpa step's (1e-5), and a q/k bias reaches the op exactly
    where one is moved (with the policy, in the forward and again in the recomputation)."""
    _, qk_biases, model = _fa4_and_sdpa_gradients(monkeypatch, config, prepare or (lambda model: None))
    layer_count = model.config.num_hidden_layers
    runs = 2 if model.recompute_policy == "attention" else 1  # the recomputation hands it over again
    fa4_calls = qk_biases[: layer_count * runs]
    assert [b is not None for b in fa4_calls] == [qk_moved] * layer_count * runs
    assert all(b is None for b in qk_biases[layer_count * runs :])


@pytest.mark.parametrize("rope", [False, True], ids=["fa4_varlen", "fa4_rope_varlen"])
def test_compiles_to_one_opaque_call_without_recompiling(rope):
    """Under FakeTensorMode (no kernel runs, no package needed): the forward graph holds the fa4 op (or the
    op with RoPE inside) once and nothing of the kernel, the backward graph its backward op once, and packs
    of other sizes and longest segments compile nothing after the second (which makes max_seqlen
    symbolic)."""
    from dinov3_packing.ops.fa4 import fa4_rope_attention

    torch._dynamo.reset()  # Dynamo remembers which arguments turned dynamic per code object, `step`'s included
    graphs = {"dynamo": [], "forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def step(q, k, v, cu, n):
        if rope:  # q, k, v stand for the fused projection's planes and the two RoPE tables here
            qkv = torch.stack([q, k, v], dim=1)
            return fa4_rope_attention(qkv, q[:, 0].detach(), k[:, 0].detach(), cu, n).sum()
        return fa4_varlen_attention(q, k, v, cu, n).sum()

    fn = torch.compile(step, backend=backend, fullgraph=True)
    counts = []
    with FakeTensorMode():
        for grid in ([(1, 2, 3), (1, 4, 4)], [(1, 4, 5), (1, 1, 1), (1, 2, 2)], [(1, 6, 5)], [(3, 2, 2), (1, 7, 7)]):
            layout = PackedLayout.build(grid, 5, "cpu")
            q, k, v = (torch.empty(layout.num_tokens, 4, 8, requires_grad=True) for _ in range(3))
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(layout.cu_seqlens, 0)
            fn(q, k, v, layout.cu_seqlens, layout.max_seqlen).backward()
            assert q.grad.shape == q.shape
            counts.append(len(graphs["dynamo"]))
    assert counts[1:] == [2, 2, 2]  # the first two packs have other longest segments; nothing after

    def calls(gm):
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "dinov3_packing" in str(n.target)]

    op = "fa4_rope_varlen" if rope else "fa4_varlen"
    assert calls(graphs["forward"][-1]) == [f"dinov3_packing.{op}.default"]
    assert calls(graphs["backward"][-1]) == [f"dinov3_packing.{op}_backward.default"]


def _real_fa4_on_hopper() -> bool:
    return (
        torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and attention._fa4_missing() is None
    )


@pytest.mark.skipif(not _real_fa4_on_hopper(), reason="GPU check: needs flash-attn-4 on an SM90+ GPU (the device)")
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_rope_op_matches_the_unfused_path(monkeypatch, direct, with_bias):
    """The real kernels, bf16, ViT-L heads, mixed segment lengths: the fused op's output and q/k/v gradient
    against RoPE + the unfused op, both measured against the fp32 "sdpa" path of the same inputs. The fused
    path may differ from the unfused one by the rounding of the rotation (fp32, rounded once in both, FMA
    contraction aside), so against fp32 its largest error must stay within 1.05x the unfused path's plus 1e-4
    of the reference's scale, and its relative L2 error within 1.05x the unfused path's plus 1e-5. (Single
    rows are not compared: with q and k this large, one ulp of a rotated q moves a sharp softmax row, and on
    the H200 the worst row's cosine against fp32 was 0.99810 fused and 0.99836 unfused, the two bf16 outputs'
    lowest row cosine with each other 0.9983, while their largest errors were 0.184 and 0.181 and their
    relative L2 errors 0.0097 and 0.0114, gradients 0.0121 and 0.0142: the fused path rounds less.) `with_bias`:
    a q/k bias handed to the op (added in its RoPE pass, its gradient summed in the backward's) against the same
    bias added before RoPE, its gradient held to the same bounds."""
    from dinov3_packing.ops import fa4
    from dinov3_packing.ops.attention import apply_rope
    from dinov3_packing.ops.fa4 import fa4_rope_attention

    monkeypatch.setattr(fa4, "DIRECT_GRADS", direct)
    layout = PackedLayout.build([(1, 14, 14), (1, 32, 20), (1, 7, 9), (1, 48, 48)], 5, CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    n, heads, d = layout.num_tokens, 16, 64
    angles = torch.rand(n, d // 2, generator=g, device=CUDA).mul(6.3).repeat(1, 2)
    sin = angles.sin()
    cos32, sin32 = angles.cos(), torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=1)
    qkv0 = torch.randn(n, 3, heads, d, generator=g, device=CUDA) * 2
    grad_out = torch.randn(n, heads, d, generator=g, device=CUDA)
    bias0 = torch.randn(2, heads, d, generator=g, device=CUDA) * 0.5
    results = {}
    for name, dtype in (("fused", BF16), ("unfused", BF16), ("fp32", torch.float32)):
        qkv = qkv0.to(dtype).requires_grad_(True)
        bias = bias0.to(dtype).requires_grad_(True) if with_bias else None
        cos, sin = cos32.to(dtype), sin32.to(dtype)
        if name == "fused":
            out = fa4_rope_attention(qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen, bias)
        else:
            qk = apply_rope(qkv[:, :2] if bias is None else qkv[:, :2] + bias, cos, sin)
            out = packed_attention(qk[:, 0], qk[:, 1], qkv[:, 2], layout, "fa4" if dtype == BF16 else "sdpa")
        out.backward(grad_out.to(dtype))
        results[name] = [out.detach().float(), qkv.grad.float()] + ([bias.grad.float()] if with_bias else [])
    ref = results["fp32"]
    for i, what in enumerate(("output", "q/k/v gradient", "q/k bias gradient")[: len(ref)]):
        fused, unfused = results["fused"][i], results["unfused"][i]
        scale = ref[i].abs().max()
        err_fused, err_unfused = ((t - ref[i]).abs().max().item() for t in (fused, unfused))
        l2_fused, l2_unfused = (
            (torch.linalg.vector_norm(t - ref[i]) / torch.linalg.vector_norm(ref[i])).item() for t in (fused, unfused)
        )
        print(what, "max error vs fp32", err_fused, err_unfused, "relative L2 error vs fp32", l2_fused, l2_unfused)
        assert err_fused <= 1.05 * err_unfused + 1e-4 * scale, (what, err_fused, err_unfused)
        assert l2_fused <= 1.05 * l2_unfused + 1e-5, (what, l2_fused, l2_unfused)


def _vit_l_pack(seed: int):
    """A mixed pack with ViT-L heads on the GPU: layout, RoPE tables (bf16), q/k/v (bf16) and an output gradient."""
    layout = PackedLayout.build([(1, 14, 14), (1, 32, 20), (1, 7, 9), (1, 48, 48), (1, 3, 5)], 5, CUDA)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    n, heads, d = layout.num_tokens, 16, 64
    angles = torch.rand(n, d // 2, generator=g, device=CUDA).mul(6.3).repeat(1, 2)
    sin = angles.sin()
    cos, sin = angles.cos().to(BF16), torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=1).to(BF16)
    qkv = (torch.randn(n, 3, heads, d, generator=g, device=CUDA) * 2).to(BF16)
    grad_out = torch.randn(n, heads, d, generator=g, device=CUDA).to(BF16)
    return layout, cos, sin, qkv, grad_out


@pytest.mark.skipif(not _real_fa4_on_hopper(), reason="GPU check: needs flash-attn-4 on an SM90+ GPU (the device)")
def test_gpu_dq_accumulator_conversion_is_flash_attn_4s_postprocess():
    """The real backward on a mixed pack (segments of 20 to 2,309 rows, ViT-L heads): the dQ accumulator is taken
    where flash-attn-4's postprocess would run (if this flash-attn-4 has another configuration or postprocess, the
    capture fails here and the fused path is off), and `fa4_dq`'s conversion of it without the rotation equals
    the postprocess's output bit for bit."""
    from dinov3_packing.ops.fa4 import _backward_kernel, _forward
    from dinov3_packing.ops.triton import fa4_dq

    layout, _, _, qkv, grad_out = _vit_l_pack(0)
    q, k, v = qkv.unbind(1)
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    out, lse = _forward(q, k, v, cu, longest)
    grads = torch.empty_like(qkv)
    with fa4_dq.capture_dq_accum(grads[:, 0]) as captured:
        _backward_kernel(grad_out, q, k, v, out, lse, cu, longest, dq=grads[:, 0], dk=grads[:, 1], dv=grads[:, 2])
    assert captured.accum is not None, "flash-attn-4's dQ postprocess was not taken: another version or config?"
    ours = torch.empty_like(qkv)[:, 0]
    theirs = torch.empty_like(qkv)[:, 0]
    fa4_dq.dq_rope_from_accum(captured.accum, ours, cu, captured.scale)
    captured.run_postprocess(theirs)
    print("dq from the accumulator: max |dq|", theirs.abs().max().item())
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not _real_fa4_on_hopper(), reason="GPU check: needs flash-attn-4 on an SM90+ GPU (the device)")
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_fused_dq_rotation_against_the_postprocess_and_rope_pass(monkeypatch, with_bias):
    """The RoPE op's backward with dq un-rotated in the accumulator's conversion (`FUSED_DQ_ROPE`) against
    flash-attn-4's postprocess then the RoPE pass, and the fused path was taken. The k and v planes are equal bit
    for bit (the same kernels; flash-attn-4 computes dK and dV without atomics). The q
    plane is rounded once instead of twice, from an accumulator that flash-attn-4 adds to atomically (its order,
    so its last bits, differ between two calls): relative L2 difference within 2**-8, none larger than 2**-6 of the
    largest |dq|; the q/k bias gradient's relative L2 difference within 2**-8 (the k plane's sums in a launch
    of their own). (The accuracy of both against fp32 is
    `test_gpu_rope_op_matches_the_unfused_path`'s.)"""
    from dinov3_packing.ops import fa4

    layout, cos, sin, qkv0, grad_out = _vit_l_pack(1)
    bias0 = torch.randn(2, 16, 64, device=CUDA).to(BF16) if with_bias else None
    conversions = []  # per conversion, whether it rotated (the first of a process checks the layout without)
    convert = fa4.fa4_dq.dq_rope_from_accum

    def counted(*args, **kwargs):
        conversions.append(len(args) > 4 and args[4] is not None)
        return convert(*args, **kwargs)

    monkeypatch.setattr(fa4.fa4_dq, "dq_rope_from_accum", counted)
    results = {}
    for fused in (True, False):
        conversions.clear()
        monkeypatch.setattr(fa4, "FUSED_DQ_ROPE", fused)
        qkv = qkv0.clone().requires_grad_(True)
        bias = bias0.clone().requires_grad_(True) if with_bias else None
        fa4.fa4_rope_attention(qkv, cos, sin, layout.cu_seqlens, layout.max_seqlen, bias).backward(grad_out)
        results[fused] = (qkv.grad, bias.grad if with_bias else None)
        # the fused call converted with the tables (the rotation), once; the other never
        assert fa4._DQ_LAYOUT_CHECKED.get(qkv.device) is True
        assert conversions.count(True) == (1 if fused else 0) and len(conversions) <= 2 * fused, conversions

    def rel_l2(a, b):
        return (torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float())).item()

    (fused, fused_bias), (plain, plain_bias) = results[True], results[False]
    assert torch.equal(fused[:, 1:], plain[:, 1:])
    dq, ref = fused[:, 0].float(), plain[:, 0].float()
    print("q plane: relative L2", rel_l2(dq, ref), "elements that differ", (dq != ref).float().mean().item())
    assert rel_l2(dq, ref) <= 2.0**-8
    assert (dq - ref).abs().max() <= 2.0**-6 * ref.abs().max()
    if with_bias:
        print("q, k bias gradients: relative L2", [rel_l2(fused_bias[i], plain_bias[i]) for i in (0, 1)])
        assert rel_l2(fused_bias, plain_bias) <= 2.0**-8
