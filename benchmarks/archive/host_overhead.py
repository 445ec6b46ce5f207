"""Host time per call of the package's Triton kernels, and where it goes (CUDA).

Archived study, not maintained: it wrote
benchmarks/results/archive/2026-11-25_3c3bac7/host_overhead_h100.json, and is kept as the record of how those
figures were measured. It may no longer run against the package: it reads the private autotuner objects of
`ops.triton.linear_gelu` and `ops.triton.varlen_attention`.

    PYTHONPATH=. python benchmarks/host_overhead.py --out $OUT/host_overhead.json

Each entry issues a call 300 times back to back on tiny inputs (so the GPU keeps up and the host is the
bound) and reports microseconds of host time per call: the custom op as torch.compile's generated code
calls it, the Python launcher with and without its autotuner, the Triton launch alone, and the torch
kernels they replace, for comparison.

`results/host_overhead_h100.json` was measured before the launchers cached the autotuner's choice: since
then a launch with `config=None` after the first one passes the cached config, so the "autotuned" rows
measure the same path as the "tuned config passed" rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from triton.tools.tensor_descriptor import TensorDescriptor

    from dinov3_packing.ops.triton import linear_gelu as lg
    from dinov3_packing.ops.triton import varlen_attention as va

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(256, 1024, device=dev, dtype=dt, generator=g)
    w = torch.randn(4096, 1024, device=dev, dtype=dt, generator=g) * 0.02
    b = torch.randn(4096, device=dev, dtype=dt, generator=g) * 0.02
    qkv = torch.randn(256, 3, 16, 64, device=dev, dtype=dt, generator=g)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device=dev)

    lg.launch_linear_gelu(x, w, b)  # autotune once
    best = lg._tma_autotuned.best_config
    cfg = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    va.launch(q, k, v, cu)
    abest = va._varlen_fwd_tuned.best_config
    acfg = {**abest.kwargs, "num_warps": abest.num_warps, "num_stages": abest.num_stages}
    y = torch.empty(256, 4096, device=dev, dtype=dt)

    def descriptors():
        TensorDescriptor.from_tensor(x, [128, 64])
        TensorDescriptor.from_tensor(w, [256, 64])
        TensorDescriptor.from_tensor(y, [128, 128])

    rows = {
        "torch: F.linear + F.gelu (2 kernels)": lambda: F.gelu(F.linear(x, w, b)),
        "linear_gelu custom op (torch.ops.dinov3_packing.linear_gelu)": lambda: torch.ops.dinov3_packing.linear_gelu(
            x, w, b
        ),
        "launch_linear_gelu, autotuned": lambda: lg.launch_linear_gelu(x, w, b),
        "launch_linear_gelu, tuned config passed (no autotuner)": lambda: lg.launch_linear_gelu(x, w, b, config=cfg),
        "3 x TensorDescriptor.from_tensor": descriptors,
        "linear_gelu_supported": lambda: lg.linear_gelu_supported(x, w, b),
        "torch: varlen_attn (FlashAttention-2)": None,
        "triton_varlen_attention custom op": lambda: torch.ops.dinov3_packing.triton_varlen_attention(q, k, v, cu),
        "varlen_attention.launch, autotuned": lambda: va.launch(q, k, v, cu),
        "varlen_attention.launch, tuned config passed (no autotuner)": lambda: va.launch(q, k, v, cu, config=acfg),
        "varlen_attention.check_inputs": lambda: va.check_inputs(q, k, v, cu),
        "torch.empty_like(q)": lambda: torch.empty_like(q),
    }
    try:
        from torch.nn.attention.varlen import varlen_attn

        rows["torch: varlen_attn (FlashAttention-2)"] = lambda: varlen_attn(q, k, v, cu, cu, 156, 156)
    except ImportError:
        del rows["torch: varlen_attn (FlashAttention-2)"]
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "linear_gelu_config": cfg,
        "attention_config": acfg,
        "us_per_call": {},
    }
    for name, fn in rows.items():
        us = per_call_us(fn)
        result["us_per_call"][name] = round(us, 1)
        print(f"{us:8.1f} us  {name}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
