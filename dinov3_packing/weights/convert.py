"""Foreign DINOv3 checkpoints -> Hugging Face parameter names, in one place.

Two layouts besides Hugging Face's load into `DINOv3ViTPackingModel`:

Meta's original `.pth` (github.com/facebookresearch/dinov3, `DinoVisionTransformer.state_dict()`):
    cls_token, storage_tokens, mask_token [1, D], patch_embed.proj.*, rope_embed.periods,
    blocks.N.{norm1, attn.qkv (fused; `qkv.bias_mask` zeroes the k bias), attn.proj, ls1.gamma, norm2,
    mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}, norm.
    SwiGLU: Meta's `SwiGLUFFN` computes `w3(silu(w1 x) * w2 x)`, so w1 = gate, w2 = up, w3 = down.
    `rope_embed.periods` is a persistent buffer, saved rounded to bf16 in the released files; the original
    model computes `angles = 2 pi coords / periods` with those rounded values. Recomputing the periods from
    `rope_theta` instead moves outputs by ~1e-3 relative, so the loader hands them to the model
    (`DINOv3ViTPackedRopeEmbedding.load_periods`).

timm (`vit_*_patch16_dinov3*` in `timm/models/eva.py`):
    cls_token, reg_token, patch_embed.proj.*, blocks.N.{norm1, attn.qkv.weight, attn.q_bias, attn.v_bias,
    attn.proj, gamma_1, norm2, mlp.fc1/fc2 | mlp.fc1_g (gate)/fc1_x (up)/fc2, gamma_2}, norm.
    timm's RoPE periods are a non-persistent buffer recomputed from the temperature (like Hugging Face).

`.pth` files are pickles; they are read with `torch.load(..., weights_only=True)` only, which refuses any
object other than tensors and plain containers, so a checkpoint can never run code.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import DINOv3ViTConfig

from ..model.archs import ARCHS, arch_config
from ..model.modeling import DINOv3ViTPackingModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Per-block renames shared by both layouts (source suffix -> Hugging Face suffix).
_META_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.up_proj",
    "mlp.w3": "mlp.down_proj",
}
_TIMM_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "gamma_1": "layer_scale1.lambda1",
    "gamma_2": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc1_g": "mlp.gate_proj",
    "mlp.fc1_x": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "attn.q_proj": "attention.q_proj",
    "attn.k_proj": "attention.k_proj",
    "attn.v_proj": "attention.v_proj",
}
_PREFIX = {"cls_token": "embeddings.cls_token", "patch_embed.proj": "embeddings.patch_embeddings", "norm": "norm"}


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth` state dict safely (tensors only) and unwrap `{"model": ...}`-style containers.

    Raises:
        ValueError: the file is not a torch.save file, holds anything but tensors and plain containers (a
            pickle that would build objects or call functions is refused before any of it runs), or no state
            dict.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the unpickler's own reason in paragraphs of advice; the reason tells an object pickle
        # ("Unsupported global: ...") from bytes that are no pickle at all ("Unsupported operand ...").
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = found[1].strip() if found else _first_line(e)
        if "global" not in reason.lower():
            raise ValueError(f"ckpt: cannot read {str(path)!r} as a torch.save file ({reason})") from None
        raise ValueError(
            f"ckpt: refused to load {str(path)!r}: it is a pickle that holds objects other than tensors "
            f"({reason}); checkpoints are read with torch.load(weights_only=True) and never run code. "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as .safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        # Random bytes, a truncated zip, a text file: torch reports each with another exception class.
        raise ValueError(f"ckpt: cannot read {str(path)!r} as a torch.save file ({_first_line(e)})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"ckpt: {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """ "hf", "meta" or "timm", from the key names."""
    if "embeddings.cls_token" in state:
        return "hf"
    if "cls_token" in state and any(k.endswith(".ls1.gamma") or k == "storage_tokens" for k in state):
        return "meta"
    if "cls_token" in state and any(k.endswith(".gamma_1") or k == "reg_token" for k in state):
        return "timm"
    raise ValueError(
        "state_dict: not a DINOv3 ViT state dict in Hugging Face, Meta (storage_tokens, ls1.gamma) or timm "
        f"(reg_token, gamma_1) layout; first keys: {list(state)[:5]}"
    )


def meta_to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Meta's original layout -> (Hugging Face state dict, RoPE periods or None).

    The k bias of the fused qkv is dropped when the file carries `qkv.bias_mask` (Meta's `mask_k_bias`
    models always multiply it by zero) or when it is all zeros; a live k bias becomes `k_proj.bias`.
    """
    out: dict[str, torch.Tensor] = {}
    periods = None
    unknown = []
    for key, value in state.items():
        if key == "storage_tokens":
            out["embeddings.register_tokens"] = value
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key == "rope_embed.periods":
            periods = value
        elif key.startswith("local_cls_norm."):
            continue  # the 7B model's norm for local crops, used only in pre-training
        elif key.startswith("cls_norm."):
            raise ValueError(
                "state_dict: this checkpoint has a separate CLS norm (untie_cls_and_patch_norms), which the "
                "Hugging Face DINOv3 architecture does not have"
            )
        elif not _convert_shared_key(key, value, state, _META_BLOCK, out):
            unknown.append(key)
    _raise_unknown(unknown, "Meta")
    _fill_defaults(out)
    return out, periods


def hf_to_meta(state: Mapping[str, torch.Tensor], periods: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face layout -> Meta's original layout (the inverse of `meta_to_hf`).

    Without a k bias the fused qkv bias gets zeros there plus Meta's `bias_mask` (1, 0, 1), as the
    released files have. `periods`, when given, is stored as `rope_embed.periods`.
    """
    out: dict[str, torch.Tensor] = {}
    gated = any(".mlp.gate_proj." in k for k in state)
    meta_names = [k for k in _META_BLOCK if k.startswith("mlp.w" if gated else "mlp.fc") or not k.startswith("mlp.")]
    inverse = {_META_BLOCK[k]: k for k in meta_names}
    prefix = {v: k for k, v in _PREFIX.items()}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.layer.")})
    for key, value in state.items():
        if key == "embeddings.register_tokens":
            if value.shape[1]:
                out["storage_tokens"] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif key.startswith("model.layer."):
            i, rest = key.split(".", 3)[2:]
            if rest.startswith(("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")):
                continue  # fused below
            name, _, leaf = rest.rpartition(".")
            out[f"blocks.{i}.{inverse[rest]}" if rest in inverse else f"blocks.{i}.{inverse[name]}.{leaf}"] = value
        else:
            name, _, leaf = key.rpartition(".")
            out[prefix[key] if key in prefix else f"{prefix[name]}.{leaf}"] = value
    for i in layers:
        p = f"model.layer.{i}.attention"
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[f"{p}.{n}_proj.weight"] for n in "qkv"])
        if f"{p}.q_proj.bias" in state or f"{p}.v_proj.bias" in state or f"{p}.k_proj.bias" in state:
            biases = [state.get(f"{p}.{n}_proj.bias") for n in "qkv"]
            d = state[f"{p}.q_proj.weight"].shape[0]
            like = next(b for b in biases if b is not None)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b if b is not None else like.new_zeros(d) for b in biases])
            if biases[1] is None:
                mask = torch.ones(3 * d, dtype=like.dtype)
                mask[d : 2 * d] = 0
                out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    if periods is not None:
        out["rope_embed.periods"] = periods
    return out


def timm_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's DINOv3 (Eva) layout -> Hugging Face state dict. A classifier `head.*` is dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "reg_token":
            out["embeddings.register_tokens"] = value
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key.startswith("head.") or key.startswith("rope."):
            continue  # classifier (not part of the backbone); RoPE buffers are recomputed
        elif not _convert_shared_key(key, value, state, _TIMM_BLOCK, out):
            unknown.append(key)
    _raise_unknown(unknown, "timm")
    _fill_defaults(out)
    return out


def to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Any supported layout -> (Hugging Face state dict with `model.layer.N` keys, RoPE periods or None)."""
    layout = detect_layout(state)
    if layout == "meta":
        return meta_to_hf(state)
    if layout == "timm":
        return timm_to_hf(state), None
    return {re.sub(r"^(?:model\.)?layer\.", "model.layer.", k): v for k, v in state.items()}, None


def config_for_state(
    state: Mapping[str, torch.Tensor], periods: torch.Tensor | None = None, config: DINOv3ViTConfig | None = None
) -> DINOv3ViTConfig:
    """The `DINOv3ViTConfig` a Hugging Face-layout state dict needs.

    Shapes give width, depth, MLP, registers, patch size and which biases exist; the head count comes from
    `periods` (head_dim = 4 * len(periods)), else from `config`, else from the released architecture with
    this width, depth and MLP type.

    Raises:
        ValueError: the head count cannot be determined (pass `config`).
    """
    width = _shape(state, "embeddings.cls_token", 3)[-1]
    layers = {k.split(".")[2] for k in state if k.startswith("model.layer.")}
    if not layers:
        raise ValueError("state_dict: no transformer blocks (keys model.layer.<N>.* or layer.<N>.*)")
    if not all(i.isdigit() for i in layers):
        raise ValueError(f"state_dict: expected blocks model.layer.<N>.* with integer N, got {sorted(layers)[:4]}")
    depth = 1 + max(int(i) for i in layers)
    gated = "model.layer.0.mlp.gate_proj.weight" in state
    if config is None:
        match = [
            n
            for n, a in ARCHS.items()
            if (a.hidden_size, a.num_hidden_layers, a.use_gated_mlp) == (width, depth, gated)
        ]
        if match:
            config = arch_config(match[0])
        elif periods is None:
            raise ValueError(
                f"config: a state dict of width {width}, {depth} layers matches no released DINOv3 architecture "
                "and carries no RoPE periods to give the head count; pass config="
            )
        else:
            config = arch_config("vits16")
    kw = config.to_dict()
    if periods is not None:
        head_dim = 4 * periods.numel()
        if width % head_dim:
            raise ValueError(f"state_dict: rope periods give head_dim {head_dim}, which does not divide width {width}")
        kw["num_attention_heads"] = width // head_dim
    attn, patch = "model.layer.0.attention", _shape(state, "embeddings.patch_embeddings.weight", 4)
    kw.update(
        hidden_size=width,
        num_hidden_layers=depth,
        intermediate_size=_shape(state, "model.layer.0.mlp.up_proj.weight", 2)[0],
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        num_register_tokens=_shape(state, "embeddings.register_tokens", 3)[1],
        patch_size=patch[-1],
        num_channels=patch[1],
        query_bias=f"{attn}.q_proj.bias" in state,
        key_bias=f"{attn}.k_proj.bias" in state,
        value_bias=f"{attn}.v_proj.bias" in state,
        proj_bias=f"{attn}.o_proj.bias" in state,
        mlp_bias="model.layer.0.mlp.up_proj.bias" in state,
    )
    derived = ("model_type", "transformers_version", "stage_names", "out_features", "out_indices")
    return DINOv3ViTConfig(**{k: v for k, v in kw.items() if k not in derived})


def model_from_state_dict(
    state: Mapping[str, torch.Tensor], config: DINOv3ViTConfig | None = None, attn_backend: str = "auto"
) -> DINOv3ViTPackingModel:
    """A `DINOv3ViTPackingModel` (fp32, eval) from a Hugging Face, Meta or timm state dict.

    The architecture comes from the tensors (`config_for_state`; `config` supplies only what shapes cannot
    tell, such as the head count). Then every tensor must fill exactly one parameter (`load_exact`).

    Raises:
        ValueError: an unknown layout, an architecture the shapes do not determine, or keys that do not fit.
    """
    hf, periods = to_hf(state)
    model = DINOv3ViTPackingModel(config_for_state(hf, periods, config), attn_backend=attn_backend)
    return load_exact(model, hf, periods)


def model_for_config(
    state: Mapping[str, torch.Tensor], config: DINOv3ViTConfig, attn_backend: str = "auto"
) -> DINOv3ViTPackingModel:
    """A `DINOv3ViTPackingModel` (fp32, eval) built exactly as `config` says (a checkpoint's config.json),
    loaded with a state dict in any supported layout, which must match it key for key and shape for shape.

    Raises:
        ValueError: an unknown layout, or keys that do not fit the model `config` describes.
    """
    hf, periods = to_hf(state)
    return load_exact(DINOv3ViTPackingModel(config, attn_backend=attn_backend), hf, periods)


def load_exact(
    model: DINOv3ViTPackingModel, state: Mapping[str, torch.Tensor], periods: torch.Tensor | None = None
) -> DINOv3ViTPackingModel:
    """Load a Hugging Face-layout state dict into `model`: no key missing, none left over, every shape equal
    (a parity library cannot leave a weight at its random init). `periods` are Meta's RoPE periods.

    Raises:
        ValueError: naming the keys that are missing, unexpected or of the wrong shape, or the periods.
    """
    problem = state_dict_problem(state, model.state_dict())
    if problem:
        raise ValueError(f"state_dict: {problem}")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    if periods is not None and periods.shape != (head_dim // 4,):
        raise ValueError(
            f"state_dict: rope_embed.periods has shape {tuple(periods.shape)}, the model's head_dim {head_dim} "
            f"needs ({head_dim // 4},)"
        )
    model.load_state_dict(state, strict=True)
    if periods is not None:
        model.rope_embeddings.load_periods(periods)
    return model.eval()


def state_dict_problem(state: Mapping[str, object], expected: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `state` from filling `expected` exactly (missing, unexpected, wrong shape, not a tensor),
    naming the first few keys of each kind; None when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    not_tensor = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    wrong = [
        f"{k} is {_dims(state[k])} where the model has {_dims(v)}"
        for k, v in expected.items()
        if isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {kind} {'key' if len(keys) == 1 else 'keys'}: {', '.join(keys[:3])}"
        + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("non-tensor", not_tensor))
        if keys
    ]
    if wrong:
        problems.append(
            f"{len(wrong)} of the wrong shape: " + ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")
        )
    return "; ".join(problems) or None


def model_from_pth(
    path: str | Path, config: DINOv3ViTConfig | None = None, attn_backend: str = "auto"
) -> DINOv3ViTPackingModel:
    """`model_from_state_dict(load_pth(path))`: a Meta original or timm `.pth` file, read safely."""
    return model_from_state_dict(load_pth(path), config=config, attn_backend=attn_backend)


def _convert_shared_key(
    key: str, value: torch.Tensor, state: Mapping[str, torch.Tensor], block_table: dict[str, str], out: dict
) -> bool:
    """The keys Meta's and timm's layouts name alike (blocks.N..., cls_token, patch_embed, norm): put the
    Hugging Face name into `out`; False when the key is none of them."""
    if (m := _BLOCK.match(key)) is not None:
        i, rest = m.groups()
        if rest.startswith("attn.qkv."):
            _split_qkv(out, f"model.layer.{i}.attention", rest.removeprefix("attn.qkv."), value, state, key)
        elif (hf := _rename_block(rest, block_table)) is not None:
            out[f"model.layer.{i}.{hf}"] = value
        else:
            return False
        return True
    if (hf := _rename_prefix(key)) is not None:
        out[hf] = value
        return True
    return False


def _split_qkv(out: dict, prefix: str, leaf: str, value: torch.Tensor, state: Mapping, key: str) -> None:
    if leaf == "bias_mask":
        return
    q, k, v = value.chunk(3, dim=0)
    out[f"{prefix}.q_proj.{leaf}"] = q
    out[f"{prefix}.v_proj.{leaf}"] = v
    if leaf == "weight":
        out[f"{prefix}.k_proj.weight"] = k
    elif key.replace(".bias", ".bias_mask") not in state and bool(k.any()):
        out[f"{prefix}.k_proj.bias"] = k


def _rename_block(rest: str, table: dict[str, str]) -> str | None:
    if rest in table:  # whole-tensor names (ls1.gamma, gamma_1, q_bias)
        return table[rest]
    name, _, leaf = rest.rpartition(".")
    return f"{table[name]}.{leaf}" if name in table else None


def _rename_prefix(key: str) -> str | None:
    if key in _PREFIX:
        return _PREFIX[key]
    name, _, leaf = key.rpartition(".")
    return f"{_PREFIX[name]}.{leaf}" if name in _PREFIX else None


def _fill_defaults(out: dict[str, torch.Tensor]) -> None:
    """Inference-only exports lack the mask token (zeros at init) and, without registers, the register tensor."""
    d = out["embeddings.cls_token"].shape[-1]
    like = out["embeddings.cls_token"]
    out.setdefault("embeddings.mask_token", like.new_zeros(1, 1, d))
    out.setdefault("embeddings.register_tokens", like.new_zeros(1, 0, d))


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Size:
    """The shape of a tensor that the architecture is read from; a missing or misshapen one is named."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state_dict: missing key {key}, needed to tell the architecture")
    if value.ndim != ndim:
        raise ValueError(f"state_dict: {key} has shape {_dims(value)}, expected {ndim} dims")
    return value.shape


def _dims(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _raise_unknown(keys: list[str], layout: str) -> None:
    if keys:
        raise ValueError(f"state_dict: {len(keys)} keys unknown in the {layout} DINOv3 layout, e.g. {keys[:4]}")
