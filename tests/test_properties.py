"""Packing invariants as properties (hypothesis): no leakage between segments, rows stay aligned.

The tiny model (2 layers, width 32, 4 heads, 4 registers) is built once. Examples are derandomized and not
stored, so runs are reproducible and leave no files behind.
"""

from __future__ import annotations

import torch
from conftest import assert_close, random_images, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3_packing import pack, patchify, random_packing_model, reference_model, split, unpatchify

MODEL = random_packing_model(tiny_config(), seed=0).eval()
REF = reference_model(MODEL)
P, PREFIX = MODEL.patch_size, MODEL.num_prefix_tokens

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)
SIZE = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))  # (t, h, w) in patches


@st.composite
def packs(draw, min_size=1):
    """A list of (t, h, w) sizes, a seed for the pixels, and a permutation of the images."""
    sizes = draw(st.lists(SIZE, min_size=min_size, max_size=5))
    perm = draw(st.permutations(range(len(sizes))))
    return sizes, draw(st.integers(0, 2**16)), perm


def _images(sizes, seed):
    return random_images([(t, h, w) if t > 1 else (h, w) for t, h, w in sizes], P, seed=seed)


def _outputs(images):
    hidden_states, grid = pack(images, P)
    with torch.no_grad():
        out = MODEL(hidden_states, grid)
    frames = grid[:, 0].tolist()
    return split(out.last_hidden_state, grid), out.pooler_output.split(frames), out.register_tokens.split(frames)


@SETTINGS
@given(packs())
def test_image_output_independent_of_pack_and_order(case):
    """Image i's patches, CLS and registers in a shuffled pack equal Hugging Face run on image i alone
    (conftest tolerance: rel 1e-5, cosine 0.99999)."""
    sizes, seed, perm = case
    images = _images(sizes, seed)
    patches, cls, regs = _outputs([images[i] for i in perm])
    for pos, i in enumerate(perm):
        img = images[i]
        with torch.no_grad():
            ref = REF(img if img.ndim == 4 else img[None]).last_hidden_state
        t, h, w = sizes[i]
        assert patches[pos].shape == (t, h, w, 32)
        assert_close(patches[pos].reshape(t, h * w, 32), ref[:, PREFIX:])
        assert_close(cls[pos], ref[:, 0])
        assert_close(regs[pos], ref[:, 1:PREFIX])


@SETTINGS
@given(packs(min_size=2), st.data())
def test_no_leakage_between_segments(case, data):
    """Changing every pixel of one image leaves every other image's output bit-identical: the same
    operations run on the same rows, so anything but exact equality would be information leaking across."""
    sizes, seed, _ = case
    changed = data.draw(st.integers(0, len(sizes) - 1))
    images = _images(sizes, seed)
    before = _outputs(images)
    images[changed] = torch.randn_like(images[changed]) * 3
    after = _outputs(images)
    for kind_before, kind_after in zip(before, after, strict=True):
        for i, (b, a) in enumerate(zip(kind_before, kind_after, strict=True)):
            if i == changed:
                assert not torch.equal(a, b)
            else:
                assert torch.equal(a, b), f"image {i} changed when image {changed} did"


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(
    st.lists(SIZE, min_size=1, max_size=6),
    st.sampled_from([1, 2, 4, 8, 14, 16]),
    st.integers(1, 4),
)
def test_pack_split_unpatchify_round_trip(sizes, p, channels):
    """split(pack(images)) gives each image's patches back; unpatchify restores every pixel exactly."""
    images = random_images([(t, h, w) if t > 1 else (h, w) for t, h, w in sizes], p, channels=channels)
    hidden_states, grid = pack(images, p)
    assert hidden_states.shape == (sum(t * h * w for t, h, w in sizes), p * p * channels)
    assert grid.tolist() == [list(s) for s in sizes]
    for img, m, (t, h, w) in zip(images, split(hidden_states, grid), sizes, strict=True):
        frames = img if img.ndim == 4 else img[None]
        assert m.shape == (t, h, w, p * p * channels)
        for k in range(t):
            rows = m[k].reshape(h * w, -1)
            assert torch.equal(rows, patchify(frames[k], p))
            assert torch.equal(unpatchify(rows, h, w, p), frames[k])
