"""The k x k block mean of decoded pixels (ops/triton/box_mean.py), GPU decoding's first step on large photos.

The Triton kernel runs under Triton's CPU interpreter in a subprocess (`triton_interpreter.run_interpreted`)
on the layouts GPU decoding hands it: the hardware decoder's interleaved pixels seen as `[C, H, W]`, the same
turned by an EXIF orientation (a transposed view), torchvision's planar pixels, sizes with rows and columns
left over and a width over one program's block. Both the kernel and the torch fallback must equal the block
mean computed in float64 with NumPy exactly: float32 holds every sum and the division by k * k.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from triton_interpreter import run_interpreted

from dinov3_packing.ops.triton.box_mean import BLOCK_X, box_mean, box_mean_reference

pytest.importorskip("triton")

# (name, height, width, layout, k): layout "hwc" (interleaved), "hwc_t" (interleaved, transposed view),
# "chw" (planar)
CASES = [
    ("hwc_k2", 37, 53, "hwc", 2),
    ("hwc_k4_wide", 21, 4 * BLOCK_X + 13, "hwc", 4),
    ("hwc_t_k4", 45, 33, "hwc_t", 4),
    ("chw_k8", 67, 2 * 8 * BLOCK_X + 9, "chw", 8),
    ("chw_k2_exact_fit", 16, 32, "chw", 2),
]


def pixels(height: int, width: int, layout: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "chw":
        return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    hwc = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    chw = hwc.permute(2, 0, 1)
    return chw.transpose(1, 2) if layout == "hwc_t" else chw


def numpy_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.numpy().astype(np.float64)
    h, w = a.shape[1] // k, a.shape[2] // k
    return torch.from_numpy(a[:, : h * k, : w * k].reshape(3, h, k, w, k).mean(axis=(2, 4))).float()


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, "tests")  # the subprocess runs in the repository
    from test_box_mean import numpy_mean, pixels
    from dinov3_packing.ops.triton.box_mean import box_mean

    out = {}
    for i, (name, height, width, layout, k) in enumerate(json.loads(sys.argv[1])):
        x = pixels(height, width, layout, i)
        got = box_mean(x, k, use_kernel=True)
        ref = numpy_mean(x, k)
        out[name] = {
            "shape": list(got.shape),
            "dtype": str(got.dtype),
            "contiguous": got.is_contiguous(),
            "equal": bool(torch.equal(got, ref)),
            "max_err": (got - ref).abs().max().item(),
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(_SCRIPT, json.dumps(CASES), timeout=300)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_is_the_exact_block_mean_under_the_interpreter(results, case):
    name, height, width, layout, k = case
    r = results[name]
    rows, cols = (width, height) if layout == "hwc_t" else (height, width)  # a transposed view
    assert r["shape"] == [3, rows // k, cols // k], r
    assert r["dtype"] == "torch.float32" and r["contiguous"], r
    assert r["equal"], r


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_fallback_is_the_exact_block_mean(case):
    _, height, width, layout, k = case
    x = pixels(height, width, layout, 0)
    assert torch.equal(box_mean(x, k), numpy_mean(x, k))  # on the CPU box_mean takes the fallback
    assert torch.equal(box_mean_reference(x, k), numpy_mean(x, k))


@pytest.mark.parametrize(
    ("x", "k", "error", "match"),
    [
        (torch.zeros(3, 8, 8), 2, TypeError, r"x: expected a uint8 tensor \[C, H, W\], got torch.float32"),
        (torch.zeros(8, 8, dtype=torch.uint8), 2, TypeError, r"x: expected a uint8 tensor"),
        ([1, 2, 3], 2, TypeError, r"x: expected a uint8 tensor \[C, H, W\], got list"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), 3, ValueError, r"k: expected one of \(2, 4, 8\), got 3"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), True, ValueError, r"k: expected one of"),
        (torch.zeros(3, 4, 9, dtype=torch.uint8), 8, ValueError, r"x: expected at least 8 x 8 pixels"),
    ],
)
def test_bad_input_is_refused_before_launch(x, k, error, match):
    with pytest.raises(error, match=match):
        box_mean(x, k, use_kernel=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")
@pytest.mark.parametrize("layout", ["hwc", "hwc_t", "chw"])
def test_gpu_kernel_is_the_exact_block_mean(layout):
    x = pixels(3024, 4032, layout, 1)
    for k in (2, 4, 8):
        got = box_mean(x.cuda(), k)
        assert torch.equal(got.cpu(), box_mean_reference(x, k)), (layout, k)
