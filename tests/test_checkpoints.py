"""Checkpoint resolution (`checkpoints.py`, `archs.py`): formats, key layouts, random architectures, aliases.

Loading is checked exactly: every tensor of the loaded state dict equals the saved one (torch.equal), and
outputs of a reloaded model equal the original's bit for bit (same weights, same code, same input).
Parity with Hugging Face uses `conftest.assert_close` (rel 1e-5, cosine 0.99999; see conftest).
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

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
from dinov3_packing.model.archs import IMAGENET_MEAN, IMAGENET_STD, SAT493M_MEAN, SAT493M_STD


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

    def failing_download(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise OSError(f"{repo_id} is not in the cache")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection")

    monkeypatch.setattr(checkpoints, "snapshot_download", failing_download)
    with pytest.raises(ValueError, match="ckpt") as err:
        load_packing_model("someone/some-model")
    assert calls == [True, False]  # the cache first, then one download attempt
    msg = str(err.value)
    assert "\n" not in msg and "couldn't connect" in msg and "random:" in msg
    assert logging.getLogger("huggingface_hub").level != logging.CRITICAL  # the silencing is undone


def test_hub_snapshot_loads_config_and_safetensors_only(tiny_model, images, tmp_path, monkeypatch):
    """A Hub id goes through the same exact loader as a folder: only config.json and safetensors are asked
    for (never a pickle), and a snapshot with a missing key fails naming the repo's file."""
    tiny_model.save_pretrained(tmp_path)
    asked = []

    def cached_snapshot(repo_id, allow_patterns=None, local_files_only=False):
        asked.append((repo_id, tuple(allow_patterns), local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(checkpoints, "snapshot_download", cached_snapshot)
    loaded = load_packing_model("someone/dinov3-tiny")
    _state_equal(loaded.state_dict(), tiny_model.state_dict())
    assert torch.equal(_forward(loaded, images), _forward(tiny_model, images))
    assert asked == [("someone/dinov3-tiny", tuple(checkpoints._HUB_FILES), True)]  # the cache only
    assert not any(p.endswith((".bin", ".pth", ".pt")) or p == "*" for p in checkpoints._HUB_FILES)

    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items() if k != "norm.bias"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*1 missing key: norm\.bias"):
        load_packing_model("someone/dinov3-tiny")


@pytest.mark.parametrize(
    ("arch", "fused_mlp", "expected"), [("vits16", None, True), ("vits16", False, False), ("vits16plus", None, False)]
)
def test_load_packing_model_sets_fused_mlp(arch, fused_mlp, expected):
    """None (default) turns the fused MLP kernel on where it applies (ViT-S: GELU; ViT-S+: SwiGLU, no)."""
    assert load_packing_model(f"random:{arch}", fused_mlp=fused_mlp).fused_mlp is expected


def test_load_packing_model_refuses_fused_mlp_on_a_gated_mlp():
    with pytest.raises(ValueError, match=r"fused_mlp: .*gated"):
        load_packing_model("random:vits16plus", fused_mlp=True)


# --- exact loading: every bad checkpoint is one ValueError naming the file and the key or field ----------


def _save(folder, model, state=None, config=None):
    """A save_pretrained-style folder: model.safetensors from `state` (default the model's), config.json
    from `config` (a dict, or raw text; default the model's)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict() if config is None else config
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def _one_line_error(target, *fragments):
    """load_packing_model(target) raises one single-line ValueError holding every fragment."""
    with pytest.raises(ValueError) as err:
        load_packing_model(str(target))
    msg = str(err.value)
    assert msg.startswith("ckpt: ") and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def _noise(size: int) -> bytes:
    """Seeded random bytes (the same test ids on every run and every pytest worker)."""
    return (
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


_WEIGHT_CASES = {
    # name: (state from the model's state dict, fragments the message must hold)
    "missing": (lambda s: _without(s, "model.layer.1.norm2.weight"), ["1 missing key", "model.layer.1.norm2.weight"]),
    "unexpected": (lambda s: {**s, "model.layer.0.extra.weight": torch.zeros(3)}, ["unexpected key", "extra.weight"]),
    "wrong shape": (
        lambda s: {**s, "model.layer.0.mlp.up_proj.weight": torch.zeros(65, 32)},
        ["wrong shape", "model.layer.0.mlp.up_proj.weight is [65, 32] where the model has [64, 32]"],
    ),
    "4.56 layout, missing": (lambda s: _keys_456(_without(s, "norm.weight")), ["1 missing key: norm.weight"]),
}


@pytest.mark.parametrize("via", ["folder", "file"])
@pytest.mark.parametrize("case", list(_WEIGHT_CASES))
def test_weights_that_do_not_fit_their_config(tiny_model, tmp_path, case, via):
    """Transformers loads a missing key at random init and an unexpected one silently; here each is an
    error naming the weights file, the config it was checked against and the key."""
    edit, fragments = _WEIGHT_CASES[case]
    folder = _save(tmp_path / "ckpt", tiny_model, state=edit(tiny_model.state_dict()))
    target = folder if via == "folder" else folder / "model.safetensors"
    _one_line_error(target, str(folder / "model.safetensors"), str(folder / "config.json"), *fragments)


def test_single_file_without_config_is_exact_too(tmp_path):
    """Without config.json the architecture comes from the shapes, and the file must still fill it exactly."""
    state = _without(_released("vits16").state_dict(), "model.layer.11.attention.o_proj.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    _one_line_error(tmp_path / "w.safetensors", str(tmp_path / "w.safetensors"), "model.layer.11.attention.o_proj.bias")
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 8)}, str(tmp_path / "cls.safetensors"))
    _one_line_error(tmp_path / "cls.safetensors", "no transformer blocks")
    state = _without(_released("vits16").state_dict(), "embeddings.patch_embeddings.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "np.safetensors"))
    _one_line_error(tmp_path / "np.safetensors", "missing key embeddings.patch_embeddings.weight")


@pytest.mark.parametrize(
    "content",
    [_noise(1000), b"", b"\x08" + b"\0" * 7 + b"{bad}", b"PK\x03\x04 a zip, not safetensors"],
    ids=["random", "empty", "bad-header", "zip"],
)
@pytest.mark.parametrize("via", ["folder", "file"])
def test_bytes_that_are_not_safetensors(tiny_model, tmp_path, content, via):
    folder = _save(tmp_path / "ckpt", tiny_model)
    (folder / "model.safetensors").write_bytes(content)
    target = folder if via == "folder" else folder / "model.safetensors"
    _one_line_error(target, str(folder / "model.safetensors"), "as safetensors")


_CONFIG_CASES = {
    # name: (config.json edit, fragments the message must hold)
    "not JSON": ("{hidden_size: 32", ["is not valid JSON", "line 1"]),
    "a list": ("[1, 2]", ["expected a JSON object"]),
    "heads": ({"num_attention_heads": 5}, ["num_attention_heads: 5 heads do not divide hidden_size 32"]),
    "head_dim for RoPE": ({"num_attention_heads": 16}, ["head_dim 2", "divisible by 4"]),
    "float size": ({"hidden_size": 32.0}, ["hidden_size: expected a positive integer, got 32.0"]),
    "string size": ({"intermediate_size": "64"}, ["intermediate_size: expected a positive integer, got '64'"]),
    "zero layers": ({"num_hidden_layers": 0}, ["num_hidden_layers: expected a positive integer, got 0"]),
    "negative registers": ({"num_register_tokens": -1}, ["num_register_tokens: expected an integer >= 0"]),
    "bool size": ({"patch_size": True}, ["patch_size: expected a positive integer, got True"]),
    "activation": ({"hidden_act": "gelu_fancy"}, ["hidden_act:", "'gelu_fancy'"]),
    "bias flag": ({"query_bias": "yes"}, ["query_bias: expected true or false"]),
    "eps": ({"layer_norm_eps": 0}, ["layer_norm_eps: expected a positive number"]),
    "jitter": ({"pos_embed_jitter": 0.5}, ["pos_embed_jitter: expected null or a number >= 1"]),
    "model type": ({"model_type": "dinov2"}, ["model_type: expected 'dinov3_vit', got 'dinov2'"]),
}


@pytest.mark.parametrize("via", ["folder", "file"])
@pytest.mark.parametrize("case", list(_CONFIG_CASES))
def test_invalid_config_json(tiny_model, tmp_path, case, via):
    """Each of these built a model that failed later (15 frames deep in the first forward for the heads),
    or failed without naming the file; now it is one line naming config.json and the field."""
    edit, fragments = _CONFIG_CASES[case]
    config = edit if isinstance(edit, str) else {**tiny_model.config.to_dict(), **edit}
    folder = _save(tmp_path / "ckpt", tiny_model, config=config)
    target = folder if via == "folder" else folder / "model.safetensors"
    _one_line_error(target, str(folder / "config.json"), *fragments)


def test_config_json_is_authoritative_beside_a_file(tiny_model, tmp_path):
    """A config.json beside a .safetensors file is the model's description, not a hint: the activation it
    names is the one that runs (shape inference would have said plain GELU)."""
    config = {**tiny_model.config.to_dict(), "hidden_act": "gelu_pytorch_tanh"}
    folder = _save(tmp_path / "ckpt", tiny_model, config=config)
    loaded = load_packing_model(str(folder / "model.safetensors"))
    assert loaded.config.hidden_act == "gelu_pytorch_tanh"
    _state_equal(loaded.state_dict(), tiny_model.state_dict())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def test_folder_of_pickles_is_refused_unread(tiny_model, tmp_path):
    """A folder with config.json and only pytorch_model.bin: refused with the way out (convert to
    safetensors); the pickle is never opened, so even a code-carrying one runs nothing."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tiny_model.config.to_json_file(str(folder / "config.json"))
    marker = tmp_path / "marker"
    torch.save({**tiny_model.state_dict(), "x": _Payload(marker)}, folder / "pytorch_model.bin")
    _one_line_error(folder, str(folder), "pytorch_model.bin", "no model.safetensors", "convert them to safetensors")
    assert not marker.exists()


def test_folder_without_weights_or_config(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, str(empty), "no model.safetensors")
    folder = _save(tmp_path / "ckpt", tiny_model)
    (folder / "config.json").unlink()
    _one_line_error(folder, str(folder), "no config.json")


def test_sharded_folder_loads_exactly_and_names_a_missing_shard(tiny_model, images, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = load_packing_model(str(tmp_path))
    _state_equal(loaded.state_dict(), tiny_model.state_dict())
    assert torch.equal(_forward(loaded, images), _forward(tiny_model, images))
    (tmp_path / shards[-1]).unlink()
    _one_line_error(tmp_path, "model.safetensors.index.json", f"names shard {shards[-1]!r}")


@pytest.mark.parametrize("seed", [2**63, 10**20, 99999999999999999999])
def test_random_seed_out_of_range(seed):
    """torch.Generator takes a signed 64-bit seed; beyond it the error was "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match=r"ckpt: the seed of 'random:vits16@\d+' is out of range.*2\*\*63"):
        load_packing_model(f"random:vits16@{seed}")


def test_largest_random_seed_builds(monkeypatch):
    seeds = []

    def record(config, seed=0, attn_backend="auto"):
        seeds.append(seed)
        return random_packing_model(tiny_config(), seed=seed, attn_backend=attn_backend)

    monkeypatch.setattr(checkpoints, "random_packing_model", record)
    load_packing_model(f"random:vits16@{2**63 - 1}")
    assert seeds == [2**63 - 1]  # and the real generator takes it:
    assert torch.Generator().manual_seed(2**63 - 1).initial_seed() == 2**63 - 1


# --- load_checkpoint: the model and its normalization from one resolution ----------------------------------


def test_load_checkpoint_gives_model_and_normalization(tiny_model, tmp_path):
    plain = checkpoints.load_checkpoint("random:vits16@3")
    _state_equal(plain.model.state_dict(), _released("vits16").state_dict())
    assert (plain.mean, plain.std, plain.name) == (IMAGENET_MEAN, IMAGENET_STD, "random:vits16@3")
    sat = _save(tmp_path / "dinov3-vitl16-pretrain-sat493m", tiny_model)
    loaded = checkpoints.load_checkpoint(str(sat), dtype=torch.float64)
    assert (loaded.mean, loaded.std) == (SAT493M_MEAN, SAT493M_STD)
    assert loaded.model.dtype == torch.float64 and not loaded.model.training


def test_load_checkpoint_resolves_an_alias_once(caplog):
    caplog.set_level(logging.WARNING, logger="dinov3_packing")
    with pytest.raises(ValueError, match="facebook/dinov3-vitb16-pretrain-lvd1689m"):
        checkpoints.load_checkpoint("facebook/dinov3-base")
    assert sum("facebook/dinov3-base" in r.getMessage() for r in caplog.records) == 1


# --- the CLI prints each of these as one line and exits 2 --------------------------------------------------


def _bad_checkpoints(tmp_path, model):
    missing = _save(tmp_path / "missing", model, state=_without(model.state_dict(), "norm.weight"))
    garbage = _save(tmp_path / "garbage", model)
    (garbage / "model.safetensors").write_bytes(_noise(64))
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save(model.state_dict(), pickles / "pytorch_model.bin")
    heads = _save(tmp_path / "heads", model, config={**model.config.to_dict(), "num_attention_heads": 3})
    return {
        "missing key": (str(missing), "norm.weight"),
        "random bytes": (str(garbage / "model.safetensors"), "as safetensors"),
        "pickled folder": (str(pickles), "pytorch_model.bin"),
        "bad config": (str(heads), "num_attention_heads"),
        "seed": (f"random:vits16@{2**64}", "2**63"),
    }


def test_cli_reports_each_bad_checkpoint_in_one_line(tiny_model, tmp_path):
    """`dinov3-packing align --ckpt BAD` as a user runs it: exit 2, one line on stderr, no traceback."""
    cli = Path(sys.executable).with_name("dinov3-packing")
    assert cli.exists(), "the console script is installed with the package"
    for name, (ckpt, fragment) in _bad_checkpoints(tmp_path, tiny_model).items():
        proc = subprocess.run(
            [str(cli), "align", "--ckpt", ckpt], capture_output=True, text=True, timeout=120, check=False
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        # The CLI names the flag (--ckpt) where the library names the argument (ckpt).
        assert len(lines) == 1 and lines[0].startswith(("error: --ckpt: ", "error: ckpt: ")), (name, proc.stderr)
        assert fragment in lines[0], (name, lines[0])


def test_align_builds_the_checkpoint_once(monkeypatch, capsys):
    """align compares the packed model with HF built from one load (it used to load the checkpoint twice)."""
    from dinov3_packing.apps.align import align

    builds = []

    def record(config, seed=0, attn_backend="auto"):
        builds.append(seed)
        return random_packing_model(config, seed=seed, attn_backend=attn_backend)

    monkeypatch.setattr(checkpoints, "random_packing_model", record)
    assert align("random:vits16@5", batch_size=1, image_size=32)
    assert builds == [5]
    assert "ALL TESTS PASSED" in capsys.readouterr().out
