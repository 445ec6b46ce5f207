"""torch.compile of the packed model (compile.compile_model), on CPU.

Reference: the same model run eagerly (which itself matches Hugging Face, test_modeling_parity.py).
Tolerance: fp32 1e-5 relative (conftest.assert_close): inductor may reorder fp32 reductions.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_config

from dinov3_packing import pack, random_packing_model
from dinov3_packing.parallel.compile import compile_model, compile_stats

# Packs of different sizes, numbers of images and longest image; the first two are the warm-up.
PACKS = [
    [(32, 32), (16, 48)],
    [(64, 48), (16, 16)],
    [(16, 16), (32, 32), (48, 16)],
    [(80, 64), (16, 16), (32, 48), (16, 32)],
    [(96, 16)],
    [(48, 48), (48, 48)],
]


def _pack(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return pack([torch.randn(3, h, w, generator=g) for h, w in sizes], 16)


@pytest.mark.parametrize("scope", ["stack", "block"])
def test_compiled_equals_eager_and_never_recompiles_after_warmup(scope):
    torch._dynamo.reset()
    cfg = tiny_config(num_hidden_layers=3)
    eager = random_packing_model(cfg, seed=0).eval()
    compiled = compile_model(random_packing_model(cfg, seed=0).eval(), scope=scope)
    graphs = []
    with torch.no_grad():
        for i, sizes in enumerate(PACKS):
            hs, grid = _pack(sizes, i)
            assert_close(compiled(hs, grid).last_hidden_state, eager(hs, grid).last_hidden_state)
            graphs.append(compile_stats()["unique_graphs"])
    assert graphs[1] >= 1
    # After the warm-up packs, new sizes, counts and longest images reuse the compiled graphs.
    assert graphs[-1] == graphs[1], f"recompiled after warm-up: graphs per pack {graphs}"


def test_compiled_training_step_gradients_equal_eager():
    torch._dynamo.reset()
    cfg = tiny_config(num_hidden_layers=2, use_gated_mlp=True, hidden_act="silu")
    grads = []
    for do_compile in (False, True):
        model = random_packing_model(cfg, seed=1).train()
        if do_compile:
            compile_model(model)
        hs, grid = _pack([(32, 48), (16, 16), (48, 32)], 7)
        x = hs.clone().requires_grad_()
        out = model(x, grid, rope_generator=torch.Generator().manual_seed(3))
        (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None} | {"input": x.grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name])


def test_compile_model_rejects_other_modules():
    with pytest.raises(TypeError, match="model"):
        compile_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dynamic"):
        compile_model(random_packing_model(tiny_config(), seed=0), dynamic="some")
    with pytest.raises(ValueError, match="scope"):
        compile_model(random_packing_model(tiny_config(), seed=0), scope="layer")


def test_compiled_training_with_drop_path_and_rope_augmentation_runs_without_recompiling():
    # Drop path draws inside the compiled graph (a different RNG stream than eager), so values are not
    # compared with eager; the test is that training compiles for a bounded set of packs and stays finite.
    # Warm-up here is three packs: drop path draws one number per segment, so a single-segment pack (a
    # size-1 draw) gets its own graph (compile.py says so).
    torch._dynamo.reset()
    model = compile_model(random_packing_model(tiny_config(drop_path_rate=0.5), seed=2).train())
    packs = [PACKS[0], PACKS[4], PACKS[1], PACKS[2], PACKS[3], PACKS[5], [(16, 48)], [(32, 32), (48, 16)]]
    graphs = []
    for i, sizes in enumerate(packs):
        hs, grid = _pack(sizes, 20 + i)
        out = model(hs.clone().requires_grad_(), grid)
        loss = out.last_hidden_state.square().mean() + out.pooler_output.square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        graphs.append(compile_stats()["unique_graphs"])
    assert graphs[-1] == graphs[2], f"recompiled after warm-up: graphs per pack {graphs}"
