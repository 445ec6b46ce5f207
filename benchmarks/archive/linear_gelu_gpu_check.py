"""GPU check of the fused up-projection + exact GELU kernel (kernels/linear_gelu.py) on CUDA.

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_952b512/linear_gelu_h100.txt,
and is kept as the record of how those figures were measured. It may no longer run against the package: it
calls `benchmark_linear_gelu` and the private `_tma_compatible` of `ops.triton.linear_gelu`.

    PYTHONPATH=. python benchmarks/linear_gelu_gpu_check.py > $OUT/linear_gelu_h100.txt

Accuracy of every config of both kernels (TMA persistent, pointer fallback) against fp32, next to the
unfused torch path's own error, on odd shapes, strided inputs and an output of more than 2^31 elements;
then `benchmark_linear_gelu` (cuBLAS F.linear, F.gelu, both, and the fused kernel, same run) at the
MLP widths of ViT-S/B/L/H+ and 7B; then one torch.compile(dynamic=True) check over three token counts.
"""

# ruff: noqa: E501
import json
import time

import torch
import torch.nn.functional as F
import triton

from dinov3_packing.ops.triton import linear_gelu as lg

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
g = torch.Generator(device="cuda").manual_seed(0)


def mk(M, K, N, dt, bias, layout):
    if layout == "rowview":
        x = torch.randn(M, K + 64, device="cuda", generator=g)[:, 32 : 32 + K].to(dt)
    elif layout == "unaligned":
        x = torch.randn(M, K + 64, device="cuda", generator=g).to(dt)[:, 1 : 1 + K]
    elif layout == "t":
        x = torch.randn(K, M, device="cuda", generator=g).to(dt).t()
    else:
        x = torch.randn(M, K, device="cuda", generator=g).to(dt)
    w = ((torch.rand(N, K, device="cuda", generator=g) * 2 - 1) / K**0.5).to(dt)
    b = (torch.rand(N, device="cuda", generator=g) * 2 - 1).to(dt) if bias else None
    return x, w, b


t0 = time.time()
worst = {}
for dt in (torch.bfloat16, torch.float16):
    for M, K, N, bias, layout in [
        (1000, 384, 1536, False, "c"),
        (4099, 1024, 4096, True, "c"),
        (517, 72, 200, True, "c"),
        (777, 768, 3072, True, "rowview"),
        (300, 128, 256, True, "t"),
        (1, 1280, 5120, True, "c"),
        (333, 1024, 4096, True, "unaligned"),
        (129, 100, 300, True, "c"),
        (70, 70, 70, True, "c"),
    ]:
        x, w, b = mk(M, K, N, dt, bias, layout)
        with torch.inference_mode():
            ref32 = F.gelu(F.linear(x.float(), w.float(), None if b is None else b.float()))
            reflp = F.gelu(F.linear(x, w, b))
            s = ref32.abs().max().item()
            outs = {"auto": lg.linear_gelu(x, w, b), "ptr_auto": lg.launch_linear_gelu(x, w, b, kernel="ptr")}
            for i, c in enumerate(lg.PTR_CONFIGS):
                outs[f"ptr{i}"] = lg.launch_linear_gelu(x, w, b, c, kernel="ptr")
            if lg._tma_compatible(x, w) and N % 8 == 0:
                for i, c in enumerate(lg.CONFIGS):
                    outs[f"tma{i}"] = lg.launch_linear_gelu(x, w, b, c, kernel="tma")
                outs["tma_libdevice"] = lg.launch_linear_gelu(x, w, b, lg.CONFIGS[0], kernel="tma", erf="libdevice")
        e_torch = (reflp.float() - ref32).abs().max().item() / s
        errs = {k: (o.float() - ref32).abs().max().item() / s for k, o in outs.items()}
        bad = {k: v for k, v in errs.items() if not v <= e_torch}
        print(
            f"{dt!s:15s} M={M} K={K} N={N} bias={bias} {layout}: torch rel {e_torch:.2e}; kernel max rel {max(errs.values()):.2e} over {len(errs)} variants; worse than torch: {bad}",
            flush=True,
        )
# > 2**31 output elements: int64 offsets (ptr) and TMA coordinates
M, K, N = 131072 + 77, 1024, 16384
x, w, b = mk(M, K, N, torch.bfloat16, True, "c")
with torch.inference_mode():
    for kern in ("tma", "ptr"):
        y = lg.launch_linear_gelu(x, w, b, lg.CONFIGS[0] if kern == "tma" else lg.PTR_CONFIGS[0], kernel=kern)
        rows = torch.cat([torch.arange(0, 64), torch.arange(M - 300, M)]).cuda()
        ref = F.gelu(F.linear(x[rows].float(), w.float(), b.float()))
        print("big", kern, y.shape, ((y[rows].float() - ref).abs().max() / ref.abs().max()).item(), flush=True)
        del y
del x, w, b
torch.cuda.empty_cache()
print("correctness s", time.time() - t0, flush=True)
for K in (1024, 384, 768, 1280, 4096):
    r = lg.benchmark_linear_gelu(M=60038 if K < 4096 else 30000, K=K, N=4 * K)
    print(json.dumps(r), flush=True)
r = lg.benchmark_linear_gelu(M=60038, K=1024, N=4096, dtype=torch.float16)
print(json.dumps(r), flush=True)
r = lg.benchmark_linear_gelu(M=10007, K=1024, N=4096)
print(json.dumps(r), flush=True)


@torch.compile(fullgraph=True, dynamic=True)
def f(x, w, b):
    return lg.linear_gelu(x, w, b) * 2


with torch.inference_mode():
    for M in (1000, 2000, 3001):
        x, w, b = mk(M, 1024, 4096, torch.bfloat16, True, "c")
        y = f(x, w, b)
        print("compile", M, ((y - 2 * lg.launch_linear_gelu(x, w, b)).abs().max().item()), flush=True)
print("total s", time.time() - t0)
