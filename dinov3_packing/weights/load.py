"""Checkpoint resolution, in one place.

`--ckpt` / `ckpt=` accepts:
    random:<arch>[@seed]   offline: the exact released architecture with seeded random weights
    <hub id>               a Hugging Face repo (online, or from the local cache)
    <folder>               a `save_pretrained` folder (config.json + safetensors)
    <file>.safetensors     a single weights file; config.json beside it, or the architecture is recognised
                           from the tensor shapes
    <file>.pth / .pt       a Meta original or timm state dict, converted by `convert.py` (tensors only)
The seed document's names (facebook/dinov3-base, ...) are aliases of the real Hub ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from ..model.archs import ARCHS, DEFAULT_CKPT, SEED_ALIASES, arch_config
from ..model.modeling import DINOv3ViTPackingModel
from ..weights.convert import load_pth, model_from_state_dict

logger = logging.getLogger(__name__)

_RANDOM = re.compile(r"^random:(?P<arch>[a-z0-9]+)(?:@(?P<seed>\d+))?$")


def parse_device(device: torch.device | str | None) -> torch.device:
    """A `torch.device` from a name; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}") from None


def resolve_alias(ckpt: str) -> str:
    """Map a seed-document name to its real Hub id, saying so; other names pass through."""
    if ckpt in SEED_ALIASES:
        real = ARCHS[SEED_ALIASES[ckpt]].hub_id
        logger.warning("%s is not a Hugging Face id; using %s", ckpt, real)
        return real
    return ckpt


def load_packing_model(
    ckpt: str = DEFAULT_CKPT,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "auto",
    fused_mlp: bool | None = None,
) -> DINOv3ViTPackingModel:
    """Build a `DINOv3ViTPackingModel` from any checkpoint spelling above, in eval mode.

    `attn_backend` and `fused_mlp` are the model's (see `DINOv3ViTPackingModel`); `fused_mlp=None` (default)
    runs the fused up-projection + GELU kernel wherever it applies, False never.

    Raises:
        TypeError: ckpt is not a string.
        ValueError: unknown architecture, a path that is not a checkpoint, or a Hub id that cannot be fetched.
    """
    if not isinstance(ckpt, str):
        raise TypeError(f"ckpt: expected a string (hub id, path or random:<arch>), got {type(ckpt).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    device = parse_device(device)
    ckpt = resolve_alias(ckpt)
    m = _RANDOM.match(ckpt)
    if ckpt.startswith("random:") and not (m and m["arch"] in ARCHS):
        raise ValueError(f"ckpt: expected random:<arch>[@seed] with arch in {sorted(ARCHS)}, got {ckpt!r}")
    if m:
        config = arch_config(m["arch"])
        model = random_packing_model(config, seed=int(m["seed"] or 0), attn_backend=attn_backend)
    else:
        path = Path(ckpt).expanduser()
        if path.is_file():
            model = _from_file(path, attn_backend)
        elif path.is_dir():
            model = _from_pretrained(str(path), attn_backend)
        elif ckpt.count("/") == 1 and not ckpt.startswith((".", "/", "~")):
            model = _from_pretrained(ckpt, attn_backend)
        else:
            raise ValueError(f"ckpt: {ckpt!r} is not a file, a folder, a Hub id or random:<arch>")
    model.fused_mlp = fused_mlp  # validated by the model
    return model.to(device=device, dtype=dtype).eval()


def reference_model(model: DINOv3ViTPackingModel) -> DINOv3ViTModel:
    """The Hugging Face `DINOv3ViTModel` with exactly the same weights (strict load), in eval mode."""
    ref = DINOv3ViTModel(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.to(device=model.device, dtype=model.dtype).eval()


def random_packing_model(config: DINOv3ViTConfig, seed: int = 0, attn_backend: str = "auto") -> DINOv3ViTPackingModel:
    """A packed model whose every parameter is drawn from a seeded generator.

    All parameters are random, biases and norms included, so parity checks exercise each of them:
    weights N(0, 0.02) clipped at 2 std, biases N(0, 0.02), LayerNorm weights 1 + N(0, 0.1), LayerScale
    U(0.05, 0.3) (released models have small layer scales), CLS/register/mask tokens N(0, 0.5).
    """
    model = DINOv3ViTPackingModel(config, attn_backend=attn_backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("embeddings.") and leaf != "weight" and leaf != "bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif leaf == "lambda1":
                p.copy_(torch.rand(p.shape, generator=g) * 0.25 + 0.05)
            elif ".norm" in f".{name}" and leaf == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.02).clamp_(-0.04, 0.04))
    return model


def _from_pretrained(name_or_path: str, attn_backend: str) -> DINOv3ViTPackingModel:
    try:
        # The local cache first: no network, no retries, and it works offline.
        return DINOv3ViTPackingModel.from_pretrained(name_or_path, attn_backend=attn_backend, local_files_only=True)
    except OSError:
        if Path(name_or_path).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            error = "not found locally"
        else:
            error = None
    if error is None:
        try:
            with _quiet_hub():
                return DINOv3ViTPackingModel.from_pretrained(name_or_path, attn_backend=attn_backend)
        except (OSError, ValueError, RuntimeError) as e:
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f"ckpt: could not load {name_or_path!r} ({error}); pass a local folder or .safetensors file with "
        "the weights, or random:<arch> (e.g. random:vitl16) to run offline"
    )


@contextmanager
def _quiet_hub():
    """Silence the download libraries' retry warnings; a failure is reported once, by us."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _from_file(path: Path, attn_backend: str) -> DINOv3ViTPackingModel:
    """One weights file in any supported layout (`convert.py`); config.json beside it wins over shapes."""
    if path.suffix in (".pth", ".pt"):
        state = load_pth(path)  # weights_only: never runs pickled code
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        raise ValueError(f"ckpt: expected a .safetensors, .pth or .pt file or a folder, got {str(path)!r}")
    config_file = path.with_name("config.json")
    config = DINOv3ViTConfig(**json.loads(config_file.read_text())) if config_file.exists() else None
    try:
        return model_from_state_dict(state, config=config, attn_backend=attn_backend)
    except ValueError as e:
        hint = " (or put its config.json beside it)" if str(e).startswith("config:") else ""
        raise ValueError(f"ckpt: {str(path)!r}: {e}{hint}") from None
