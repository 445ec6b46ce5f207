"""Parity of `DINOv3ViTPackingModel` with Hugging Face `DINOv3ViTModel` run image by image.

Reference: `transformers.DINOv3ViTModel` with the same weights (`reference_model`), one forward per image
(a clip's frames as one batch), fp32 on CPU. Tolerance: `conftest.assert_close` (max |diff| / max |ref|
<= 1e-5, every token's cosine >= 0.99999): both models compute the same fp32 operations in a different
summation order (fused q/k/v GEMM, patch embedding as a Linear), which moves results by ~1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, random_images, reference_per_image, tiny_config

from dinov3_packing import load_packing_model, pack, random_packing_model, reference_model, split
from dinov3_packing.data.files import load_at_patch_multiple, sample_image_paths

# Each config changes one thing from the tiny default (width 32, 4 heads of 8, 4 registers, GELU, patch 16).
CONFIGS = {
    "default": {},
    "no-registers": {"num_register_tokens": 0},
    "swiglu": {"use_gated_mlp": True, "hidden_act": "silu", "intermediate_size": 48},
    "head-dim-32": {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 96},
    "head-dim-64": {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 128, "num_hidden_layers": 1},
    "width-48-6-heads": {"hidden_size": 48, "num_attention_heads": 6, "intermediate_size": 96},
    "key-bias-no-qv-bias": {"key_bias": True, "query_bias": False, "value_bias": False},
    "patch-8": {"patch_size": 8, "image_size": 16},
    "patch-14-swiglu-no-registers": {
        "patch_size": 14,
        "image_size": 28,
        "num_register_tokens": 0,
        "use_gated_mlp": True,
        "hidden_act": "silu",
    },
    "3-layers-1-channel": {"num_hidden_layers": 3, "num_channels": 1},
}

# Sizes in patches: non-square both ways, a 1x1 grid, a 2-frame clip and a 3-frame 1x1 clip.
MIXED = [(2, 3), (1, 1), (3, 2), (2, 2, 1), (2, 2), (3, 1, 1)]


def _model(name: str, seed: int = 0):
    config = tiny_config(**CONFIGS[name])
    model = random_packing_model(config, seed=seed).eval()
    return model, reference_model(model)


def _run(model, images, **kwargs):
    hidden_states, grid = pack(images, model.patch_size)
    with torch.no_grad():
        return model(hidden_states, grid, **kwargs), grid


def _ref_parts(ref_out, prefix: int, state: torch.Tensor | None = None):
    """(patch rows [t*h*w, D], CLS [t, D], registers [t, R, D]) of one image from HF tokens [t, N, D]."""
    tokens = ref_out.last_hidden_state if state is None else state
    return tokens[:, prefix:].reshape(-1, tokens.shape[-1]), tokens[:, 0], tokens[:, 1:prefix]


def _assert_registers(got: torch.Tensor, ref: torch.Tensor):
    assert got.shape == ref.shape
    if ref.numel():  # zero-register configs: the shape [S, 0, D] is all there is to check
        assert_close(got, ref)


def _check_outputs(out, refs, grid, prefix: int, layer: int | None = None):
    """Compare packed outputs with HF's (after the final norm, or HF hidden_states[layer] if given)."""
    got_maps = split(out.last_hidden_state, grid)
    states = [None if layer is None else r.hidden_states[layer] for r in refs]
    parts = [_ref_parts(r, prefix, s) for r, s in zip(refs, states, strict=True)]
    for got, (patches, _, _) in zip(got_maps, parts, strict=True):
        assert_close(got.reshape(-1, got.shape[-1]), patches)
    assert_close(out.pooler_output, torch.cat([cls for _, cls, _ in parts]))
    _assert_registers(out.register_tokens, torch.cat([reg for _, _, reg in parts]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_mixed_pack(name):
    """All outputs of one packed forward over mixed sizes equal HF per image (see module docstring)."""
    model, ref = _model(name)
    prefix, layers = model.num_prefix_tokens, model.config.num_hidden_layers
    images = random_images(MIXED, model.patch_size, seed=1, channels=model.config.num_channels)
    out, grid = _run(model, images, output_hidden_states=True)
    refs = reference_per_image(ref, images, output_hidden_states=True)

    assert out.last_hidden_state.shape == (int(grid.prod(1).sum()), model.config.hidden_size)
    assert out.pooler_output.shape[0] == int(grid[:, 0].sum())  # one CLS per frame
    _check_outputs(out, refs, grid, prefix)
    # pooler_output is HF's pooler_output (CLS after the final norm).
    assert_close(out.pooler_output, torch.cat([r.pooler_output for r in refs]))

    assert len(out.hidden_states) == layers + 1
    for i, state in enumerate(out.hidden_states):
        got_maps = split(state, grid)
        for got, r in zip(got_maps, refs, strict=True):
            assert_close(got.reshape(-1, got.shape[-1]), _ref_parts(r, prefix, r.hidden_states[i])[0])


@pytest.mark.parametrize("name", ["default", "no-registers", "swiglu", "patch-8", "3-layers-1-channel"])
@pytest.mark.parametrize("layer", [-2, 0, -1])
def test_parity_select_layer(name, layer):
    """select_layer: HF hidden_states[layer] patch tokens, CLS and registers, without the final norm."""
    model, ref = _model(name)
    images = random_images(MIXED, model.patch_size, seed=2, channels=model.config.num_channels)
    out, grid = _run(model, images, select_layer=layer)
    refs = reference_per_image(ref, images, output_hidden_states=True)
    _check_outputs(out, refs, grid, model.num_prefix_tokens, layer=layer)
    assert out.hidden_states is None


def test_select_layer_equals_hidden_states_entry():
    """Every valid select_layer (positive and negative spelling) gives exactly the matching hidden state."""
    model, _ = _model("3-layers-1-channel")
    images = random_images(MIXED, model.patch_size, seed=3, channels=1)
    full, _ = _run(model, images, output_hidden_states=True)
    n = model.config.num_hidden_layers + 1
    for layer in range(-n, n):
        out, _ = _run(model, images, select_layer=layer)
        torch.testing.assert_close(out.last_hidden_state, full.hidden_states[layer], rtol=0, atol=0)
        both, _ = _run(model, images, select_layer=layer, output_hidden_states=True)
        torch.testing.assert_close(both.last_hidden_state, full.hidden_states[layer], rtol=0, atol=0)
        assert len(both.hidden_states) == n
    # The last hidden state is the final output before the norm: normed, it is last_hidden_state.
    torch.testing.assert_close(model.norm(full.hidden_states[-1]), full.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["default", "no-registers", "patch-14-swiglu-no-registers"])
@pytest.mark.parametrize(
    "sizes",
    [[(1, 1)], [(3, 5)], [(4, 2, 3)], [(2, 2)] * 5],
    ids=["one-1x1", "one-3x5", "one-clip-t4", "five-equal"],
)
def test_parity_single_and_uniform(name, sizes):
    """One image (1x1, non-square, a clip) and a uniform pack vs HF per image (module tolerance)."""
    model, ref = _model(name, seed=5)
    images = random_images(sizes, model.patch_size, seed=4)
    out, grid = _run(model, images)
    _check_outputs(out, reference_per_image(ref, images), grid, model.num_prefix_tokens)


def test_parity_bool_masked_pos():
    """Masked rows take the mask token, as HF's bool_masked_pos does per image (module tolerance)."""
    model, ref = _model("default", seed=6)
    images = random_images([(2, 3), (1, 1), (2, 2, 2)], model.patch_size, seed=5)
    hidden_states, grid = pack(images, model.patch_size)
    mask = torch.rand(hidden_states.shape[0], generator=torch.Generator().manual_seed(0)) < 0.4
    assert 0 < int(mask.sum()) < mask.numel()
    with torch.no_grad():
        out = model(hidden_states, grid, bool_masked_pos=mask)
    masks = [m.reshape(t, h * w) for m, (t, h, w) in zip(split(mask[:, None], grid), grid.tolist(), strict=True)]
    refs = [ref(img if img.ndim == 4 else img[None], bool_masked_pos=m) for img, m in zip(images, masks, strict=True)]
    _check_outputs(out, refs, grid, model.num_prefix_tokens)
    unmasked, _ = _run(model, images)
    assert not torch.allclose(out.last_hidden_state, unmasked.last_hidden_state)


def test_parity_real_photographs():
    """The bundled photographs at native aspect, packed together, vs HF per image on random:vits16
    (the released ViT-S/16 architecture; module tolerance)."""
    model = load_packing_model("random:vits16@1")
    ref = reference_model(model)
    paths = sample_image_paths()
    assert len(paths) >= 3
    images = [load_at_patch_multiple(p, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for p in paths]
    assert len({tuple(img.shape) for img in images}) > 1, "the photographs should have different sizes"
    out, grid = _run(model, images)
    _check_outputs(out, reference_per_image(ref, images), grid, model.num_prefix_tokens)
