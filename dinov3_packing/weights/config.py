"""`config.json` -> a checked `DINOv3ViTConfig`.

Hugging Face builds whatever a config file says and fails later, deep in the first forward (heads that do
not divide the width) or while building a layer (an unknown activation). Here every field the packed
model reads is checked first, and a problem is one ValueError naming the file and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import DINOv3ViTConfig
from transformers.activations import ACT2FN

_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "num_channels",
)
_BOOLS = ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp")


def read_config(path: str | Path) -> DINOv3ViTConfig:
    """Read and check a DINOv3 ViT `config.json`.

    Raises:
        ValueError: the file cannot be read, is not a JSON object, or a field has the wrong type or value
            (sizes must be positive integers, the heads must divide the width into a head_dim divisible by 4
            for RoPE, the activation must be one transformers knows); the message names file and field.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno}, column {e.colno}"
        raise ValueError(f"ckpt: {str(path)!r} is not valid JSON ({where})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"ckpt: cannot read {str(path)!r} ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"ckpt: {str(path)!r}: expected a JSON object of config fields, got {type(raw).__name__}")
    problem = config_problem(raw)
    if problem:
        raise ValueError(f"ckpt: {str(path)!r}: {problem}")
    try:
        return DINOv3ViTConfig.from_dict(raw)
    except (TypeError, ValueError, StrictDataclassError) as e:  # a field the checks above do not cover
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"ckpt: {str(path)!r}: not a valid DINOv3ViTConfig ({first})") from None


def config_problem(fields: dict) -> str | None:
    """The first problem of a dict of config fields, as `"<field>: expected ..., got ..."`; None when the
    fields make a model that runs. Absent fields take `DINOv3ViTConfig`'s defaults and are not checked."""
    if fields.get("model_type", "dinov3_vit") != "dinov3_vit":
        return f"model_type: expected 'dinov3_vit', got {fields['model_type']!r}"
    for name in _POSITIVE_INTS:
        if name in fields and not (_is_int(fields[name]) and fields[name] > 0):
            return f"{name}: expected a positive integer, got {fields[name]!r}"
    registers = fields.get("num_register_tokens", 0)
    if not (_is_int(registers) and registers >= 0):
        return f"num_register_tokens: expected an integer >= 0, got {registers!r}"
    for name in _BOOLS:
        if name in fields and not isinstance(fields[name], bool):
            return f"{name}: expected true or false, got {fields[name]!r}"
    act = fields.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACT2FN:
        return f"hidden_act: expected one of transformers' activations ({', '.join(sorted(ACT2FN))}), got {act!r}"
    for name in ("layer_norm_eps", "rope_theta"):
        if name in fields and not (_is_number(fields[name]) and fields[name] > 0):
            return f"{name}: expected a positive number, got {fields[name]!r}"
    for name in ("attention_dropout", "drop_path_rate"):
        if name in fields and not (_is_number(fields[name]) and 0 <= fields[name] < 1):
            return f"{name}: expected a probability in [0, 1), got {fields[name]!r}"
    if "layerscale_value" in fields and not _is_number(fields["layerscale_value"]):
        return f"layerscale_value: expected a finite number, got {fields['layerscale_value']!r}"
    # Training-time RoPE augmentation: a shift in [-s, s], jitter and rescale log-uniform in [1/x, x].
    for name, low in (("pos_embed_shift", 0.0), ("pos_embed_jitter", 1.0), ("pos_embed_rescale", 1.0)):
        value = fields.get(name)
        if value is not None and not (_is_number(value) and value >= low):
            return f"{name}: expected null or a number >= {low:g}, got {value!r}"
    defaults = DINOv3ViTConfig()
    width = fields.get("hidden_size", defaults.hidden_size)
    heads = fields.get("num_attention_heads", defaults.num_attention_heads)
    if width % heads:
        return f"num_attention_heads: {heads} heads do not divide hidden_size {width}"
    if (width // heads) % 4:
        head_dim = width // heads
        return f"num_attention_heads: head_dim {head_dim} (hidden_size / heads) is not divisible by 4, as RoPE needs"
    return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
