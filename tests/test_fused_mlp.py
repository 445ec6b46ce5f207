"""`fused_mlp`: the block stack through `ops.triton.linear_gelu` instead of the HF MLP module.

On the CPU `linear_gelu` runs its fallback, `F.gelu(F.linear(...))`: the same ops as the HF MLP, so the
stack must give bit-identical output; that checks the wiring (which weights, which input, where the down
projection goes). Training goes through the custom op and its registered backward, forced onto the CPU with a
torch-ops launcher: the same ATen kernels as autograd through the HF MLP, so output and every parameter's
gradient must be bit-identical too. The kernel itself is checked in test_linear_gelu.py and on the GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dinov3_packing.model.modeling import DINOv3ViTPackingModel
from dinov3_packing.ops.mlp import fused_mlp_runs
from dinov3_packing.ops.triton import linear_gelu as lg
from dinov3_packing.ops.triton.linear_gelu import linear_gelu
from dinov3_packing.packing import PackedLayout


def _batch(model, layout, fused_mlp: bool):
    """The model's batch for `layout` with the fused MLP forced on or off (the CPU gate would say off)."""
    return dataclasses.replace(model.packed_batch(layout), fused_mlp=fused_mlp)


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The weight shapes `ops.mlp.linear_gelu` (the fused path) is called with, in order."""
    from dinov3_packing.ops import mlp as modeling

    calls = []

    def counting_linear_gelu(x, weight, bias):
        calls.append(weight.shape)
        return linear_gelu(x, weight, bias)

    monkeypatch.setattr(modeling, "linear_gelu", counting_linear_gelu)
    return calls


def test_stack_with_fused_mlp_equals_the_module_path(tiny, fused_calls):
    calls = fused_calls
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=3)).eval()
    layout = PackedLayout.build([(1, 2, 3), (1, 1, 1), (1, 4, 2)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    with torch.no_grad():
        plain, _ = model.model(x, _batch(model, layout, False))
        assert calls == []
        fused, _ = model.model(x, _batch(model, layout, True))
    # One fused call per block, on the up-projection's weight.
    up = (model.config.intermediate_size, model.config.hidden_size)
    assert calls == [up] * 3
    assert torch.equal(fused, plain)


def test_model_runs_with_fused_mlp_set_on_cpu(tiny):
    # On the CPU the fused kernel does not apply; the flag must not change the result or fail.
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(), fused_mlp=True).eval()
    grid = torch.tensor([[1, 2, 2], [1, 1, 3]])
    hs = torch.randn(7, model.patch_dim)
    with torch.no_grad():
        a = model(hs, grid).last_hidden_state
        model.fused_mlp = False
        b = model(hs, grid).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize(("overrides", "match"), [({"use_gated_mlp": True}, "gated"), ({"hidden_act": "silu"}, "silu")])
def test_fused_mlp_refuses_other_mlps(tiny, overrides, match):
    with pytest.raises(ValueError, match=f"fused_mlp: .*{match}"):
        DINOv3ViTPackingModel(tiny(**overrides), fused_mlp=True)
    model = DINOv3ViTPackingModel(tiny(**overrides))
    with pytest.raises(ValueError, match=f"fused_mlp: .*{match}"):
        model.fused_mlp = True
    assert model.fused_mlp is False


def test_fused_mlp_must_be_a_bool(tiny):
    with pytest.raises(TypeError, match="fused_mlp: expected a bool or None"):
        DINOv3ViTPackingModel(tiny(), fused_mlp="no")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({}, True), ({"use_gated_mlp": True}, False), ({"hidden_act": "silu"}, False)],
)
def test_fused_mlp_defaults_to_where_the_kernel_applies(tiny, overrides, expected):
    model = DINOv3ViTPackingModel(tiny(**overrides))
    assert model.fused_mlp is expected
    model.fused_mlp = False
    assert model.fused_mlp is False
    model.fused_mlp = None  # back to auto
    assert model.fused_mlp is expected


class _Wrapped(torch.nn.Linear):
    """Stands for an adapter-wrapped projection (LoRA, quantized): a different module type."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "attach", ["none", "mlp_hook", "up_pre_hook", "act_hook", "wrapped_up", "global_hook", "forward_replaced"]
)
def test_fused_path_never_bypasses_what_is_attached_to_the_mlp(tiny, fused_calls, attach):
    calls, fired = fused_calls, []
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=2)).eval()
    mlp = model.model.layer[0].mlp
    handle = None
    if attach == "mlp_hook":
        handle = mlp.register_forward_hook(lambda m, i, o: fired.append(1))
    elif attach == "up_pre_hook":
        handle = mlp.up_proj.register_forward_pre_hook(lambda m, i: fired.append(1))
    elif attach == "act_hook":
        handle = mlp.act_fn.register_forward_hook(lambda m, i, o: fired.append(1))
    elif attach == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: fired.append(1))
    elif attach == "wrapped_up":
        wrapped = _Wrapped(mlp.up_proj.in_features, mlp.up_proj.out_features)
        wrapped.load_state_dict(mlp.up_proj.state_dict())
        mlp.up_proj = wrapped
    elif attach == "forward_replaced":  # a user's wrapper
        original = mlp.forward
        mlp.forward = lambda x: fired.append(1) or original(x)
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    try:
        with torch.no_grad():
            plain, _ = model.model(x, _batch(model, layout, False))
            fired.clear()
            fused, _ = model.model(x, _batch(model, layout, True))
    finally:
        if handle is not None:
            handle.remove()
    if attach == "global_hook":
        assert calls == [] and fired  # a global hook sees every module: no block fuses
    elif attach == "none":
        assert len(calls) == 2 and not fired
    else:
        # Block 0 keeps its module (the hook fires, the wrapper runs); block 1 still fuses.
        assert len(calls) == 1
        assert bool(fired) == (attach != "wrapped_up")
    assert torch.equal(fused, plain)


def test_recomputed_mlp_keeps_the_fused_path_and_recomputes_it(tiny, fused_calls):
    """`apply_recompute(model, "mlp")` runs each block's MLP under checkpoint through `feed_forward`: the
    fused path stays (one call per block in forward) and backward runs it again (one more per block).
    Compiled, and after another model was compiled: test_recompute_compile.py."""
    from dinov3_packing.parallel.recompute import apply_recompute

    torch.manual_seed(0)
    model = apply_recompute(DINOv3ViTPackingModel(tiny(num_hidden_layers=2)), "mlp")
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    out, _ = model.model(x, dataclasses.replace(model.packed_batch(layout, inference=False), fused_mlp=True))
    assert len(fused_calls) == 2
    out.square().mean().backward()
    assert len(fused_calls) == 4


def test_fused_path_traces_as_one_graph(tiny, fused_calls):
    """`compile_model` compiles the stack with fullgraph=True: the fused path's checks (module types, hooks)
    must trace without a graph break, on the CPU as on the GPU."""
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=2)).eval()
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    compiled = torch.compile(model.model.forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, _ = model.model(x, _batch(model, layout, True))
        traced, _ = compiled(x, _batch(model, layout, True))
    assert len(fused_calls) >= 3  # two from the eager call, then the traced call took the fused path too
    assert torch.equal(traced, eager)


@pytest.mark.parametrize(
    ("enabled", "device", "dtype", "expected"),
    [
        (True, "cuda", torch.bfloat16, True),
        (True, "cuda", torch.float16, True),
        (True, "cuda", torch.float32, False),
        (True, "cpu", torch.bfloat16, False),
        (False, "cuda", torch.bfloat16, False),
    ],
)
def test_fused_mlp_gate_is_device_and_dtype_only(enabled, device, dtype, expected):
    """The kernel has a backward, so training takes it as inference does: the gate has no grad-mode input."""
    assert fused_mlp_runs(enabled, torch.device(device), dtype) is expected


def test_training_through_the_fused_op_equals_the_module_path(tiny, fused_calls, monkeypatch):
    launches = []

    def torch_launch(x, w, b, config=None, *, pre_out=None):
        launches.append(pre_out is not None)
        pre = torch.nn.functional.linear(x, w, b)
        if pre_out is not None:
            pre_out.copy_(pre)
        return torch.nn.functional.gelu(pre)

    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(lg, "launch_linear_gelu", torch_launch)
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=2)).train()
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    # One batch for both paths: in training mode each batch draws its own RoPE augmentation.
    batch = model.packed_batch(layout, inference=False)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        out, _ = model.model(x, dataclasses.replace(batch, fused_mlp=fused))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert len(fused_calls) == 2 and launches == [True, True]  # both blocks fused, each kept its pre-activation
    assert torch.equal(fused, plain)
    assert fused_grads.keys() == plain_grads.keys()
    assert any("up_proj" in n for n in fused_grads)
    for name, grad in plain_grads.items():
        assert torch.equal(fused_grads[name], grad), name
