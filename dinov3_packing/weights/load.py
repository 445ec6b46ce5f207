"""Checkpoint resolution, in one place.

`--ckpt` / `ckpt=` accepts:
    random:<arch>[@seed]   offline: the exact released architecture with seeded random weights
                           (0 <= seed < 2**63)
    <hub id>               a Hugging Face repo (from the local cache, else downloaded): its config.json and
                           safetensors only
    <folder>               a `save_pretrained` folder: config.json + model.safetensors (or a sharded
                           model.safetensors.index.json)
    <file>.safetensors     a single weights file; config.json beside it, or the architecture is recognised
                           from the tensor shapes
    <file>.pth / .pt       a Meta original or timm state dict, converted by `convert.py` (tensors only)
The seed document's names (facebook/dinov3-base, ...) are aliases of the real Hub ids.

Loading is exact, as parity needs: every tensor of the checkpoint fills one parameter of the model its
config.json (or its shapes) describes, none is missing, none is left over, every shape matches. Anything
else (a missing, unexpected or misshapen key, a file that is not safetensors, a folder of pickles, an
invalid config) is one ValueError naming the file and the key or field, raised before any forward.
Pickled weights in a folder (`pytorch_model.bin`) are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from ..model.archs import ARCHS, DEFAULT_CKPT, SEED_ALIASES, arch_config, normalization_for
from ..model.modeling import DINOv3ViTPackingModel
from ..ops.attention import check_attention_backend
from .config import read_config
from .convert import load_pth, model_for_config, model_from_state_dict

logger = logging.getLogger(__name__)

_RANDOM = re.compile(r"^random:(?P<arch>[a-z0-9]+)(?:@(?P<seed>\d+))?$")
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit integer
# What is fetched of a Hub repo: the config and the safetensors weights (one file or shards), no pickles.
_HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
_PICKLES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Loaded:
    """A checkpoint, loaded: the model and the normalization its input pixels need.

    Attributes:
        model: the `DINOv3ViTPackingModel`, in eval mode, on the asked device and dtype.
        mean, std: per-channel pixel normalization the checkpoint expects (`archs.normalization_for`).
        name: the checkpoint as resolved (a seed-document alias becomes its real Hub id).
    """

    model: DINOv3ViTPackingModel
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


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


def load_checkpoint(
    ckpt: str = DEFAULT_CKPT,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "auto",
    fused_mlp: bool | None = None,
) -> Loaded:
    """Load any checkpoint spelling above once: the model (eval mode) and its normalization.

    `attn_backend` and `fused_mlp` are the model's (see `DINOv3ViTPackingModel`); `fused_mlp=None` (default)
    runs the fused up-projection + GELU kernel wherever it applies, False never.

    Raises:
        TypeError: ckpt is not a string, or dtype not a torch.dtype.
        ValueError: unknown attn_backend, unknown architecture or seed out of range, a path that is not a
            checkpoint, a checkpoint that does not fit its config exactly (naming the file and key or
            field), or a Hub id that cannot be fetched.
    """
    if not isinstance(ckpt, str):
        raise TypeError(f"ckpt: expected a string (hub id, path or random:<arch>), got {type(ckpt).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    device = parse_device(device)
    check_attention_backend(attn_backend)  # before a download or a load, not after
    name = resolve_alias(ckpt)
    if name.startswith("random:"):
        arch, seed = _parse_random(name)
        model = random_packing_model(arch_config(arch), seed=seed, attn_backend=attn_backend)
    else:
        path = Path(name).expanduser()
        if path.is_file():
            model = _from_file(path, attn_backend)
        elif path.is_dir():
            model = _from_folder(path, attn_backend)
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            model = _from_folder(_hub_folder(name), attn_backend, source=name)
        else:
            raise ValueError(f"ckpt: {name!r} is not a file, a folder, a Hub id or random:<arch>")
    model.fused_mlp = fused_mlp  # validated by the model
    mean, std = normalization_for(name)
    return Loaded(model.to(device=device, dtype=dtype).eval(), mean, std, name)


def load_packing_model(
    ckpt: str = DEFAULT_CKPT,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "auto",
    fused_mlp: bool | None = None,
) -> DINOv3ViTPackingModel:
    """`load_checkpoint(...).model`: the model alone, for callers that need no normalization."""
    return load_checkpoint(ckpt, device, dtype, attn_backend, fused_mlp).model


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


def _parse_random(ckpt: str) -> tuple[str, int]:
    m = _RANDOM.match(ckpt)
    if not (m and m["arch"] in ARCHS):
        raise ValueError(f"ckpt: expected random:<arch>[@seed] with arch in {sorted(ARCHS)}, got {ckpt!r}")
    seed = int(m["seed"] or 0)
    if seed >= SEED_LIMIT:
        raise ValueError(f"ckpt: the seed of {ckpt!r} is out of range: expected 0 <= seed < 2**63")
    return m["arch"], seed


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hub repo's config and safetensors: the cache first, then a download."""
    try:
        # The local cache first: no network, no retries, and it works offline.
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
        if _has_weights(folder) and (folder / "config.json").is_file():
            return folder
        error = "the local copy is incomplete"
    except OSError:
        error = "not found locally"
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        try:
            with _quiet_hub():
                return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
        except (OSError, ValueError, RuntimeError) as e:
            error = _first_line(e)
    raise ValueError(
        f"ckpt: could not load {repo_id!r} ({error}); pass a local folder or .safetensors file with "
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
        state = _read_safetensors(path)
    else:
        raise ValueError(f"ckpt: expected a .safetensors, .pth or .pt file or a folder, got {str(path)!r}")
    config_file = path.with_name("config.json")
    config = read_config(config_file) if config_file.is_file() else None
    return _build(state, config, path, config_file if config else None, attn_backend)


def _from_folder(folder: Path, attn_backend: str, source: str | None = None) -> DINOv3ViTPackingModel:
    """A `save_pretrained` folder (or a Hub snapshot, `source` its id): config.json and safetensors."""
    where = source or str(folder)
    if not _has_weights(folder):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLES)
        if pickles:
            raise ValueError(
                f"ckpt: {where!r} holds pickled weights ({', '.join(pickles)}) and no model.safetensors; "
                "pickles are never loaded from a folder (unpickling can run code): convert them to "
                "safetensors where you trust them, e.g. DINOv3ViTModel.from_pretrained(folder)"
                ".save_pretrained(folder)"
            )
        raise ValueError(f"ckpt: {where!r} holds no model.safetensors (nor model.safetensors.index.json)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"ckpt: {where!r} has weights but no config.json")
    config = read_config(config_file)
    weights = folder / "model.safetensors"
    if weights.is_file():
        return _build(_read_safetensors(weights), config, weights, config_file, attn_backend)
    index = folder / "model.safetensors.index.json"
    return _build(_read_sharded(index), config, index, config_file, attn_backend)


def _build(
    state: dict[str, torch.Tensor],
    config: DINOv3ViTConfig | None,
    weights: Path,
    config_file: Path | None,
    attn_backend: str,
) -> DINOv3ViTPackingModel:
    try:
        if config is None:
            return model_from_state_dict(state, attn_backend=attn_backend)
        return model_for_config(state, config, attn_backend=attn_backend)
    except ValueError as e:
        if config_file is not None:
            raise ValueError(f"ckpt: {str(weights)!r} (with {str(config_file)!r}): {e}") from None
        hint = " (or put its config.json beside it)" if str(e).startswith("config:") else ""
        raise ValueError(f"ckpt: {str(weights)!r}: {e}{hint}") from None


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"ckpt: cannot read {str(path)!r} as safetensors ({_first_line(e)})") from None


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: each shard named in the index, each key found where it says."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"ckpt: {str(index)!r} is not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"ckpt: {str(index)!r}: weight_map: expected an object of key -> shard file name")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if path.parent != index.parent or not path.is_file():
            raise ValueError(f"ckpt: {str(index)!r} names shard {shard!r}, which is not a file beside it")
        tensors = _read_safetensors(path)
        absent = [k for k, v in weight_map.items() if v == shard and k not in tensors]
        if absent:
            raise ValueError(f"ckpt: {str(path)!r} lacks {absent[0]}, which {str(index)!r} places there")
        state.update(tensors)
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
