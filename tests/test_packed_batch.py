"""`PackedBatch`: what is computed once per forward, not once per layer.

- the runs of equal-length segments (`PackedLayout.equal_runs_host`) that the exact SDPA path loops over;
- the fused q/k/v weight, cached for inference and rebuilt whenever a projection changes (reference: a fresh
  model with the changed weights, run eagerly; fp32, tolerance 1e-6 relative from conftest.assert_close,
  the same ops in the same order);
- one `PackedBatch` per forward, handed to every block.
"""

from __future__ import annotations

import torch
from conftest import assert_close, tiny_config

from dinov3_packing import pack, random_packing_model
from dinov3_packing.model.layers import DINOv3ViTPackedAttention, DINOv3ViTPackedLayer
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.compile import compile_model, compile_stats


def _inputs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack([torch.randn(3, h, w, generator=g) for h, w in sizes], 16)


def test_equal_runs_list_each_run_of_equal_length_segments():
    layout = PackedLayout.build([(1, 2, 3), (1, 3, 2), (2, 1, 1), (1, 4, 1), (1, 1, 1)], num_prefix=5, device="cpu")
    # Segment lengths: 11, 11, 6, 6, 9, 6 -> runs (start, count, length).
    assert layout.equal_runs_host.view(-1, 3).tolist() == [[0, 2, 11], [22, 2, 6], [34, 1, 9], [43, 1, 6]]
    assert layout.equal_runs_host.ndim == 1  # never a size-1 dim for torch.compile to specialise on


def test_fused_qkv_is_cached_for_inference_and_concatenated_under_autograd(monkeypatch):
    model = random_packing_model(tiny_config(num_hidden_layers=2), seed=0).eval()
    hs, grid = _inputs([(32, 48), (16, 16)])
    calls = []
    original = DINOv3ViTPackedAttention.qkv_weight_bias
    monkeypatch.setattr(DINOv3ViTPackedAttention, "qkv_weight_bias", lambda self: calls.append(1) or original(self))
    with torch.no_grad():
        first = model(hs, grid).last_hidden_state
        built = len(calls)
        second = model(hs, grid).last_hidden_state
    assert built == 2 and len(calls) == 2  # built once per layer, then reused
    assert torch.equal(first, second)
    model(hs, grid).last_hidden_state.sum().backward()  # grad mode: concatenated in the graph
    assert len(calls) == 4
    assert model.model.layer[0].attention.q_proj.weight.grad is not None


def test_cached_qkv_follows_in_place_weight_changes():
    """load_state_dict and optimizer steps change the projections in place: the next inference forward
    must use the new weights."""
    cfg = tiny_config(num_hidden_layers=2)
    model = random_packing_model(cfg, seed=0).eval()
    other = random_packing_model(cfg, seed=1).eval()
    hs, grid = _inputs([(32, 48), (16, 16), (48, 16)])
    with torch.no_grad():
        model(hs, grid)
        model.load_state_dict(other.state_dict())
        assert_close(model(hs, grid).last_hidden_state, other(hs, grid).last_hidden_state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(hs, grid).last_hidden_state.square().mean().backward()
    opt.step()
    model.eval()
    fresh = random_packing_model(cfg, seed=0).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(model(hs, grid).last_hidden_state, fresh(hs, grid).last_hidden_state)


def test_compiled_model_sees_weight_changes_without_recompiling():
    torch._dynamo.reset()
    cfg = tiny_config(num_hidden_layers=2)
    model = compile_model(random_packing_model(cfg, seed=0).eval())
    other = random_packing_model(cfg, seed=3).eval()
    packs = [_inputs([(32, 32), (16, 48)], 0), _inputs([(64, 48), (16, 16)], 1), _inputs([(48, 16)] * 3, 2)]
    with torch.no_grad():
        for hs, grid in packs[:2]:  # warm-up: first pack and a new longest image
            model(hs, grid)
        graphs = compile_stats()["unique_graphs"]
        model.load_state_dict(other.state_dict())
        hs, grid = packs[2]
        assert_close(model(hs, grid).last_hidden_state, other(hs, grid).last_hidden_state)
    assert compile_stats()["unique_graphs"] == graphs


def test_one_batch_object_reaches_every_block(monkeypatch):
    model = random_packing_model(tiny_config(num_hidden_layers=3), seed=0).eval()
    hs, grid = _inputs([(32, 48), (16, 16)])
    seen = []
    original = DINOv3ViTPackedLayer.forward
    monkeypatch.setattr(
        DINOv3ViTPackedLayer, "forward", lambda self, x, batch: seen.append(batch) or original(self, x, batch)
    )
    with torch.no_grad():
        model(hs, grid)
        model(hs, grid)
    assert len(seen) == 6
    assert all(b is seen[0] for b in seen[:3]) and all(b is seen[3] for b in seen[3:]) and seen[0] is not seen[3]
    assert seen[0].attention == "sdpa" and seen[0].inference and seen[0].cos.shape[0] == seen[0].layout.num_tokens
