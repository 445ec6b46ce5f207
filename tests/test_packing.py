"""Packing helpers (`packing.py`): patch order, round trips, splitting, and the `PackedLayout` indices.

Index manipulations are compared exactly (torch.equal); model outputs with `conftest.assert_close`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, random_images, tiny_config

from dinov3_packing import PackedLayout, pack, patchify, random_packing_model, split, unpatchify


@pytest.mark.parametrize(("c", "h", "w", "p"), [(3, 2, 3, 16), (3, 1, 1, 14), (1, 3, 2, 8), (4, 2, 2, 2)])
def test_patchify_matches_spec_formula_and_element_order(c, h, w, p):
    image = torch.randn(c, h * p, w * p)
    rows = patchify(image, p)
    # The spec's formula, written out independently.
    spec = image.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)
    assert torch.equal(rows, spec)
    # And element by element: row = raster patch index, column = (patch_row, patch_col, channel).
    for i, j, py, px, ch in [(0, 0, 0, 0, 0), (h - 1, w - 1, p - 1, p - 1, c - 1), (h // 2, w - 1, p // 2, 1, c // 2)]:
        assert rows[i * w + j, (py * p + px) * c + ch] == image[ch, i * p + py, j * p + px]


def test_patchify_channels_last_not_channels_first():
    """A (C, p, p) flattening would put channel 1 of pixel (0, 0) at column p*p; (p, p, C) puts it at 1."""
    p = 4
    image = torch.zeros(3, p, p)
    image[1, 0, 0] = 1.0
    rows = patchify(image, p)
    assert rows[0, 1] == 1.0 and rows.sum() == 1.0


@pytest.mark.parametrize(("c", "h", "w", "p"), [(3, 2, 3, 16), (3, 1, 1, 16), (2, 4, 1, 8)])
def test_unpatchify_inverts_patchify(c, h, w, p):
    image = torch.randn(c, h * p, w * p)
    assert torch.equal(unpatchify(patchify(image, p), h, w, p), image)
    rows = torch.randn(h * w, p * p * c)
    assert torch.equal(patchify(unpatchify(rows, h, w, p), p), rows)


def test_pack_concatenates_images_and_clip_frames_in_order():
    p = 16
    images = random_images([(2, 3), (1, 1), (3, 2, 1)], p)
    hidden_states, grid = pack(images, p)
    assert grid.dtype == torch.long
    assert grid.tolist() == [[1, 2, 3], [1, 1, 1], [3, 2, 1]]
    frames = [images[0], images[1], *images[2]]
    assert torch.equal(hidden_states, torch.cat([patchify(f, p) for f in frames]))


def test_pack_split_round_trip():
    p = 8
    images = random_images([(2, 3), (1, 1), (2, 4, 1), (3, 3)], p, channels=2)
    hidden_states, grid = pack(images, p)
    maps = split(hidden_states, grid)
    assert [tuple(m.shape) for m in maps] == [(1, 2, 3, 128), (1, 1, 1, 128), (2, 4, 1, 128), (1, 3, 3, 128)]
    for img, m in zip(images, maps, strict=True):
        frames = img if img.ndim == 4 else img[None]
        t, h, w, _ = m.shape
        back = torch.stack([unpatchify(m[k].reshape(h * w, -1), h, w, p) for k in range(t)])
        assert torch.equal(back, frames)
    # split also accepts grid_thw as a list of rows.
    assert all(torch.equal(a, b) for a, b in zip(split(hidden_states, grid.tolist()), maps, strict=True))


def test_split_model_output_per_image():
    """split(last_hidden_state, grid) gives each image's [t, h, w, D] map, equal to that image run alone
    (conftest tolerance: a different batch composition may change BLAS blocking)."""
    model = random_packing_model(tiny_config(), seed=0).eval()
    images = random_images([(2, 3), (1, 1), (2, 1, 2)], model.patch_size, seed=1)
    hidden_states, grid = pack(images, model.patch_size)
    with torch.no_grad():
        maps = split(model(hidden_states, grid).last_hidden_state, grid)
        for img, m, (t, h, w) in zip(images, maps, grid.tolist(), strict=True):
            assert m.shape == (t, h, w, 32)
            alone = model(*pack([img], model.patch_size)).last_hidden_state
            assert_close(m.reshape(-1, 32), alone)


def test_split_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="packed"):
        split(torch.zeros(5, 4), torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize("num_prefix", [1, 5])
def test_packed_layout_invariants(num_prefix):
    grid = [(1, 2, 3), (1, 1, 1), (2, 2, 1), (1, 3, 3)]
    layout = PackedLayout.build(grid, num_prefix, "cpu")
    segment_hw = [(2, 3), (1, 1), (2, 1), (2, 1), (3, 3)]
    seq_lens = [num_prefix + h * w for h, w in segment_hw]
    assert layout.segment_hw == segment_hw
    assert layout.num_segments == 5
    assert layout.seq_lens == seq_lens
    assert layout.max_seqlen == max(seq_lens)
    assert layout.num_tokens == sum(seq_lens)
    assert layout.num_patches == sum(h * w for h, w in segment_hw)

    cu = layout.cu_seqlens
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, *torch.tensor(seq_lens).cumsum(0).tolist()]

    # Each segment is [CLS, registers..., patches in input order].
    expected_patch, expected_prefix = [], []
    for start, (h, w) in zip(cu[:-1].tolist(), segment_hw, strict=True):
        expected_prefix.append(list(range(start, start + num_prefix)))
        expected_patch.extend(range(start + num_prefix, start + num_prefix + h * w))
    assert layout.patch_index.dtype == torch.long and layout.prefix_index.dtype == torch.long
    assert layout.patch_index.tolist() == expected_patch
    assert layout.prefix_index.tolist() == expected_prefix
    # Together, prefix and patch positions cover every token exactly once.
    every = torch.cat([layout.prefix_index.flatten(), layout.patch_index]).sort().values
    assert torch.equal(every, torch.arange(layout.num_tokens))

    # token_source is a permutation that puts prefix row k and patch row r where the indices say.
    src = layout.token_source
    assert torch.equal(src.sort().values, torch.arange(layout.num_tokens))
    n_prefix_rows = layout.prefix_index.numel()
    assert torch.equal(src[layout.prefix_index.flatten()], torch.arange(n_prefix_rows))
    assert torch.equal(src[layout.patch_index], n_prefix_rows + torch.arange(layout.num_patches))


def test_embeddings_place_prefix_and_patch_rows():
    """The embedding gather puts CLS, registers, then the segment's patches, in input order."""
    model = random_packing_model(tiny_config(), seed=0).eval()
    emb = model.embeddings
    images = random_images([(1, 2), (2, 1, 1)], model.patch_size, seed=2)
    hidden_states, grid = pack(images, model.patch_size)
    layout = PackedLayout.build(grid.tolist(), model.num_prefix_tokens, "cpu")
    with torch.no_grad():
        tokens = emb(hidden_states, layout)
        conv = emb.patch_embeddings
        frames = [images[0][None], images[1]]
        ref_patches = torch.cat([conv(f).flatten(2).transpose(1, 2).reshape(-1, 32) for f in frames])
    assert tokens.shape == (3 * 5 + 4, 32)
    for s in range(3):
        start = int(layout.cu_seqlens[s])
        assert torch.equal(tokens[start], emb.cls_token[0, 0])
        assert torch.equal(tokens[start + 1 : start + 5], emb.register_tokens[0])
    assert_close(tokens[layout.patch_index], ref_patches)  # Linear vs HF's Conv2d: conftest tolerance


def build_with_torch_ops(grid: list[tuple[int, int, int]], num_prefix: int) -> dict[str, torch.Tensor]:
    """The index tensors of a layout computed with torch CPU ops (the implementation before numpy)."""
    segment_hw = [(h, w) for t, h, w in grid for _ in range(t)]
    seq_lens = [num_prefix + h * w for h, w in segment_hw]
    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + n)
    starts = torch.tensor(offsets[:-1], dtype=torch.long)
    patch_counts = torch.tensor([h * w for h, w in segment_hw], dtype=torch.long)
    seg_of_row = torch.repeat_interleave(torch.arange(len(segment_hw)), patch_counts)
    first_row = torch.cumsum(patch_counts, 0) - patch_counts
    row = torch.arange(int(patch_counts.sum()))
    patch_index = starts[seg_of_row] + num_prefix + (row - first_row[seg_of_row])
    prefix_index = starts[:, None] + torch.arange(num_prefix)[None, :]
    token_source = torch.empty(offsets[-1], dtype=torch.long)
    token_source[prefix_index.flatten()] = torch.arange(prefix_index.numel())
    token_source[patch_index] = prefix_index.numel() + row
    token_segment = torch.repeat_interleave(torch.arange(len(segment_hw)), torch.tensor(seq_lens))
    return {
        "cu_seqlens_host": torch.tensor(offsets, dtype=torch.int32),
        "patch_index": patch_index,
        "prefix_index": prefix_index,
        "token_source": token_source,
        "token_segment": token_segment,
    }


@pytest.mark.parametrize("num_prefix", [1, 5])
def test_packed_layout_equals_the_torch_ops_reference(num_prefix):
    """`PackedLayout.build` (numpy) against the torch-ops implementation it replaced
    (`build_with_torch_ops` above): same values, dtypes and shapes on random grids (t > 1, single
    segments, one-patch images)."""
    import random

    reference = build_with_torch_ops
    rng = random.Random(num_prefix)  # noqa: S311 - test grids, not cryptography
    grids = [[(1, 1, 1)], [(3, 2, 5)], [(1, 48, 48)] * 3]
    grids += [
        [(rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 9)) for _ in range(rng.randint(1, 12))]
        for _ in range(40)
    ]
    for grid in grids:
        got = PackedLayout.build(grid, num_prefix, "cpu")
        ref = reference(grid, num_prefix)
        for name, want in ref.items():
            have = getattr(got, name)
            assert have.dtype == want.dtype and torch.equal(have, want), (grid, name)
        assert torch.equal(got.cu_seqlens, ref["cu_seqlens_host"])
        assert got.num_tokens == int(ref["cu_seqlens_host"][-1])
        assert got.max_seqlen == int(ref["cu_seqlens_host"].diff().max())
