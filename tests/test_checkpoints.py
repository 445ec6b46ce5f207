"""Checkpoint resolution (`checkpoints.py`, `archs.py`): formats, key layouts, random architectures, aliases.

Loading is checked exactly: every tensor of the loaded state dict equals the saved one (torch.equal), and
outputs of a reloaded model equal the original's bit for bit (same weights, same code, same input).
Parity with Hugging Face uses `conftest.assert_close` (rel 1e-5, cosine 0.99999; see conftest).
"""

from __future__ import annotations

import functools
import logging
import time

import pytest
import torch
from conftest import assert_close, random_images, reference_per_image, tiny_config
from safetensors.torch import save_file
from transformers import DINOv3ViTModel

import dinov3_packing.weights.load as checkpoints
from dinov3_packing import (
    DINOv3ViTPackingModel,
    arch_config,
    load_packing_model,
    pack,
    random_packing_model,
    reference_model,
)


def _state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _forward(model, images):
    with torch.no_grad():
        return model(*pack(images, model.patch_size)).last_hidden_state


@functools.cache
def _released(arch: str) -> DINOv3ViTPackingModel:
    """random:<arch>@3, built once per module (read only: tests must not modify it)."""
    return load_packing_model(f"random:{arch}@3")


def _keys_456(state: dict) -> dict:
    """The transformers 4.56 Hub layout: blocks under `layer.N` instead of `model.layer.N`."""
    out = {(k[len("model.") :] if k.startswith("model.layer.") else k): v.contiguous() for k, v in state.items()}
    assert any(k.startswith("layer.0.") for k in out) and not any(k.startswith("model.") for k in out)
    return out


@pytest.fixture(scope="module")
def tiny_model():
    return random_packing_model(tiny_config(num_register_tokens=4), seed=11).eval()


@pytest.fixture(scope="module")
def images():
    return random_images([(2, 3), (1, 1), (2, 2, 1)], 16, seed=3)


# --- save / load -------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tiny_model, images, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    expected = _forward(tiny_model, images)
    for loaded in (load_packing_model(str(tmp_path)), DINOv3ViTPackingModel.from_pretrained(tmp_path).eval()):
        _state_equal(loaded.state_dict(), tiny_model.state_dict())
        assert torch.equal(_forward(loaded, images), expected)


def test_hf_model_loads_our_weights_exactly(tiny_model, tmp_path):
    """Parameter names equal Hugging Face's: a strict load into DINOv3ViTModel, both directions."""
    ref = DINOv3ViTModel(tiny_model.config)
    ref.load_state_dict(tiny_model.state_dict(), strict=True)
    _state_equal(ref.state_dict(), tiny_model.state_dict())
    # A folder written by Hugging Face itself loads into the packed model with the same tensors.
    ref.save_pretrained(tmp_path)
    _state_equal(load_packing_model(str(tmp_path)).state_dict(), ref.state_dict())


def test_hf_saved_folder_parity(tmp_path, images):
    """A DINOv3ViTModel saved by HF and loaded here matches that HF model per image (conftest tolerance)."""
    ref = reference_model(random_packing_model(tiny_config(use_gated_mlp=True, hidden_act="silu"), seed=4))
    ref.save_pretrained(tmp_path)
    model = load_packing_model(str(tmp_path))
    got = _forward(model, images)
    refs = torch.cat([r.last_hidden_state[:, 5:].reshape(-1, 32) for r in reference_per_image(ref, images)])
    assert_close(got, refs)


@pytest.mark.parametrize("layout", ["5.x", "4.56"])
@pytest.mark.parametrize("via", ["folder", "file"])
def test_safetensors_with_config_both_key_layouts(tiny_model, images, tmp_path, layout, via):
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    if layout == "4.56":
        state = _keys_456(state)
    else:
        assert any(k.startswith("model.layer.0.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    tiny_model.config.to_json_file(str(tmp_path / "config.json"))
    target = tmp_path if via == "folder" else tmp_path / "model.safetensors"
    loaded = load_packing_model(str(target))
    assert loaded.config.num_register_tokens == 4 and loaded.config.hidden_size == 32
    _state_equal(loaded.state_dict(), tiny_model.state_dict())
    assert torch.equal(_forward(loaded, images), _forward(tiny_model, images))


@pytest.mark.parametrize("arch", ["vits16", "vits16plus"])
@pytest.mark.parametrize("layout", ["5.x", "4.56"])
def test_single_file_without_config_recognises_released_arch(tmp_path, arch, layout):
    source = _released(arch)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout == "4.56":
        state = _keys_456(state)
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    assert not (tmp_path / "config.json").exists()
    loaded = load_packing_model(str(path))
    assert loaded.config.to_dict() == arch_config(arch).to_dict()
    _state_equal(loaded.state_dict(), source.state_dict())


# --- random: architectures ---------------------------------------------------------------------------------

# Written from docs/dinov3.md, independently of archs.py: D, layers, heads, FFN, gated, q/v bias, Hub id.
RELEASED = {
    "vits16": (384, 12, 6, 1536, False, True, "facebook/dinov3-vits16-pretrain-lvd1689m"),
    "vits16plus": (384, 12, 6, 1536, True, True, "facebook/dinov3-vits16plus-pretrain-lvd1689m"),
    "vitb16": (768, 12, 12, 3072, False, True, "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    "vitl16": (1024, 24, 16, 4096, False, True, "facebook/dinov3-vitl16-pretrain-lvd1689m"),
    "vith16plus": (1280, 32, 20, 5120, True, True, "facebook/dinov3-vith16plus-pretrain-lvd1689m"),
    "vit7b16": (4096, 40, 32, 8192, True, False, "facebook/dinov3-vit7b16-pretrain-lvd1689m"),
}


@pytest.mark.parametrize("arch", list(RELEASED))
def test_arch_config_matches_released_model(arch):
    d, layers, heads, ffn, gated, qv_bias, _ = RELEASED[arch]
    c = arch_config(arch)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (d, layers, heads, ffn)
    assert c.hidden_size // c.num_attention_heads == (128 if arch == "vit7b16" else 64)
    assert c.use_gated_mlp is gated
    assert c.hidden_act == ("silu" if gated else "gelu")
    assert (c.num_register_tokens, c.patch_size, c.num_channels) == (4, 16, 3)
    assert (c.rope_theta, c.layer_norm_eps) == (100.0, 1e-5)
    assert c.key_bias is False
    assert (c.query_bias, c.value_bias) == (qv_bias, qv_bias)
    assert c.proj_bias is True and c.mlp_bias is True


@pytest.mark.parametrize("arch", ["vits16", "vits16plus"])
def test_random_arch_instantiates_that_architecture(arch):
    model = _released(arch)
    assert not model.training and model.dtype == torch.float32
    assert model.config.to_dict() == arch_config(arch).to_dict()
    state = model.state_dict()
    assert state["embeddings.register_tokens"].shape == (1, 4, 384)
    assert state["embeddings.patch_embeddings.weight"].shape == (384, 3, 16, 16)
    assert state["model.layer.0.mlp.up_proj.weight"].shape == (1536, 384)
    assert ("model.layer.0.mlp.gate_proj.weight" in state) is (arch == "vits16plus")
    assert "model.layer.0.attention.k_proj.bias" not in state
    assert "model.layer.0.attention.q_proj.bias" in state and "model.layer.11.norm2.weight" in state
    assert "model.layer.12.norm1.weight" not in state


def test_random_seed_determinism():
    a = _released("vits16").state_dict()
    _state_equal(load_packing_model("random:vits16@3").state_dict(), a)
    c = load_packing_model("random:vits16@4").state_dict()
    differing = [k for k in a if not torch.equal(a[k], c[k])]
    assert len(differing) == len(a), f"same under both seeds: {sorted(set(a) - set(differing))}"


def test_random_default_seed_is_zero(monkeypatch):
    seeds = []

    def record(config, seed=0, attn_backend="auto"):
        seeds.append(seed)
        return random_packing_model(tiny_config(), seed=seed, attn_backend=attn_backend)

    monkeypatch.setattr(checkpoints, "random_packing_model", record)
    for ckpt in ("random:vits16", "random:vits16@0", "random:vits16@17"):
        load_packing_model(ckpt)
    assert seeds == [0, 0, 17]


@pytest.mark.parametrize("arch", ["vits16", "vits16plus"])
def test_random_arch_parity_vs_hf(arch):
    """random:<arch> vs HF DINOv3ViTModel with its weights, per image (conftest tolerance)."""
    model = _released(arch)
    ref = reference_model(model)
    images = random_images([(3, 2), (1, 1), (2, 2, 2)], 16, seed=7)
    with torch.no_grad():
        out = model(*pack(images, 16))
    refs = reference_per_image(ref, images)
    assert_close(out.last_hidden_state, torch.cat([r.last_hidden_state[:, 5:].reshape(-1, 384) for r in refs]))
    assert_close(out.pooler_output, torch.cat([r.pooler_output for r in refs]))
    assert_close(out.register_tokens, torch.cat([r.last_hidden_state[:, 1:5] for r in refs]))


# --- Hub ids and aliases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "arch"),
    [
        ("facebook/dinov3-small", "vits16"),
        ("facebook/dinov3-base", "vitb16"),
        ("facebook/dinov3-large", "vitl16"),
        ("facebook/dinov3-huge", "vith16plus"),
        ("facebook/dinov3-giant", "vit7b16"),
    ],
)
def test_seed_aliases_resolve_and_say_so(alias, arch, caplog):
    """Offline (conftest sets HF_HUB_OFFLINE=1), the alias resolves, is logged, and fails in one sentence."""
    real = RELEASED[arch][-1]
    caplog.set_level(logging.WARNING, logger="dinov3_packing")
    with pytest.raises(ValueError, match="ckpt") as err:
        load_packing_model(alias)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("dinov3_packing")]
    assert any(alias in m and real in m for m in logged), logged
    assert real in str(err.value)


def test_unfetchable_hub_id_fails_fast_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match="ckpt") as err:
        load_packing_model("facebook/dinov3-does-not-exist")
    assert time.monotonic() - start < 10, "no network retries expected"
    msg = str(err.value)
    assert "\n" not in msg
    assert "facebook/dinov3-does-not-exist" in msg and "random:" in msg and ".safetensors" in msg


def test_online_hub_failure_is_one_sentence(monkeypatch):
    """When the download itself fails (online), its multi-line error becomes one sentence, no traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise OSError(f"{name} is not in the cache")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection")

    monkeypatch.setattr(DINOv3ViTPackingModel, "from_pretrained", staticmethod(fake_from_pretrained))
    with pytest.raises(ValueError, match="ckpt") as err:
        load_packing_model("someone/some-model")
    assert calls == [True, False]  # the cache first, then one download attempt
    msg = str(err.value)
    assert "\n" not in msg and "couldn't connect" in msg and "random:" in msg
    assert logging.getLogger("huggingface_hub").level != logging.CRITICAL  # the silencing is undone


@pytest.mark.parametrize(
    ("arch", "fused_mlp", "expected"), [("vits16", None, True), ("vits16", False, False), ("vits16plus", None, False)]
)
def test_load_packing_model_sets_fused_mlp(arch, fused_mlp, expected):
    """None (default) turns the fused MLP kernel on where it applies (ViT-S: GELU; ViT-S+: SwiGLU, no)."""
    assert load_packing_model(f"random:{arch}", fused_mlp=fused_mlp).fused_mlp is expected


def test_load_packing_model_refuses_fused_mlp_on_a_gated_mlp():
    with pytest.raises(ValueError, match=r"fused_mlp: .*gated"):
        load_packing_model("random:vits16plus", fused_mlp=True)
