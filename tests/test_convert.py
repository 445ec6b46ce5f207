"""Checkpoint conversion: timm and Meta layouts into the packed model, and safe `.pth` loading.

References: timm's own DINOv3 model (`vit_*_patch16_dinov3`, random weights) for timm state dicts, CLS
token of `forward_features` after the final norm (timm's default head averages patches, so the CLS is
taken explicitly) and its patch tokens; Hugging Face `DINOv3ViTModel` for the Meta layout. Tolerance:
`conftest.assert_close` (1e-5 relative, fp32): the same operations in another summation order (timm's
RoPE divides by periods where HF multiplies by inverse frequencies: ~1 ulp per angle).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close, tiny_config

from dinov3_packing import load_packing_model, pack, random_packing_model, reference_model
from dinov3_packing.weights.convert import (
    hf_to_meta,
    load_pth,
    meta_to_hf,
    model_for_config,
    model_from_pth,
    model_from_state_dict,
    timm_to_hf,
)


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * 16, w * 16, generator=g) for h, w in sizes]


def _randomize_timm(model, seed=0):
    """Every parameter random, so each mapped tensor matters (layer scales small, as released)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.25 + 0.05)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "reg_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"]
)
def test_timm_state_dict_matches_timm(name, tmp_path):
    """GELU without q/v bias, SwiGLU (fc1_g = gate, fc1_x = up), and q/v bias: CLS, register and patch
    tokens equal timm's on mixed sizes, from a `.pth` file. Two blocks keep the test fast; the head count
    (not in a timm state dict) comes from `config`."""
    timm = pytest.importorskip("timm")  # absent from the floor-version run (.ci/run): no torchvision there
    ref = _randomize_timm(timm.create_model(name, pretrained=False, depth=2), seed=1)
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    model = model_from_pth(path, config=tiny_config(hidden_size=384, num_attention_heads=6))
    assert model.config.use_gated_mlp == ("plus" in name)
    assert model.config.query_bias == name.endswith("qkvb")
    assert model.config.num_hidden_layers == 2
    images = _images([(3, 5), (2, 2), (4, 1)])
    hidden_states, grid = pack(images, 16)
    with torch.no_grad():
        out = model(hidden_states, grid)
        feats = [ref.forward_features(img[None])[0] for img in images]
    prefix = model.num_prefix_tokens
    assert_close(out.pooler_output, torch.stack([f[0] for f in feats]))
    assert_close(out.register_tokens, torch.stack([f[1:prefix] for f in feats]))
    assert_close(out.last_hidden_state, torch.cat([f[prefix:] for f in feats]))


def test_timm_released_arch_is_recognised():
    """A full timm ViT-S+/16 state dict maps onto every parameter of the released vits16plus config
    (heads from the architecture table), with no config given."""
    timm = pytest.importorskip("timm")
    state = timm_to_hf(timm.create_model("vit_small_plus_patch16_dinov3_qkvb", pretrained=False).state_dict())
    model = model_from_state_dict(state)
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():  # the values landed where their names say
        assert torch.equal(value, state[key]), key
    assert (model.config.num_attention_heads, model.config.num_hidden_layers, model.config.use_gated_mlp) == (
        6,
        12,
        True,
    )


@pytest.mark.parametrize("overrides", [{}, {"use_gated_mlp": True, "hidden_act": "silu", "num_register_tokens": 0}])
def test_meta_layout_round_trip_and_parity(overrides):
    """HF -> Meta -> HF is the identity; Meta's keys are the original ones (fused qkv with bias_mask,
    ls1.gamma, storage_tokens, mlp.fc1 or w1/w2/w3); the Meta dict loads into a model equal to HF."""
    src = random_packing_model(tiny_config(**overrides), seed=3)
    hf = src.state_dict()
    meta = hf_to_meta(hf)
    gated = src.config.use_gated_mlp
    assert "blocks.0.attn.qkv.weight" in meta and "blocks.0.attn.qkv.bias_mask" in meta
    assert "blocks.1.ls2.gamma" in meta and meta["mask_token"].shape == (1, src.config.hidden_size)
    assert ("blocks.0.mlp.w3.weight" in meta) == gated and ("blocks.0.mlp.fc2.weight" in meta) != gated
    assert ("storage_tokens" in meta) == bool(src.config.num_register_tokens)
    back, periods = meta_to_hf(meta)
    assert periods is None
    assert set(back) == set(hf)
    for key in hf:
        assert torch.equal(back[key], hf[key]), key

    model = model_from_state_dict(meta, config=src.config)
    images = _images([(2, 3), (1, 1)])
    hidden_states, grid = pack(images, 16)
    ref = reference_model(src)
    with torch.no_grad():
        got = model(hidden_states, grid)
        want = [ref(img[None]) for img in images]
    assert_close(got.pooler_output, torch.cat([w.pooler_output for w in want]))
    prefix = src.num_prefix_tokens
    assert_close(got.last_hidden_state, torch.cat([w.last_hidden_state[0, prefix:] for w in want]))


def test_meta_swiglu_w1_is_gate():
    """Meta's SwiGLUFFN computes w3(silu(w1 x) * w2 x): w1 -> gate_proj, w2 -> up_proj, w3 -> down_proj."""
    config = tiny_config(use_gated_mlp=True, hidden_act="silu")
    src = random_packing_model(config, seed=4)
    meta = hf_to_meta(src.state_dict())
    w1, w2, w3 = (meta[f"blocks.0.mlp.w{i}.weight"] for i in (1, 2, 3))
    b1, b2, b3 = (meta[f"blocks.0.mlp.w{i}.bias"] for i in (1, 2, 3))
    x = torch.randn(5, config.hidden_size)
    meta_ffn = torch.nn.functional.linear(torch.nn.functional.silu(x @ w1.T + b1) * (x @ w2.T + b2), w3, b3)
    with torch.no_grad():
        assert_close(src.model.layer[0].mlp(x), meta_ffn)


def test_meta_bf16_periods_are_honoured(tmp_path):
    """Meta files store RoPE periods rounded to bf16. Loaded from a `.pth`, the packed model uses them:
    it equals HF with inv_freq = 1 / periods, and differs from HF's recomputed inv_freq by more than the
    tolerance (so ignoring them would be caught)."""
    config = tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=96)
    src = random_packing_model(config, seed=5)
    with torch.no_grad():  # position-sensitive attention, so RoPE frequencies matter
        for layer in src.model.layer:
            layer.attention.q_proj.weight.mul_(30)
            layer.attention.k_proj.weight.mul_(30)
    head_dim = config.hidden_size // config.num_attention_heads
    periods = (100.0 ** (4 * torch.arange(head_dim // 4) / head_dim)).to(torch.bfloat16)
    path = tmp_path / "meta.pth"
    torch.save(hf_to_meta(src.state_dict(), periods=periods), path)
    model = load_packing_model(str(path))
    assert model.config.num_attention_heads == 2  # from the periods' length
    images = _images([(3, 4), (2, 2)])
    hidden_states, grid = pack(images, 16)
    ref = reference_model(src)
    with torch.no_grad():
        got = model(hidden_states, grid).last_hidden_state
        recomputed = torch.cat([ref(img[None]).last_hidden_state[0, 5:] for img in images])
        ref.rope_embeddings.inv_freq.copy_(1 / periods.float())
        honoured = torch.cat([ref(img[None]).last_hidden_state[0, 5:] for img in images])
    assert_close(got, honoured)
    assert (got - recomputed).abs().max() > 10 * 1e-5 * recomputed.abs().max()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def test_pth_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"cls_token": torch.zeros(1, 1, 8), "x": _Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"refused to load .*never run code"):
        load_pth(path)
    with pytest.raises(ValueError, match="refused to load"):
        load_packing_model(str(path))
    assert not marker.exists()
    # Control: the payload is live, an unsafe load would have run it.
    control = tmp_path / "control"
    torch.save({"x": _Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)  # on purpose: a file this test wrote
    assert control.read_text() == "payload ran"


def test_bad_state_dicts(tmp_path):
    with pytest.raises(ValueError, match="state_dict: not a DINOv3"):
        model_from_state_dict({"foo": torch.zeros(1)})
    meta = hf_to_meta(random_packing_model(tiny_config(), seed=0).state_dict())
    with pytest.raises(ValueError, match="config: a state dict of width 32"):
        model_from_state_dict(meta)  # no periods, no released arch of width 32: heads unknown
    meta["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown in the Meta"):
        model_from_state_dict(meta, config=tiny_config())
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_pth(tmp_path / "list.pth")


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"\x93NUMPY not a torch file", "random bytes"), (b"PK\x03\x04" + bytes(64), "truncated zip"), (b"", "empty")],
)
def test_unreadable_pth_is_one_error_naming_the_file(tmp_path, content, why):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for load in (load_pth, lambda p: load_packing_model(str(p))):
        with pytest.raises(ValueError, match=r"ckpt: cannot read .*weights\.pth.* as a torch\.save file") as err:
            load(path)
        assert "\n" not in str(err.value), why


def test_meta_pth_that_does_not_fit_is_named(tmp_path):
    """Conversion keeps loading exact: a Meta file missing a block tensor, or with periods that do not fit
    the head count, is one error naming the file and the key."""
    config = tiny_config()
    meta = hf_to_meta(random_packing_model(config, seed=2).state_dict())
    del meta["blocks.1.ls2.gamma"]
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    with pytest.raises(ValueError, match=r"^state_dict: 1 missing key: model\.layer\.1\.layer_scale2\.lambda1$"):
        model_from_state_dict(load_pth(path), config=config)
    config.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=r"ckpt: .*meta\.pth' \(with .*config\.json'\).*layer_scale2\.lambda1"):
        load_packing_model(str(path))
    meta = hf_to_meta(random_packing_model(config, seed=2).state_dict(), periods=torch.ones(3))
    with pytest.raises(ValueError, match=r"rope_embed\.periods has shape \(3,\).*head_dim 8 needs \(2,\)"):
        model_for_config(meta, config)


def test_pth_beside_config_json_follows_it(tmp_path):
    """A config.json beside a Meta `.pth` is the model's description: its head count is used (the shapes
    alone do not give one for a width no released model has)."""
    config = tiny_config(num_attention_heads=2)
    src = random_packing_model(config, seed=6)
    torch.save(hf_to_meta(src.state_dict()), tmp_path / "meta.pth")
    config.to_json_file(str(tmp_path / "config.json"))
    model = load_packing_model(str(tmp_path / "meta.pth"))
    assert model.config.num_attention_heads == 2
    images = _images([(2, 2), (1, 3)])
    ref = reference_model(src)
    with torch.no_grad():
        got = model(*pack(images, 16)).last_hidden_state
        want = torch.cat([ref(img[None]).last_hidden_state[0, src.num_prefix_tokens :] for img in images])
    assert_close(got, want)
