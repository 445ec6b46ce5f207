"""The CPU inference path: the block stack run over chunks of whole segments (`cpu_chunk_tokens`).

References: the same model with chunking off (`cpu_chunk_tokens = None`, one pass over the whole pack) and
Hugging Face `DINOv3ViTModel` run image by image with the same weights, fp32 on CPU.
Tolerances: against Hugging Face, `conftest.assert_close` (1e-5 relative, the parity tolerance of
test_modeling_parity.py). Chunked against unchunked, 1e-6 relative: both run the same fp32 operations in
the same order; only the row count of each GEMM changes, which can move the BLAS kernel's blocking (and a
result by an ulp) when a chunk is a few rows tall.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close, random_images, reference_per_image, tiny_config

from dinov3_packing import load_packing_model, pack, random_packing_model, reference_model, split
from dinov3_packing.data.files import load_at_patch_multiple, sample_image_paths
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.compile import compile_model, compile_stats

CHUNK_TOL = 1e-6
# Sizes in patches: non-square both ways, a 1x1 grid, a 2-frame clip, equal sizes next to each other (a run
# of equal-length segments that a chunk boundary can cut).
SIZES = [(2, 3), (1, 1), (3, 2), (2, 2, 1), (2, 2), (2, 2), (3, 3), (1, 4)]


def _outputs(model, hs, grid, chunk_tokens, **kwargs):
    model.cpu_chunk_tokens = chunk_tokens
    with torch.inference_mode():
        return model(hs, grid, **kwargs)


def test_chunks_cover_the_sequence_in_whole_segments_within_budget():
    """`PackedBatch.chunked`: consecutive token slices covering every token once, each of whole segments and
    at most the budget unless one segment is larger, with the chunk's own layout and RoPE rows."""
    model = random_packing_model(tiny_config()).eval()
    grid = [(1, 2, 3), (1, 1, 1), (1, 6, 6), (2, 2, 2), (1, 1, 2)]
    layout = PackedLayout.build(grid, model.num_prefix_tokens, "cpu")
    batch = model.packed_batch(layout)
    budget = 20
    chunks = batch.chunked(budget)
    starts = layout.cu_seqlens_host.tolist()
    assert chunks[0].tokens.start == 0 and chunks[-1].tokens.stop == layout.num_tokens
    for a, b in itertools.pairwise(chunks):
        assert a.tokens.stop == b.tokens.start
    for c in chunks:
        assert c.tokens.start in starts and c.tokens.stop in starts  # whole segments
        sub = c.batch.layout
        n = c.tokens.stop - c.tokens.start
        assert sub.num_tokens == n
        assert n <= budget or sub.num_segments == 1
        first = starts.index(c.tokens.start)
        assert sub.segment_hw == layout.segment_hw[first : first + sub.num_segments]
        assert torch.equal(c.batch.cos, batch.cos[c.tokens]) and torch.equal(c.batch.sin, batch.sin[c.tokens])
        assert c.batch.chunks == () and c.batch.attention == batch.attention
    # Greedy: a chunk ends only where its next segment would overflow the budget.
    for a, b in itertools.pairwise(chunks):
        next_len = b.batch.layout.seq_lens[0]
        assert a.tokens.stop - a.tokens.start + next_len > budget
    assert batch.chunked(layout.num_tokens) == ()


@pytest.mark.parametrize("chunk_tokens", [1, 12, 40])
def test_chunked_equals_unchunked(chunk_tokens):
    """Every output, all hidden states and a selected layer with masked rows, chunked vs one pass (1e-6:
    see the module docstring); budgets of one segment per chunk, a few, and most of the pack."""
    model = random_packing_model(tiny_config(num_hidden_layers=3), seed=2).eval()
    hs, grid = pack(random_images(SIZES, 16, seed=3), 16)
    masked = torch.zeros(hs.shape[0], dtype=torch.bool)
    masked[::5] = True
    for kwargs in ({"output_hidden_states": True}, {"select_layer": -2, "bool_masked_pos": masked}):
        whole = _outputs(model, hs, grid, None, **kwargs)
        model.cpu_chunk_tokens = chunk_tokens
        batch = model.packed_batch(whole.layout)
        assert len(batch.chunks) > 1, "the budget should split this pack"
        chunked = _outputs(model, hs, grid, chunk_tokens, **kwargs)
        for name in ("last_hidden_state", "pooler_output", "register_tokens"):
            assert_close(getattr(chunked, name), getattr(whole, name), rel_tol=CHUNK_TOL)
        for got, ref in zip(chunked.hidden_states or (), whole.hidden_states or (), strict=True):
            assert_close(got, ref, rel_tol=CHUNK_TOL)


def test_chunked_matches_hugging_face_per_image_on_photographs():
    """random:vits16 (the released ViT-S/16 architecture) on the bundled photographs at native size, cycled
    to a pack the default budget splits, chunked by the default budget and by smaller ones, vs Hugging Face
    per image (parity tolerance)."""
    model = load_packing_model("random:vits16@3")
    ref = reference_model(model)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    photos = [load_at_patch_multiple(p, 16, mean, std) for p in sample_image_paths()]
    images = [photos[i % len(photos)] for i in range(12)]
    hs, grid = pack(images, 16)
    refs = reference_per_image(ref, images)
    prefix = model.num_prefix_tokens
    layout = PackedLayout.build(grid.tolist(), prefix, "cpu")
    for budget in (model.cpu_chunk_tokens, 600, 100):
        model.cpu_chunk_tokens = budget
        assert len(model.packed_batch(layout).chunks) > 1, f"budget {budget} should split the pack"
        out = _outputs(model, hs, grid, budget)
        for got, r in zip(split(out.last_hidden_state, grid), refs, strict=True):
            assert_close(got.reshape(-1, got.shape[-1]), r.last_hidden_state[0, prefix:])
        assert_close(out.pooler_output, torch.cat([r.pooler_output for r in refs]))
        assert_close(out.register_tokens, torch.cat([r.last_hidden_state[:, 1:prefix] for r in refs]))


def test_chunks_only_for_cpu_eval_inference():
    """Chunks are planned for eval-mode inference only: autograd and training mode run the whole pack (drop
    path and RoPE augmentation draw per segment in sequence order)."""
    model = random_packing_model(tiny_config()).eval()
    model.cpu_chunk_tokens = 10
    layout = PackedLayout.build([(1, 2, 2), (1, 3, 3), (1, 1, 1)], model.num_prefix_tokens, "cpu")
    assert len(model.packed_batch(layout, inference=True).chunks) == 3
    assert model.packed_batch(layout, inference=False).chunks == ()
    model.train()
    assert model.packed_batch(layout, inference=True).chunks == ()
    model.eval()
    model.cpu_chunk_tokens = None
    assert model.packed_batch(layout, inference=True).chunks == ()


def test_gradients_unchanged_by_the_chunk_budget():
    """A forward that autograd records ignores the budget: gradients equal those with chunking off."""
    grads = []
    for budget in (None, 10):
        model = random_packing_model(tiny_config(), seed=4).eval()
        model.cpu_chunk_tokens = budget
        hs, grid = pack(random_images(SIZES, 16, seed=5), 16)
        model(hs, grid).last_hidden_state.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # the mask token gets no gradient
    assert any(g is not None for g in grads[0])


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "2048"])
def test_bad_chunk_budget_names_the_attribute(value):
    model = random_packing_model(tiny_config())
    with pytest.raises(ValueError, match="cpu_chunk_tokens: expected a positive int or None"):
        model.cpu_chunk_tokens = value


def test_compiled_stack_runs_the_whole_pack_and_never_recompiles():
    """A compiled stack on the CPU takes the whole sequence whatever the chunk plan (the chunk count never
    enters the graph): equal to eager chunked output, no new graph after the two warm-up packs."""
    torch._dynamo.reset()
    cfg = tiny_config(num_hidden_layers=2)
    eager = random_packing_model(cfg, seed=0).eval()
    compiled = compile_model(random_packing_model(cfg, seed=0).eval())
    eager.cpu_chunk_tokens = compiled.cpu_chunk_tokens = 12
    packs = [SIZES, SIZES[2:], [(3, 3), (1, 2), (2, 1), (2, 2)], SIZES[:5]]
    graphs = []
    for i, sizes in enumerate(packs):
        hs, grid = pack(random_images(sizes, 16, seed=10 + i), 16)
        with torch.inference_mode():
            assert_close(compiled(hs, grid).last_hidden_state, eager(hs, grid).last_hidden_state)
        graphs.append(compile_stats()["unique_graphs"])
    assert graphs[-1] == graphs[1], f"recompiled after warm-up: graphs per pack {graphs}"
