"""The LLaVA vision tower against Hugging Face hidden states.

Reference: `transformers.DINOv3ViTModel` (same weights) per image with `output_hidden_states=True`;
the tower's default layer -2 is HF `hidden_states[-2]` (before the final norm). Tolerance:
`conftest.assert_close` (1e-5 relative, fp32): same operations, other summation order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_config

from dinov3_packing import pack, random_packing_model, reference_model
from dinov3_packing.apps.tower import DINOv3VisionTower


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((*s[:-2], 3, s[-2] * 16, s[-1] * 16), generator=g) for s in sizes]


@pytest.fixture(scope="module")
def model():
    return random_packing_model(tiny_config(num_hidden_layers=3), seed=0).eval()


def _hf_states(model, images, layer):
    ref = reference_model(model)
    with torch.no_grad():
        return [
            ref(img if img.ndim == 4 else img[None], output_hidden_states=True).hidden_states[layer] for img in images
        ]


SIZES = [(2, 4), (4, 2), (2, 2, 2)]


@pytest.mark.parametrize("layer", [-2, 1, 0])
def test_patch_features_equal_hf_hidden_states(model, layer):
    images = _images(SIZES)
    feats = DINOv3VisionTower(model, select_layer=layer)(images)
    for got, ref in zip(feats, _hf_states(model, images, layer), strict=True):
        assert_close(got, ref[:, model.num_prefix_tokens :].reshape(-1, ref.shape[-1]))


def test_final_layer_is_normed_output(model):
    images = _images(SIZES)
    ref = reference_model(model)
    feats = DINOv3VisionTower(model, select_layer=None, keep_prefix=True)(images)
    with torch.no_grad():
        for got, img in zip(feats, images, strict=True):
            want = ref(img if img.ndim == 4 else img[None]).last_hidden_state
            assert_close(got, want.reshape(-1, want.shape[-1]))


def test_keep_prefix_and_packed_input(model):
    """CLS + registers + patches per frame, frame after frame; packed input gives the same as images."""
    images = _images(SIZES, seed=1)
    tower = DINOv3VisionTower(model, keep_prefix=True)
    feats = tower(images)
    hidden_states, grid = pack(images, 16)
    packed_feats = tower(hidden_states=hidden_states, grid_thw=grid)
    for got, again, ref in zip(feats, packed_feats, _hf_states(model, images, -2), strict=True):
        assert_close(got, ref.reshape(-1, ref.shape[-1]))
        assert torch.equal(got, again)


def test_merge_2x2_raster_order(model):
    """Each merged feature is the concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1),
    merged features in raster order over the (h/2, w/2) grid, frame after frame."""
    images = _images(SIZES, seed=2)
    tower = DINOv3VisionTower(model, merge=True)
    feats = tower(images)
    d = model.config.hidden_size
    assert tower.hidden_size == 4 * d
    for got, ref, size in zip(feats, _hf_states(model, images, -2), SIZES, strict=True):
        t, h, w = (1, *size) if len(size) == 2 else size
        grid = ref[:, model.num_prefix_tokens :].reshape(t, h, w, d)
        want = [
            torch.cat(
                [
                    grid[f, 2 * i, 2 * j],
                    grid[f, 2 * i, 2 * j + 1],
                    grid[f, 2 * i + 1, 2 * j],
                    grid[f, 2 * i + 1, 2 * j + 1],
                ]
            )
            for f in range(t)
            for i in range(h // 2)
            for j in range(w // 2)
        ]
        assert_close(got, torch.stack(want))


def test_merge_with_prefix_returns_prefix_separately(model):
    images = _images(SIZES, seed=3)
    merged, prefix = DINOv3VisionTower(model, merge=True, keep_prefix=True)(images)
    assert [m.shape[0] for m in merged] == [2, 2, 2]
    for got, ref in zip(prefix, _hf_states(model, images, -2), strict=True):
        assert_close(got, ref[:, : model.num_prefix_tokens].reshape(-1, ref.shape[-1]))


def test_merge_rejects_odd_grids(model):
    tower = DINOv3VisionTower(model, merge=True)
    with pytest.raises(ValueError, match=r"grid_thw: image 1 has grid \(t, h, w\) = \(1, 3, 2\).*32 px"):
        tower(_images([(2, 2), (3, 2)]))


def test_frozen_and_trainable(model):
    frozen = DINOv3VisionTower(random_packing_model(tiny_config(), seed=1))
    frozen.train()
    assert not frozen.training and not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    out = frozen(_images([(2, 2)]))[0]
    assert not out.requires_grad

    trainable = DINOv3VisionTower(random_packing_model(tiny_config(), seed=1), trainable=True)
    trainable.train()
    assert trainable.model.training
    trainable(_images([(2, 2)]))[0].sum().backward()
    # Layer -2 is the input of the last block: the last block and the final norm are skipped entirely.
    last = f"model.model.layer.{trainable.model.config.num_hidden_layers - 1}."
    for name, p in trainable.named_parameters():
        unused = name.startswith((last, "model.norm.")) or "mask_token" in name
        assert (p.grad is None) == unused, name


def test_dtype_and_device(model):
    """Inputs of another dtype are cast to the tower's; bf16 towers return bf16 close to fp32."""
    fp32 = DINOv3VisionTower(random_packing_model(tiny_config(), seed=2))
    bf16 = DINOv3VisionTower(random_packing_model(tiny_config(), seed=2), dtype=torch.bfloat16, device="cpu")
    images = _images([(2, 2)])
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"
    got = bf16([images[0].double()])[0]
    want = fp32(images)[0]
    assert got.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(got.float(), want, dim=-1)
    assert cos.min() > 0.99  # bf16 rounding, not a parity claim


def test_bad_input(model):
    tower = DINOv3VisionTower(model)
    with pytest.raises(ValueError, match="images: pass either"):
        tower()
    with pytest.raises(ValueError, match="grid_thw: required"):
        tower(hidden_states=torch.zeros(4, 768))
    with pytest.raises(ValueError, match="select_layer"):
        DINOv3VisionTower(model, select_layer=9)
    with pytest.raises(TypeError, match="model:"):
        DINOv3VisionTower(object())
