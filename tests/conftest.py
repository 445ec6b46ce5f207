"""Shared fixtures: small DINOv3 configs and the Hugging Face reference with the same weights.

Parity tolerance (fp32, CPU): max |packed - reference| / max |reference| <= 1e-5 and min token cosine
>= 0.99999. The packed model computes the same operations as Hugging Face in a different summation order
(one GEMM for q/k/v, patch embedding as a Linear instead of a Conv2d); fp32 rounding then differs by
~1e-6 relative (measured), so 1e-5 is tight while leaving room for BLAS blocking differences.
"""

from __future__ import annotations

import os


def _threads_per_worker() -> int | None:
    """Under pytest-xdist (`-n auto`: one worker process per core), torch's default of one intra-op thread
    per core in every worker puts twice as many busy threads as cores on a 2-core machine, and OpenMP's
    threads then wait on descheduled partners. Measured on two cores (2026-12-06), `-n auto`: the whole
    suite 301 s with two threads per worker, 202 s with one; test_parity_real_photographs 3.6 s against
    1.6 s, and 51 s in a run while another process kept the cores busy (1.2 s alone). Each worker gets
    its share of the cores instead, and so do the subprocesses it starts (OMP_NUM_THREADS is inherited);
    an OMP_NUM_THREADS set by the caller is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


_THREADS = _threads_per_worker()
if _THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # before torch starts its thread pool; for subprocesses too

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import DINOv3ViTConfig  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(_THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

REL_TOL = 1e-5
MIN_COS = 0.99999


def tiny_config(**overrides) -> DINOv3ViTConfig:
    """A small DINOv3 config (2 layers, width 32, 4 heads of 8, 4 registers, patch 16) with overrides."""
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        patch_size=16,
        image_size=32,
        layerscale_value=1.0,
    )
    kw.update(overrides)
    return DINOv3ViTConfig(**kw)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL, min_cos: float = MIN_COS):
    """max |got - ref| / max |ref| <= rel_tol and every row's cosine >= min_cos."""
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= rel_tol, f"relative max diff {rel:.3e} > {rel_tol:.0e}"
    cos = F.cosine_similarity(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
    assert cos.min().item() >= min_cos, f"min cosine {cos.min().item():.8f} < {min_cos}"


@pytest.fixture
def tiny():
    return tiny_config


def random_images(sizes, patch_size: int, seed: int = 0, channels: int = 3) -> list[torch.Tensor]:
    """Random pixel tensors of the given sizes in patches: (h, w) -> `[C, h*p, w*p]`, (t, h, w) -> `[t, C, ...]`."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for size in sizes:
        *t, h, w = size
        images.append(torch.randn((*t, channels, h * patch_size, w * patch_size), generator=g))
    return images


@torch.no_grad()
def reference_per_image(ref, images, **kwargs) -> list:
    """Hugging Face `DINOv3ViTModel` run image by image (a clip's frames as one batch): one output each."""
    return [ref(img if img.ndim == 4 else img[None], **kwargs) for img in images]


def capturing_aot_backend():
    """A `torch.compile` backend through AOTAutograd (as Inductor gets its graphs) that keeps the forward and the
    backward FX graph it is handed, in the returned dict under "forward" and "backward", and runs them as they are."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def capture(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward")), graphs
