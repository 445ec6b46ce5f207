"""`fused_mlp`: the block stack through `ops.triton.linear_gelu` instead of the HF MLP module.

On the CPU `linear_gelu` runs its fallback, `F.gelu(F.linear(...))`: the same ops as the HF MLP, so the
stack must give bit-identical output; that checks the wiring (which weights, which input, where the down
projection goes). Training goes through the custom op and its registered backward, forced onto the CPU with a
torch-ops launcher: the same ATen kernels as autograd through the HF MLP, so output and every parameter's
gradient must be bit-identical too. The kernel itself is checked in test_linear_gelu.py and on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, capturing_aot_backend

from dinov3_packing.model.modeling import DINOv3ViTPackingModel
from dinov3_packing.ops.mlp import MLP_GEMMS, fused_mlp_runs, gelu_mlp, resolve_mlp_gemms
from dinov3_packing.ops.quack import quack_gemms_available
from dinov3_packing.ops.triton import linear_gelu as lg
from dinov3_packing.ops.triton.linear_gelu import linear_gelu
from dinov3_packing.packing import PackedLayout


def _batch(model, layout, fused_mlp: bool):
    """The model's batch for `layout` with the fused MLP forced on or off (the CPU gate would say off)."""
    return dataclasses.replace(model.packed_batch(layout), fused_mlp=fused_mlp)


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The up-projection weight shapes the fused paths are called with, in order: `ops.mlp.linear_gelu` (the
    kernel, then the down-projection module) and `ops.mlp.gelu_mlp` (the whole MLP as one op, when autograd
    records); `fused_calls.ops` names which of the two each call took ("linear_gelu" / "gelu_mlp"), and
    `fused_calls.gemms` the `gemms` argument of each `gelu_mlp` call."""
    from dinov3_packing.ops import mlp as modeling

    calls = _Calls()
    gelu_mlp = modeling.gelu_mlp

    def counting_linear_gelu(x, weight, bias):
        calls.add("linear_gelu", weight.shape)
        return linear_gelu(x, weight, bias)

    def counting_gelu_mlp(x, up_weight, up_bias, down_weight, down_bias, gemms, recompute_gelu=False):
        calls.add("gelu_mlp", up_weight.shape)
        calls.gemms.append(gemms)
        calls.recompute_gelu.append(recompute_gelu)
        return gelu_mlp(x, up_weight, up_bias, down_weight, down_bias, gemms, recompute_gelu)

    monkeypatch.setattr(modeling, "linear_gelu", counting_linear_gelu)
    monkeypatch.setattr(modeling, "gelu_mlp", counting_gelu_mlp)
    return calls


class _Calls(list):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.gemms = []
        self.recompute_gelu = []

    def add(self, op: str, shape) -> None:
        self.ops.append(op)
        self.append(shape)


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
    assert fused_calls.ops == ["gelu_mlp"] * 2
    out.square().mean().backward()
    assert fused_calls.ops == ["gelu_mlp"] * 4


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


@pytest.mark.parametrize(
    ("gemms", "deriv"),
    [(g, False) for g in MLP_GEMMS] + [("triton-dgelu", True)],
    ids=[*MLP_GEMMS, "triton-dgelu-forced"],
)
def test_training_through_the_fused_op_equals_the_module_path(tiny, fused_calls, monkeypatch, gemms, deriv):
    """Every GEMM choice of the training op (on the CPU: the Triton launcher replaced by the torch ops, quack's
    ops on their torch fallback) gives the module path's output and gradients bit for bit. "triton-dgelu-forced": the
    "triton-dgelu" path as it runs where both its kernels do (`dgelu_path_runs` forced), which keeps the GELU's
    derivative and multiplies by it in the backward (`dgelu_grad`'s fallback): in fp32 that product is ATen's
    `gelu_backward` bit for bit, so the wiring is checked exactly here too."""
    if deriv:
        monkeypatch.setattr(lg, "dgelu_path_runs", lambda *a: True)
    launches = []

    def torch_launch(x, w, b, config=None, *, pre_out=None, deriv=False):
        launches.append((pre_out is not None, deriv))
        return _torch_launch(x, w, b, pre_out, deriv)

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
        # LayerScale unfolded on both paths (the fused op would fold it: test_training_op_folds_layer_scale).
        out, _ = model.model(x, dataclasses.replace(batch, fused_mlp=fused, mlp_gemms=gemms, fold_layer_scale=False))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = results
    # Both blocks took the training op with the batch's GEMMs; the Triton up-projection kept its pre-activation
    # (on the CPU, "triton-dgelu" is "triton": the backward's TMA kernel cannot run, `dgelu_path_runs`).
    assert fused_calls.ops == ["gelu_mlp"] * 2 and fused_calls.gemms == [gemms] * 2
    assert launches == ([(True, deriv)] * 2 if gemms.startswith("triton") else [])
    assert torch.equal(fused, plain)
    assert fused_grads.keys() == plain_grads.keys()
    assert any("up_proj" in n for n in fused_grads)
    for name, grad in plain_grads.items():
        assert torch.equal(fused_grads[name], grad), name


@pytest.mark.parametrize(
    ("target", "hook"),
    [
        ("down_proj", "forward"),
        ("mlp", "backward"),
        ("up_proj", "backward"),
        ("act_fn", "backward"),
        ("down_proj", "backward"),
    ],
)
def test_training_keeps_the_modules_a_hook_is_on(tiny, fused_calls, monkeypatch, target, hook):
    """The training op computes the MLP's modules' outputs itself (the down-projection's product included), so a
    forward hook on the down-projection, or a full backward hook on the MLP or any of its modules (which would
    never fire), keeps block 0 on its modules: for the down-projection the up-projection kernel followed by the
    module, otherwise the whole MLP. The hook fires once, and output and gradients are the module path's bit for
    bit."""
    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(
        lg, "launch_linear_gelu", lambda x, w, b, *, pre_out=None, deriv=False: _torch_launch(x, w, b, pre_out, deriv)
    )
    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=2)).train()
    mlp = model.model.layer[0].mlp
    module = mlp if target == "mlp" else getattr(mlp, target)
    fired = []
    register = module.register_forward_hook if hook == "forward" else module.register_full_backward_hook
    handle = register(lambda *_: fired.append(1))
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, model.config.hidden_size)
    batch = model.packed_batch(layout, inference=False)
    results = []
    try:
        for fused in (False, True):
            model.zero_grad(set_to_none=True)
            out, _ = model.model(x, dataclasses.replace(batch, fused_mlp=fused, fold_layer_scale=False))
            out.square().mean().backward()
            results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    finally:
        handle.remove()
    assert fused_calls.ops == (["linear_gelu", "gelu_mlp"] if target == "down_proj" else ["gelu_mlp"])
    assert fired == [1, 1]
    (plain, plain_grads), (fused, fused_grads) = results
    assert torch.equal(fused, plain)
    assert len(fused_grads) == len(plain_grads)
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, plain_grads, strict=True))


def _saved_bytes(fn, exclude: set):
    """``(bytes, fn())``: the bytes of the storages autograd saves for backward while `fn` runs, each storage once,
    those whose data pointers are in `exclude` (parameters, leaves) left out."""
    storages = {}

    def pack_hook(t):
        if t.untyped_storage().data_ptr() not in exclude:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _torch_launch(x, w, b, pre_out=None, deriv=False):
    """`launch_linear_gelu` in torch ops: the pre-activation (or, with `deriv`, ATen's GELU derivative there)
    into `pre_out`."""
    pre = torch.nn.functional.linear(x, w, b)
    if pre_out is not None:
        pre_out.copy_(torch.ops.aten.gelu_backward(torch.ones_like(pre), pre) if deriv else pre)
    return torch.nn.functional.gelu(pre)


def _mlp_leaves(dtype, bias: bool, lead=(37,), d=64, hidden=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g).to(dtype).requires_grad_()
    w1 = (torch.randn(hidden, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    b1 = torch.randn(hidden, generator=g).to(dtype).requires_grad_() if bias else None
    w2 = (torch.randn(d, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    b2 = torch.randn(d, generator=g).to(dtype).requires_grad_() if bias else None
    return x, w1, b1, w2, b2


def _unfused_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(37,), (2, 19)])
@pytest.mark.parametrize("gemms", MLP_GEMMS)
@pytest.mark.parametrize("recompute_gelu", [False, True])
def test_gelu_mlp_op_equals_autograd_of_the_unfused_mlp(monkeypatch, dtype, bias, lead, gemms, recompute_gelu):
    """On the CPU the op runs its torch path (`linear_gelu`'s fallback, a linear; in backward a matmul, ATen's
    gelu_backward and the sums: `gelu_grad`'s fallback; with "quack", quack's ops' fallbacks; with `recompute_gelu`
    the GELU output recomputed from the pre-activation by the same F.gelu): the ATen kernels autograd runs through
    the unfused MLP on the same values, so output and gradients must be equal bit for bit, over leading dims of x.

    "quack-dgelu" (but under the "gelu" policy) keeps the GELU's derivative and multiplies by it: in fp32 and fp64
    that product is ATen's `gelu_backward` bit for bit, in bf16 the stored derivative is rounded once more. There
    the gradients through it must equal those of "triton-dgelu"'s fallbacks (`dgelu_path_runs` forced: the same
    product, written in the same torch ops, so this checks only that the stored-derivative path ran, not the
    pre-activation one, whose gradients differ), and their error against fp64 stay within 2x the unfused path's
    (one more rounding of the same size as the two it has: ~1.2x measured), which is what checks the arithmetic; the
    down-projection's gradients do not pass through it and stay exact."""
    leaves = _mlp_leaves(dtype, bias, lead)
    given = [t for t in leaves if t is not None]
    grad_out = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = gelu_mlp(*leaves, gemms=gemms, recompute_gelu=recompute_gelu)
    ref = _unfused_mlp(*leaves)
    assert torch.equal(y, ref)
    got = torch.autograd.grad(y, given, grad_out)
    want = torch.autograd.grad(ref, given, grad_out)
    rounded_deriv = gemms == "quack-dgelu" and not recompute_gelu and dtype == torch.bfloat16
    if not rounded_deriv:
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype and torch.equal(a, b)
        return
    monkeypatch.setattr(lg, "dgelu_path_runs", lambda *a: True)
    triton_dgelu = torch.autograd.grad(gelu_mlp(*leaves, gemms="triton-dgelu"), given, grad_out)
    exact = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    fp64 = torch.autograd.grad(_unfused_mlp(*exact), [t for t in exact if t is not None], grad_out.double())
    names = [n for n, t in zip(("x", "w1", "b1", "w2", "b2"), leaves, strict=True) if t is not None]
    for name, a, b, c, r in zip(names, got, want, triton_dgelu, fp64, strict=True):
        assert a.dtype == dtype and torch.equal(a, c), name
        if name in ("w2", "b2"):
            assert torch.equal(a, b), name
        else:
            err, unfused_err = _rel_l2(a, r), _rel_l2(b, r)
            assert err <= 2 * unfused_err, (name, err, unfused_err)


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("gemms", MLP_GEMMS)
@pytest.mark.parametrize("recompute_gelu", [False, True])
def test_gelu_mlp_op_gradcheck_fp64_and_frozen_weights(gemms, recompute_gelu):
    """Finite differences (gradcheck's defaults) in fp64; with the weights frozen (a LoRA-style tower), only x gets
    a gradient, the unfused MLP's; with only the down-projection trainable, only its weight and bias do (with
    `recompute_gelu`, the path where no backward GEMM recomputes the GELU output the forward did not keep)."""
    leaves = _mlp_leaves(torch.float64, True, (2, 5), d=8, hidden=6)
    assert torch.autograd.gradcheck(lambda *a: gelu_mlp(*a, gemms=gemms, recompute_gelu=recompute_gelu), leaves)
    grad_out = torch.randn(2, 5, 8, dtype=torch.float64)
    for trainable in ((0,), (3, 4)):
        leaves = [t.detach().requires_grad_(i in trainable) for i, t in enumerate(leaves)]
        given = [leaves[i] for i in trainable]
        got = torch.autograd.grad(gelu_mlp(*leaves, gemms=gemms, recompute_gelu=recompute_gelu), given, grad_out)
        want = torch.autograd.grad(_unfused_mlp(*leaves), given, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_gelu_mlp_and_gelu_grad_ops_are_registered_with_fakes_and_autograd():
    mlp_op = torch.ops.dinov3_packing.gelu_mlp
    assert str(mlp_op.default._schema) == (
        "dinov3_packing::gelu_mlp(Tensor x, Tensor up_weight, Tensor? up_bias, Tensor down_weight, "
        'Tensor? down_bias, str gemms="triton", bool recompute_gelu=False) -> (Tensor, Tensor, Tensor)'
    )
    grad_op = torch.ops.dinov3_packing.gelu_grad
    assert str(grad_op.default._schema) == (
        "dinov3_packing::gelu_grad(Tensor grad_out, Tensor weight, Tensor pre, bool bias_grad) -> (Tensor, Tensor)"
    )
    leaves = _mlp_leaves(torch.float32, True, (5, 1))
    torch.library.opcheck(mlp_op, leaves)
    x, w1, _, w2, _ = (t.detach() for t in leaves)
    torch.library.opcheck(mlp_op, (x, w1, None, w2, None))
    g = torch.Generator().manual_seed(6)
    grad_out, pre = torch.randn(5, 64, generator=g), torch.randn(5, 96, generator=g)
    torch.library.opcheck(grad_op, (grad_out, w2, pre, True))
    torch.library.opcheck(grad_op, (grad_out, w2, pre, False))
    torch.library.opcheck(mlp_op, (*leaves, "quack"))
    torch.library.opcheck(mlp_op, (*leaves, "quack", True))
    torch.library.opcheck(mlp_op, (*leaves, "quack-dgelu"))
    torch.library.opcheck(mlp_op, (*leaves, "quack-dgelu", True))
    torch.library.opcheck(mlp_op, (*leaves, "triton", True))
    with pytest.raises(TypeError, match="recompute_gelu: expected a bool"):
        gelu_mlp(*leaves, recompute_gelu=1)


@pytest.mark.parametrize(
    ("act_name", "dact_name", "deriv_arg"),
    [("linear_gelu_dgelu", "dgelu_grad", "dgelu"), ("quack_linear_gelu_dgelu", "quack_dgelu_grad", "deriv")],
    ids=["triton-dgelu", "quack-dgelu"],
)
def test_dgelu_ops_are_registered_with_fakes(act_name, dact_name, deriv_arg):
    """The stored-derivative training ops ("triton-dgelu"'s and "quack-dgelu"'s forward and backward): schemas,
    opcheck (fake against real, with and without a bias, and for a pack of no tokens), and on the CPU their torch
    paths: the GELU and ATen's derivative at the pre-activation; the product of the gradient through the
    down-projection with that derivative equals ATen's `gelu_backward` bit for bit (fp32)."""
    act = getattr(torch.ops.dinov3_packing, act_name)
    assert str(act.default._schema) == (
        f"dinov3_packing::{act_name}(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)"
    )
    dact = getattr(torch.ops.dinov3_packing, dact_name)
    assert str(dact.default._schema) == (
        f"dinov3_packing::{dact_name}(Tensor grad_out, Tensor weight, Tensor {deriv_arg}, bool bias_grad) "
        "-> (Tensor, Tensor)"
    )
    g = torch.Generator().manual_seed(8)
    x, w1, b1 = torch.randn(5, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    grad_out, w2 = torch.randn(5, 64, generator=g), torch.randn(64, 96, generator=g)
    for rows in (5, 0):
        torch.library.opcheck(act, (x[:rows], w1, b1))
        torch.library.opcheck(act, (x[:rows], w1, None))
        deriv = act(x[:rows], w1, b1)[1]
        for bias_grad in (True, False):
            torch.library.opcheck(dact, (grad_out[:rows], w2, deriv, bias_grad))
    if act_name == "linear_gelu_dgelu":  # (the Triton op takes leading dims; quack's ops are 2-D)
        torch.library.opcheck(act, (x.reshape(5, 1, 64), w1, None))
    y, deriv = act(x, w1, b1)
    pre = F.linear(x, w1, b1)
    assert torch.equal(y, F.gelu(pre))
    assert torch.equal(deriv, torch.ops.aten.gelu_backward(torch.ones_like(pre), pre))
    grad_pre, grad_b = dact(grad_out, w2, deriv, True)
    assert torch.equal(grad_pre, torch.ops.aten.gelu_backward(grad_out @ w2, pre))
    assert torch.equal(grad_b, grad_pre.sum(0))
    assert dact(grad_out, w2, deriv, False)[1].shape == (0,)


def test_quack_ops_are_registered_with_fakes():
    act = torch.ops.dinov3_packing.quack_linear_gelu
    assert str(act.default._schema) == (
        "dinov3_packing::quack_linear_gelu(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)"
    )
    dact = torch.ops.dinov3_packing.quack_gelu_grad
    assert str(dact.default._schema) == (
        "dinov3_packing::quack_gelu_grad(Tensor grad_out, Tensor weight, Tensor pre, bool bias_grad, "
        "bool postact=True) -> (Tensor, Tensor, Tensor)"
    )
    g = torch.Generator().manual_seed(7)
    x, w1, b1 = torch.randn(5, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    torch.library.opcheck(act, (x, w1, b1))
    torch.library.opcheck(act, (x, w1, None))
    y, pre = act(x, w1, b1)
    assert torch.equal(pre, F.linear(x, w1, b1)) and torch.equal(y, F.gelu(pre))
    grad_out, w2 = torch.randn(5, 64, generator=g), torch.randn(64, 96, generator=g)
    for bias_grad in (True, False):
        for postact in (True, False):
            torch.library.opcheck(dact, (grad_out, w2, pre, bias_grad, postact))
    grad_pre, h, grad_b = dact(grad_out, w2, pre, True)
    assert torch.equal(grad_pre, torch.ops.aten.gelu_backward(grad_out @ w2, pre))
    assert torch.equal(h, y) and torch.equal(grad_b, grad_pre.sum(0))
    assert dact(grad_out, w2, pre, False)[2].numel() == 0
    no_postact = dact(grad_out, w2, pre, True, False)
    assert torch.equal(no_postact[0], grad_pre) and no_postact[1].numel() == 0 and torch.equal(no_postact[2], grad_b)


@pytest.mark.parametrize("gemms", MLP_GEMMS)
@pytest.mark.parametrize("recompute_gelu", [False, True])
def test_gelu_mlp_op_on_a_pack_of_no_tokens(gemms, recompute_gelu):
    """A pack of no tokens (every choice of GEMMs, both GELU policies): empty output of the right shape, and
    gradients of zeros for the weights and biases, as autograd of the unfused MLP gives."""
    leaves = _mlp_leaves(torch.float32, True, (0,))
    y = gelu_mlp(*leaves, gemms=gemms, recompute_gelu=recompute_gelu)
    assert y.shape == (0, 64)
    got = torch.autograd.grad(y.sum(), leaves, allow_unused=False)
    want = torch.autograd.grad(_unfused_mlp(*leaves).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_mlp_gemms_option_is_validated_and_resolved(tiny):
    """`mlp_gemms`: a str of "auto" or `MLP_GEMMS` (TypeError / ValueError naming it otherwise). Where the fused
    MLP does not run (CPU) every choice resolves to "triton"; where it runs, "auto" takes quack ("quack-dgelu") only
    where quack runs, and an explicit "quack" or "quack-dgelu" where it cannot raises before compute. The default is
    "auto"."""
    model = DINOv3ViTPackingModel(tiny(num_hidden_layers=1))
    assert model.mlp_gemms == "auto"
    layout = PackedLayout.build([(1, 2, 3)], model.num_prefix_tokens, "cpu")
    assert model.packed_batch(layout, inference=False).mlp_gemms == "triton"
    with pytest.raises(TypeError, match="mlp_gemms"):
        model.mlp_gemms = None
    with pytest.raises(ValueError, match="mlp_gemms: expected 'auto' or one of"):
        model.mlp_gemms = "cublas"
    with pytest.raises(ValueError, match="mlp_gemms"):
        DINOv3ViTPackingModel(tiny(num_hidden_layers=1), mlp_gemms="fast")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for value in ("auto", "triton", "quack", "quack-dgelu"):
        assert resolve_mlp_gemms(value, cpu, fused=False) == "triton"
    assert not quack_gemms_available(cpu)
    if not quack_gemms_available(cuda):  # no GPU here, or no quack: what a machine without them must do
        assert resolve_mlp_gemms("auto", cuda, fused=True) == "triton"
        for value in ("quack", "quack-dgelu"):
            with pytest.raises(ValueError, match=rf"mlp_gemms='{value}': .*dinov3-packing\[hopper\]"):
                resolve_mlp_gemms(value, cuda, fused=True)
    else:
        assert resolve_mlp_gemms("auto", cuda, fused=True) == "quack-dgelu"
        assert resolve_mlp_gemms("quack", cuda, fused=True) == "quack"
    model.mlp_gemms = "quack"
    assert model.packed_batch(layout, inference=False).mlp_gemms == "triton"  # the CPU runs no fused MLP


def test_compiled_training_runs_the_op_forward_and_gelu_grad_backward():
    """Under torch.compile with autograd (AOTAutograd, as Inductor runs it) the forward graph holds `gelu_mlp`
    once and the backward graph one GELU-gradient GEMM op (`gelu_grad`, `quack_gelu_grad` for "quack", or
    `quack_dgelu_grad` for "quack-dgelu", which is "quack" under the "gelu" policy), with no
    gelu_backward left beside it; gradients equal eager autograd through the unfused MLP. Both keep as many tensors
    for the backward; with `recompute_gelu`, "quack" keeps one less (the GELU output, which its backward GEMM then
    recomputes)."""

    def targets(gm):
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    saved = {}
    for gemms, grad_op, recompute in (
        ("triton", "gelu_grad", False),
        ("quack", "quack_gelu_grad", False),
        ("quack", "quack_gelu_grad", True),
        ("quack-dgelu", "quack_dgelu_grad", False),
        ("quack-dgelu", "quack_gelu_grad", True),  # under the "gelu" policy it is "quack"
    ):
        backend, graphs = capturing_aot_backend()
        fn = torch.compile(
            lambda *a, gemms=gemms, r=recompute: gelu_mlp(*a, gemms=gemms, recompute_gelu=r).square().sum(),
            backend=backend,
        )
        leaves = _mlp_leaves(torch.float32, True)
        got = torch.autograd.grad(fn(*leaves), leaves)
        want = torch.autograd.grad(_unfused_mlp(*leaves).square().sum(), leaves)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert targets(graphs["forward"]).count(torch.ops.dinov3_packing.gelu_mlp.default) == 1
        backward = targets(graphs["backward"])
        names = ("gelu_grad", "quack_gelu_grad", "quack_dgelu_grad")
        grad_ops = {name: getattr(torch.ops.dinov3_packing, name).default for name in names}
        assert {name: backward.count(op) for name, op in grad_ops.items()} == {
            name: int(name == grad_op) for name in grad_ops
        }
        assert torch.ops.aten.gelu_backward.default not in backward
        (output,) = [n for n in graphs["forward"].graph.nodes if n.op == "output"]
        saved[gemms, recompute] = len(output.args[0]) - 1  # the loss, then what the backward reads
    assert saved["quack", False] == saved["triton", False] == saved["quack", True] + 1
    assert saved["quack-dgelu", False] == saved["quack", False] and saved["quack-dgelu", True] == saved["quack", True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("gemms", MLP_GEMMS)
def test_gpu_gelu_mlp_gradients_against_fp32(gemms):
    """The training op on the GPU (the up-projection GEMM with the GELU forward, the GELU-gradient GEMM backward:
    the Triton kernels or quack's), bf16, at ViT-L widths, each output and gradient against the fp32 unfused MLP on
    the same (rounded) inputs: relative L2 error within 1.1x the unfused bf16 path's own error against that
    reference (the fused kernels round once where the unfused path rounds twice, so they should be no worse; the
    "-dgelu" choices round the stored derivative too, and measured 1.04x on the H100, 2026-12-07) and below 1e-2."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the gelu_grad kernel is TMA-only (sm_90+)")
    if gemms.startswith("quack") and not quack_gemms_available(torch.device("cuda")):
        pytest.skip("quack-kernels is not installed here (the hopper extra)")
    assert lg.gelu_grad_supported(
        torch.empty(8, 1024, device="cuda", dtype=torch.bfloat16),
        torch.empty(1024, 4096, device="cuda", dtype=torch.bfloat16),
        torch.empty(8, 4096, device="cuda", dtype=torch.bfloat16),
    )
    leaves32 = [t.detach().cuda() for t in _mlp_leaves(torch.float32, True, (3001,), d=1024, hidden=4096)]
    grad_out = torch.randn(3001, 1024, device="cuda")
    bf = [t.bfloat16().float() for t in leaves32]  # the fp32 reference sees the bf16 inputs

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in bf]
        y = fn(*leaves)
        return [y.float(), *(g.float() for g in torch.autograd.grad(y, leaves, grad_out.to(dtype)))]

    ref = run(_unfused_mlp, torch.float32)
    fused = run(lambda *a: gelu_mlp(*a, gemms=gemms), torch.bfloat16)
    unfused = run(_unfused_mlp, torch.bfloat16)
    names = ("out", "x", "up_weight", "up_bias", "down_weight", "down_bias")
    for name, f, u, r in zip(names, fused, unfused, ref, strict=True):
        err_f = ((f - r).norm() / r.norm()).item()
        err_u = ((u - r).norm() / r.norm()).item()
        print(f"{name}: fused {err_f:.2e}, unfused {err_u:.2e}")
        assert err_f <= 1e-2 and err_f <= 1.1 * err_u, (name, err_f, err_u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("tokens", [3001, 60038])
def test_gpu_quack_bias_gradient_in_the_epilogue(monkeypatch, tokens):
    """`quack_gelu_grad` with the up-projection's bias gradient summed in its GEMM's epilogue (`FUSED_BIAS_GRAD`, the
    default) against the same op summing it in a pass of its own, at ViT-L widths, bf16, token counts no tile
    divides: the gradient of the pre-activation and the recomputed GELU output equal bit for bit (one epilogue
    computes both the same way), and the bias gradient, each against the fp32 sum of the fp32 gradient on the same
    inputs, no worse than the separate sum of the rounded gradient (within 1.1x) and below 1e-2 relative L2. Without
    the GELU output (`postact=False`, what the training op asks for when its forward kept it), with the sum in the
    epilogue and apart: the same gradient and bias gradient bit for bit, from the epilogues that leave it out."""
    from dinov3_packing.ops import quack

    if not quack_gemms_available(torch.device("cuda")):
        pytest.skip("quack-kernels is not installed here (the hopper extra), or the GPU is not SM90")
    g = torch.Generator(device="cuda").manual_seed(0)
    grad_out = torch.randn(tokens, 1024, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(1024, 4096, device="cuda", generator=g) / 64).bfloat16()
    pre = (2 * torch.randn(tokens, 4096, device="cuda", generator=g)).bfloat16()
    op = torch.ops.dinov3_packing.quack_gelu_grad
    mods = []  # each launch of an epilogue of ours fetches its mod: the log says which path ran
    real = quack._dgelu_mod
    monkeypatch.setattr(quack, "_dgelu_mod", lambda *a: mods.append(a) or real(*a))
    fused = op(grad_out, weight, pre, True)
    assert mods == [(True, True)]
    monkeypatch.setattr(quack, "FUSED_BIAS_GRAD", False)
    apart = op(grad_out, weight, pre, True)
    assert mods == [(True, True)]  # quack's gemm_dact, then the sum
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])
    # Without the GELU output (the forward kept it): the same gradient, from the epilogue that stores it alone.
    no_postact = op(grad_out, weight, pre, True, False)
    assert mods[-1] == (False, False) and no_postact[1].numel() == 0
    assert torch.equal(no_postact[0], fused[0]) and torch.equal(no_postact[2], apart[2])
    monkeypatch.setattr(quack, "FUSED_BIAS_GRAD", True)
    no_postact = op(grad_out, weight, pre, True, False)
    assert mods[-1] == (False, True) and no_postact[1].numel() == 0
    assert torch.equal(no_postact[0], fused[0]) and torch.equal(no_postact[2], fused[2])
    monkeypatch.setattr(quack, "FUSED_BIAS_GRAD", False)
    assert fused[2].shape == apart[2].shape == (4096,) and fused[2].dtype == torch.bfloat16
    ref = torch.ops.aten.gelu_backward(grad_out.float() @ weight.float(), pre.float()).sum(0)
    err_fused = ((fused[2].float() - ref).norm() / ref.norm()).item()
    err_apart = ((apart[2].float() - ref).norm() / ref.norm()).item()
    print(f"bias gradient at {tokens} tokens: in the epilogue {err_fused:.2e}, apart {err_apart:.2e}")
    assert err_fused <= 1e-2 and err_fused <= 1.1 * err_apart, (err_fused, err_apart)
    monkeypatch.setattr(quack, "FUSED_BIAS_GRAD", True)
    assert op(grad_out, weight, pre, False)[2].numel() == 0  # no bias: no sum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("tokens", [3001, 60038])
def test_gpu_quack_stored_derivative(tokens):
    """quack's GEMMs of "quack-dgelu" at ViT-L widths, bf16, token counts no tile divides, against fp32 on the same
    inputs. `quack_linear_gelu_dgelu`: the GELU output equal to `quack_linear_gelu`'s within one bf16 ulp (another
    order of the same fp32 products), and the derivative within the bf16 rounding of ATen's `gelu_backward` of a
    unit gradient at the fp32 pre-activation (relative L2 below 2^-8). `quack_dgelu_grad`: the gradient and the bias
    gradient summed in its epilogue against the fp32 product and sum over the same stored derivative, within bf16
    rounding (below 2^-8), the gradient no worse than `quack_gelu_grad`'s against its own fp32 reference (within
    1.1x; the two bias gradients are fp32 sums of unrounded products, printed). The forward without a bias too
    (not yet run on a GPU)."""
    if not quack_gemms_available(torch.device("cuda")):
        pytest.skip("quack-kernels is not installed here (the hopper extra), or the GPU is not SM90")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 1024, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(4096, 1024, device="cuda", generator=g) / 32).bfloat16()
    b1 = torch.randn(4096, device="cuda", generator=g).bfloat16()
    y, deriv = torch.ops.dinov3_packing.quack_linear_gelu_dgelu(x, w1, b1)
    y_act, pre = torch.ops.dinov3_packing.quack_linear_gelu(x, w1, b1)
    assert y.dtype == deriv.dtype == torch.bfloat16 and y.shape == deriv.shape == (tokens, 4096)
    ulp = torch.finfo(torch.bfloat16).eps * y_act.float().abs().clamp_min(2.0**-126)
    assert ((y.float() - y_act.float()).abs() <= ulp).all()
    pre32 = x.float() @ w1.float().t() + b1.float()
    want = torch.ops.aten.gelu_backward(torch.ones_like(pre32), pre32)
    err_deriv = _rel_l2(deriv, want.double())
    grad_out = torch.randn(tokens, 1024, device="cuda", generator=g).bfloat16()
    w2 = (torch.randn(1024, 4096, device="cuda", generator=g) / 32).bfloat16()
    grad_pre, grad_b = torch.ops.dinov3_packing.quack_dgelu_grad(grad_out, w2, deriv, True)
    ref = (grad_out.float() @ w2.float()) * deriv.float()
    err_grad, err_bias = _rel_l2(grad_pre, ref.double()), _rel_l2(grad_b, ref.sum(0).double())
    # quack_gelu_grad from the pre-activation, against its fp32 reference
    old_pre, _, old_b = torch.ops.dinov3_packing.quack_gelu_grad(grad_out, w2, pre, True, False)
    old_ref = torch.ops.aten.gelu_backward(grad_out.float() @ w2.float(), pre.float())
    err_old, err_old_bias = _rel_l2(old_pre, old_ref.double()), _rel_l2(old_b, old_ref.sum(0).double())
    print(
        f"{tokens} tokens: derivative {err_deriv:.2e}; gradient {err_grad:.2e} (quack_gelu_grad {err_old:.2e}), "
        f"bias gradient {err_bias:.2e} ({err_old_bias:.2e})"
    )
    assert max(err_deriv, err_grad, err_bias) < 2.0**-8
    assert err_grad <= 1.1 * err_old
    assert torch.ops.dinov3_packing.quack_dgelu_grad(grad_out, w2, deriv, False)[1].numel() == 0
    # Without a bias (its own epilogue, `_deriv_mod(False)`): the derivative as closely, the output within one ulp.
    y, deriv = torch.ops.dinov3_packing.quack_linear_gelu_dgelu(x, w1, None)
    y_act = torch.ops.dinov3_packing.quack_linear_gelu(x, w1, None)[0]
    ulp = torch.finfo(torch.bfloat16).eps * y_act.float().abs().clamp_min(2.0**-126)
    assert ((y.float() - y_act.float()).abs() <= ulp).all()
    pre32 = x.float() @ w1.float().t()
    assert _rel_l2(deriv, torch.ops.aten.gelu_backward(torch.ones_like(pre32), pre32).double()) < 2.0**-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("gemms", ["quack", "quack-dgelu"])
def test_gpu_quack_gemms_build_once_for_every_token_count(monkeypatch, gemms):
    """A training pack's token count changes from step to step, and quack's GEMMs are the training op's default
    where they run ("auto"): they must build their kernels once, not once per token count. quack builds a kernel
    with `cutlass.cute.compile`, or loads it from its disk cache with `cute.runtime.load_module`; both counted,
    the first forward and backward builds or loads (fp16, a dtype no other test here runs through quack, so
    nothing for it is in the process yet), and over four more token counts neither follows."""
    cuda = torch.device("cuda")
    if not quack_gemms_available(cuda):
        pytest.skip("quack-kernels is not installed here (the hopper extra), or the GPU is not SM90")
    import cutlass.cute as cute
    from quack import gemm_tvm_ffi_utils
    from quack.cache import jit

    # quack's GEMMs build and load through the module attributes counted here
    assert gemm_tvm_ffi_utils.cute is cute and jit.cute is cute
    builds = []

    def counted(owner, name):
        real = getattr(owner, name)

        def run(*args, **kwargs):
            builds.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, run)

    counted(cute, "compile")
    counted(cute.runtime, "load_module")

    def step(tokens):
        leaves = [
            None if t is None else t.detach().cuda().requires_grad_()
            for t in _mlp_leaves(torch.float16, True, (tokens,), d=1024, hidden=4096)
        ]
        y = gelu_mlp(*leaves, gemms=gemms)
        torch.autograd.grad(y, [t for t in leaves if t is not None], torch.randn_like(y))
        torch.cuda.synchronize()

    step(3001)
    first = list(builds)
    assert first  # the counting sees quack's builds
    for tokens in (1001, 4097, 2500, 60038):
        step(tokens)
    assert builds == first, builds[len(first) :]


@pytest.mark.parametrize(
    ("root", "usable"),
    [("/usr/lib/python3/site-packages", True), ("/opt/venv/lib/dist-packages", True), ("/opt/wheels/site", False)],
)
def test_quack_is_refused_outside_site_packages(monkeypatch, root, usable):
    """quack 0.6.5 builds its GELU epilogues only when its code lies under a site-packages (or dist-packages)
    directory: stand-in `quack` and `cutlass` modules at each kind of place, and `quack_missing` says so by name."""
    import sys
    import types

    from dinov3_packing.ops import quack as q

    for name in ("quack", "quack.gemm_interface", "cutlass"):
        module = types.ModuleType(name)
        module.__file__ = f"{root}/{name.replace('.', '/')}/__init__.py"
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["quack"].gemm_interface = sys.modules["quack.gemm_interface"]
    q.quack_missing.cache_clear()
    try:
        reason = q.quack_missing()
    finally:
        q.quack_missing.cache_clear()
    if usable:
        assert reason is None
    else:
        assert "quack is installed at /opt/wheels/site/quack, outside a site-packages directory" in reason


def test_gelu_policy_keeps_one_hidden_activation_less_per_block(tiny):
    """The bytes autograd holds for backward after a training forward of the block stack (every saved tensor's
    storage once, parameters excluded): under `apply_recompute(model, "gelu")` exactly one `[tokens, intermediate]`
    tensor less per block than without it (the GELU output, which the backward recomputes), for every GEMM choice
    of the training op (on the CPU "triton-dgelu" is "triton", which keeps the pre-activation); the same with each
    choice without the policy; and the gradients equal those without it bit for bit (on the CPU both recompute
    with the same F.gelu)."""
    from dinov3_packing.parallel.recompute import apply_recompute

    torch.manual_seed(0)
    models = {policy: DINOv3ViTPackingModel(tiny(num_hidden_layers=3)).train() for policy in (None, "gelu")}
    models["gelu"].load_state_dict(models[None].state_dict())
    apply_recompute(models["gelu"], "gelu")
    assert all(layer.recompute_gelu for layer in models["gelu"].model.layer)
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], models[None].num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, models[None].config.hidden_size)
    batch = models[None].packed_batch(layout, inference=False)
    saved, grads = {}, {}
    for policy, model in models.items():
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for gemms in MLP_GEMMS:
            model.zero_grad(set_to_none=True)
            run = dataclasses.replace(batch, fused_mlp=True, mlp_gemms=gemms)
            saved[policy, gemms], (out, _) = _saved_bytes(lambda m=model, r=run: m.model(x, r), params)
            out.square().mean().backward()  # what was kept is enough for backward
            grads[policy, gemms] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    hidden = layout.num_tokens * models[None].config.intermediate_size * x.element_size()
    for gemms in MLP_GEMMS:
        assert saved[None, gemms] == saved[None, "triton"]
        assert saved[None, gemms] - saved["gelu", gemms] == 3 * hidden, gemms
        assert grads[None, gemms].keys() == grads["gelu", gemms].keys() and len(grads[None, gemms]) > 20
        for name, grad in grads[None, gemms].items():
            assert torch.equal(grads["gelu", gemms][name], grad), (gemms, name)


@pytest.mark.parametrize("gemms", MLP_GEMMS)
def test_training_op_folds_layer_scale(tiny, fused_calls, monkeypatch, gemms):
    """With LayerScales of random sizes and signs, the training op with the MLP's LayerScale folded into its
    down-projection (the default, `fold_layer_scale`) gives the unfolded module path's output and gradients to
    fp32 parity; autograd then keeps, per block, the scaled weights ([D, D] and [D, I]) instead of the two
    projections' outputs ([T, D] each), exactly."""
    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(
        lg,
        "launch_linear_gelu",
        lambda x, w, b, config=None, *, pre_out=None, deriv=False: _torch_launch(x, w, b, pre_out, deriv),
    )
    torch.manual_seed(0)
    cfg = tiny(num_hidden_layers=3)
    model = DINOv3ViTPackingModel(cfg).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layer:
            for ls in (layer.layer_scale1, layer.layer_scale2):
                ls.lambda1.copy_(torch.randn(ls.lambda1.shape, generator=g))
    layout = PackedLayout.build([(1, 6, 5), (1, 3, 4), (1, 2, 2)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, cfg.hidden_size)
    batch = model.packed_batch(layout, inference=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    results = {}
    for fold in (False, True):
        model.zero_grad(set_to_none=True)
        run = dataclasses.replace(batch, fused_mlp=fold, mlp_gemms=gemms, fold_layer_scale=fold)
        saved, (out, _) = _saved_bytes(lambda r=run: model.model(x, r), params)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fold] = (out.detach(), grads, saved)
    assert fused_calls.ops == ["gelu_mlp"] * 3
    (plain, plain_grads, plain_saved), (folded, folded_grads, folded_saved) = results[False], results[True]
    assert_close(folded, plain)
    assert folded_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        try:
            assert_close(folded_grads[name], grad)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    # The fused op also keeps its pre-activation (the unfused MLP keeps the same tensor as the GELU's input), and the
    # GELU output as the unfused MLP does: compare with what each path keeps besides the LayerScale terms.
    t, d, i = layout.num_tokens, cfg.hidden_size, cfg.intermediate_size
    assert plain_saved - folded_saved == 3 * (2 * t * d - d * d - d * i) * 4


def test_gelu_policy_leaves_the_derivative_path_keeping_the_gelu_output(monkeypatch):
    """Where "triton-dgelu" keeps the GELU's derivative instead of the pre-activation (`dgelu_path_runs`, forced here;
    on the CPU its ops run their torch paths), the output cannot be recomputed, so `recompute_gelu` keeps it: the op
    holds as many bytes for backward either way and gives the same gradients, while "triton" holds one `[tokens,
    hidden]` tensor less with it."""
    monkeypatch.setattr(lg, "dgelu_path_runs", lambda *a: True)
    leaves = _mlp_leaves(torch.float32, True)
    grad_out = torch.randn(37, 64, generator=torch.Generator().manual_seed(9))
    leaf_storages = {t.untyped_storage().data_ptr() for t in leaves if t is not None}
    saved, grads = {}, {}
    for gemms in ("triton-dgelu", "triton"):
        for recompute in (False, True):
            run = functools.partial(gelu_mlp, *leaves, gemms=gemms, recompute_gelu=recompute)
            saved[gemms, recompute], y = _saved_bytes(run, leaf_storages)
            grads[gemms, recompute] = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
    hidden = 37 * 96 * 4
    assert saved["triton-dgelu", True] == saved["triton-dgelu", False] == saved["triton", False]
    assert saved["triton", False] - saved["triton", True] == hidden
    for key in (("triton-dgelu", True), ("triton", True), ("triton", False)):
        for a, b in zip(grads[key], grads["triton-dgelu", False], strict=True):
            assert torch.equal(a, b), key
