"""Recomputation policies and MLP wrappers under `compile_model`, in a model compiled after another one.

Dynamo keeps one list of graphs per code object (the encoder's `forward`) for every model in the process and
runs the first whose guards pass; with `inline_inbuilt_nn_modules` a second model of the same config passes
them unless it differs in something guarded. So any choice the compiled region makes from state Dynamo does
not guard (it did not guard `"forward" in vars(mlp)`) follows whichever model was compiled first: on an
H200 a model with `apply_recompute(model, "mlp")` ran the graph of a model without it, with no
recomputation and the same step memory (benchmarks/fa4_gpu_check.py, part `train`).

Set-up: the fused-MLP gate is forced on (it is off on the CPU), and `linear_gelu`'s custom op runs on the
CPU through a torch-ops launcher (as in test_fused_mlp.py). The op is opaque to the compiler, so its Python
body runs at every call, compiled or not: counting those calls in forward and in backward shows whether the
fused kernel ran and whether backward recomputed it. Backend "aot_eager": Dynamo's guards and
AOTAutograd's partitioner (which does the recomputation) are those of inductor, without its C++ builds.
Tolerance where compiled gradients meet eager ones: conftest's fp32 1e-5 (the compiled graph may order
fp32 operations differently).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import assert_close, random_images, tiny_config
from test_training import saved_activation_bytes

from dinov3_packing import pack, random_packing_model
from dinov3_packing.model import modeling
from dinov3_packing.ops import attention as attention_ops
from dinov3_packing.ops.triton import linear_gelu as lg
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.compile import compile_model, compile_stats
from dinov3_packing.parallel.recompute import apply_recompute

CONFIG = tiny_config(num_hidden_layers=2)
LAYERS = CONFIG.num_hidden_layers


@dataclasses.dataclass
class Launches:
    """Runs of the fused op, by the phase (forward or backward) they ran in."""

    phase: str = "forward"
    counts: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})


@pytest.fixture
def launches(monkeypatch) -> Launches:
    """Forces the fused MLP onto the CPU (the gate, then the custom op with a torch-ops launcher), compiles
    with aot_eager, and starts and ends with a fresh Dynamo cache."""
    record = Launches()

    def torch_launch(x, w, b, config=None, *, pre_out=None, deriv=False):
        record.counts[record.phase] += 1
        pre = torch.nn.functional.linear(x, w, b)
        if pre_out is not None:
            pre_out.copy_(torch.ops.aten.gelu_backward(torch.ones_like(pre), pre) if deriv else pre)
        return torch.nn.functional.gelu(pre)

    monkeypatch.setattr(modeling, "fused_mlp_runs", lambda enabled, device, dtype: enabled)
    monkeypatch.setattr(lg, "linear_gelu_supported", lambda *a, **k: True)
    monkeypatch.setattr(lg, "launch_linear_gelu", torch_launch)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    yield record
    torch._dynamo.reset()


@dataclasses.dataclass
class Step:
    saved: int  # activation bytes autograd held for backward
    forward: int  # fused-op runs in forward
    backward: int  # fused-op runs in backward (recomputation)
    graphs: int  # graphs Dynamo compiled for this step
    grads: dict


def _model(policy: str | None):
    return apply_recompute(random_packing_model(CONFIG, seed=0).eval(), policy)


def _step(model, launches: Launches, between=lambda: None) -> Step:
    """One forward, `between()`, then backward; eval mode, so nothing random and every model gets the same
    gradients."""
    hidden_states, grid = pack(random_images([(2, 3), (3, 2), (1, 2)], 16, seed=1), 16)
    model.zero_grad(set_to_none=True)
    launches.phase, launches.counts = "forward", {"forward": 0, "backward": 0}
    graphs = compile_stats()["unique_graphs"]
    saved, out = saved_activation_bytes(model, lambda: model(hidden_states, grid))
    between()
    launches.phase = "backward"
    (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return Step(saved, **launches.counts, graphs=compile_stats()["unique_graphs"] - graphs, grads=grads)


def test_mlp_recompute_keeps_the_fused_kernel_and_recomputes_it(launches):
    """Eager and compiled (after a plain model): the fused op runs once per block in forward and again in
    backward, the saved activations shrink, and the gradients are those without recomputation."""
    for compiled in (False, True):
        build = compile_model if compiled else (lambda model: model)
        plain = _step(build(_model(None)), launches)
        recomputed = _step(build(_model("mlp")), launches)
        assert (plain.forward, plain.backward) == (LAYERS, 0), compiled
        assert (recomputed.forward, recomputed.backward) == (LAYERS, LAYERS), compiled
        assert recomputed.saved < plain.saved, compiled
        assert recomputed.grads.keys() == plain.grads.keys()
        for name, grad in plain.grads.items():
            assert_close(recomputed.grads[name], grad)
            # Eager recomputation runs the same ops again on the same inputs: bitwise.
            assert compiled or torch.equal(recomputed.grads[name], grad), name


def _doubling_hooks(model) -> list:
    return [layer.mlp.register_forward_hook(lambda m, i, out: 2 * out) for layer in model.model.layer]


@pytest.mark.parametrize("change", ["added", "removed"])
def test_recomputation_runs_the_path_the_forward_took(launches, change):
    """A hook on every MLP added or removed between forward and backward (eager): backward recomputes the
    path the forward took (the fused op where the forward ran it, the module where it did not), and the
    gradients are those of the same steps without recomputation."""
    steps = []
    for policy in (None, "mlp"):
        model = _model(policy)
        if change == "added":
            steps.append(_step(model, launches, between=functools.partial(_doubling_hooks, model)))
        else:
            handles = _doubling_hooks(model)
            steps.append(_step(model, launches, between=lambda handles=handles: [h.remove() for h in handles]))
    plain, recomputed = steps
    fused = LAYERS if change == "added" else 0  # the forward took the fused path where no hook was on yet
    assert (plain.forward, plain.backward) == (fused, 0)
    assert (recomputed.forward, recomputed.backward) == (fused, fused)
    assert recomputed.grads.keys() == plain.grads.keys()
    for name, grad in plain.grads.items():
        assert torch.equal(recomputed.grads[name], grad), name


@pytest.mark.parametrize(
    ("first", "second"),
    [(None, "mlp"), (None, "attention"), (None, "block"), ("mlp", None), ("attention", "mlp"), ("mlp", "mlp")],
)
def test_a_model_compiled_after_another_runs_its_own_policy(launches, first, second):
    """`second`'s model compiled after `first`'s (same config, one process) saves and recomputes exactly what
    it does compiled alone, and its gradients are its own (those of the eager model)."""
    alone = _step(compile_model(_model(second)), launches)
    torch._dynamo.reset()
    _step(compile_model(_model(first)), launches)
    after = _step(compile_model(_model(second)), launches)
    assert (after.saved, after.forward, after.backward) == (alone.saved, alone.forward, alone.backward)
    eager = _step(_model(second), launches)
    assert after.grads.keys() == eager.grads.keys()
    for name, grad in eager.grads.items():
        assert_close(after.grads[name], grad)
    if first == second:
        assert after.graphs == 0  # the same policy reuses the graph: the guards are not over-specific


def _attach(module: torch.nn.Module, attach: str, other: torch.nn.Module) -> None:
    """Attaches behaviour the fused path must not bypass to `module` (an MLP or an up-projection):
    "forward" doubles its output through an instance-level forward (a user's wrapper), "hook" through a
    forward hook, "other_forward" sets `other.forward` on it (a forward bound to another module of the same
    class: `module` then computes with `other`'s weights). "class_forward" is patched on the class by the
    test, once for all modules."""
    if attach == "forward":
        original = module.forward
        module.forward = lambda x: 2 * original(x)
    elif attach == "hook":
        module.register_forward_hook(lambda m, i, out: 2 * out)
    elif attach == "other_forward":
        module.forward = other.forward


@pytest.mark.parametrize("attach", ["forward", "hook", "other_forward", "class_forward"])
@pytest.mark.parametrize("target", ["mlp", "up_proj"])
def test_an_mlp_wrapper_runs_in_a_model_compiled_after_a_plain_one(launches, monkeypatch, target, attach):
    """A wrapper on the MLP or its up-projection keeps the module path (so it runs), eager and in a compiled
    model, also when a model without it was compiled first. The expected output is the wrapped model's
    without the fused path (`fused_mlp=False`)."""
    hidden_states, grid = pack(random_images([(2, 3), (3, 2)], 16, seed=2), 16)
    part = (lambda mlp: mlp) if target == "mlp" else (lambda mlp: mlp.up_proj)

    def wrapped(fused_mlp: bool = True):
        model = random_packing_model(CONFIG, seed=0).eval()
        model.fused_mlp = fused_mlp
        other = random_packing_model(CONFIG, seed=1)
        for layer, other_layer in zip(model.model.layer, other.model.layer, strict=True):
            _attach(part(layer.mlp), attach, part(other_layer.mlp))
        return model

    def patch_class():  # as a library patching transformers or torch would
        cls = type(part(random_packing_model(CONFIG).model.layer[0].mlp))
        monkeypatch.setattr(cls, "forward", lambda self, x, forward=cls.forward: 2 * forward(self, x))

    _assert_module_path_after_a_plain_model(
        launches, wrapped, hidden_states, grid, patch_class if attach == "class_forward" else None
    )


def _assert_module_path_after_a_plain_model(
    launches, make, hidden_states, grid, patch=None, changes_output: bool = True
) -> None:
    """After a plain model was compiled and run (the fused op running in each block), `make()` (a model with
    something attached to its MLPs; `patch()` first, if given, patches a class) runs without the fused op,
    eager and compiled, and gives `make(fused_mlp=False)`'s output: exactly eager, to rounding compiled."""
    with torch.no_grad():
        plain = compile_model(random_packing_model(CONFIG, seed=0).eval())(hidden_states, grid).last_hidden_state
        assert launches.counts["forward"] == LAYERS
        if patch is not None:
            patch()
        expected = make(fused_mlp=False)(hidden_states, grid).last_hidden_state
        launches.counts["forward"] = 0
        got_eager = make()(hidden_states, grid).last_hidden_state
        got_compiled = compile_model(make())(hidden_states, grid).last_hidden_state
    assert launches.counts["forward"] == 0
    if changes_output:  # what was attached shows in the output, so running the module path is visible
        assert (expected - plain).abs().max() > 100 * 1e-5 * plain.abs().max()
    assert torch.equal(got_eager, expected)
    assert_close(got_compiled, expected)


@pytest.mark.parametrize("change", ["replaced", "forward", "class_forward", "python_gelu"])
def test_an_mlp_activation_change_runs_in_a_model_compiled_after_a_plain_one(launches, monkeypatch, change):
    """The fused kernel computes the exact GELU: an MLP whose activation was replaced (ReLU), wrapped on the
    instance or the class, or switched to transformers' Python GELU keeps the module path, eager and in a
    model compiled after a plain one; the expected output is the changed model's with `fused_mlp=False`."""
    from transformers.activations import GELUActivation

    hidden_states, grid = pack(random_images([(2, 3), (3, 2)], 16, seed=2), 16)

    def changed(fused_mlp: bool = True):
        model = random_packing_model(CONFIG, seed=0).eval()
        model.fused_mlp = fused_mlp
        for layer in model.model.layer:
            act = layer.mlp.act_fn
            if change == "replaced":
                layer.mlp.act_fn = torch.nn.ReLU()
            elif change == "forward":
                act.forward = lambda x, forward=act.forward: 2 * forward(x)
            elif change == "python_gelu":  # the same function to rounding: the module path, not the kernel
                act.act = act._gelu_python
        return model

    def patch_class():
        monkeypatch.setattr(GELUActivation, "forward", lambda self, x, f=GELUActivation.forward: 2 * f(self, x))

    _assert_module_path_after_a_plain_model(
        launches,
        changed,
        hidden_states,
        grid,
        patch_class if change == "class_forward" else None,
        changes_output=change != "python_gelu",  # the Python GELU is the same function to rounding
    )


def test_the_batch_kernel_choices_are_guarded(launches, monkeypatch):
    """`PackedBatch.fused_mlp` and `.attention` enter the compiled stack as fields of an argument, which
    Dynamo guards by value: a batch with another choice gets its own graph, not the last one's."""
    model = _model(None)
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 1)], model.num_prefix_tokens, "cpu")
    x = torch.randn(layout.num_tokens, CONFIG.hidden_size)
    batch = dataclasses.replace(model.packed_batch(layout), fused_mlp=True)
    # A second registered kernel (the exact one under another name) for the attention choice.
    monkeypatch.setitem(attention_ops._REGISTRY, "sdpa_copy", attention_ops._REGISTRY["sdpa"])
    stack = torch.compile(model.model.forward, fullgraph=True)
    graphs = compile_stats()["unique_graphs"]
    with torch.no_grad():
        fused, _ = stack(x, batch)
        assert (launches.counts["forward"], compile_stats()["unique_graphs"] - graphs) == (LAYERS, 1)
        unfused, _ = stack(x, dataclasses.replace(batch, fused_mlp=False))
        assert (launches.counts["forward"], compile_stats()["unique_graphs"] - graphs) == (LAYERS, 2)
        other_kernel, _ = stack(x, dataclasses.replace(batch, attention="sdpa_copy"))
        assert compile_stats()["unique_graphs"] - graphs == 3
    assert_close(unfused, fused)
    assert_close(other_kernel, fused)
