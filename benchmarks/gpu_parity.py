"""GPU parity check: the CUDA attention backends against the exact fp32 path and Hugging Face.

Run on a CUDA machine from the repo root:
    python benchmarks/gpu_parity.py --out $OUT/gpu_parity.json [--speed]

Checks, for each architecture:
  1. fp32 packed (sdpa backend, TF32 off) vs Hugging Face fp32 run image by image: max |diff| / max |ref|.
  2. bf16 packed through each CUDA varlen backend vs the fp32 reference: min token cosine, max rel diff.
  3. A bf16 training step through the varlen kernel vs the fp32 reference: cosine of flattened gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from dinov3_packing import load_packing_model, pack, reference_model, split
from dinov3_packing.apps.bench.timing import Timing, measure, run_metadata, write_report
from dinov3_packing.apps.bench.workloads import mixed_sizes
from dinov3_packing.ops.attention import has_flash_attn


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def packed_inputs(sizes, p, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    hs, grid = pack(images, p)
    return images, hs.to(device), grid


@torch.no_grad()
def forward_checks(arch: str, n_images: int) -> dict:
    dev = "cuda"
    fp32 = load_packing_model(f"random:{arch}", dev, torch.float32, attn_backend="sdpa")
    images, hs, grid = packed_inputs(mixed_sizes(n_images), fp32.patch_size, dev)
    out32 = fp32(hs, grid)
    ref = reference_model(fp32)
    rel = []
    for img, m in zip(images, split(out32.last_hidden_state, grid), strict=True):
        r = ref(img[None].to(dev)).last_hidden_state[0, fp32.num_prefix_tokens :]
        rel.append(float((m.reshape(r.shape) - r).abs().max() / r.abs().max()))
    del ref
    result = {
        "arch": arch,
        "images": n_images,
        "tokens": int(out32.layout.num_tokens),
        "fp32_sdpa_vs_hf_max_rel": max(rel),
    }
    backends = ["varlen", "triton", "sdpa"] + (["flash_attn"] if has_flash_attn() else [])
    for backend in backends:
        m16 = load_packing_model(f"random:{arch}", dev, torch.bfloat16, attn_backend=backend)
        o = m16(hs, grid)
        for name in ("last_hidden_state", "pooler_output"):
            a, b = getattr(o, name).float(), getattr(out32, name)
            result[f"bf16_{backend}_{name}_min_cos"] = float(cosine_rows(a, b).min())
            result[f"bf16_{backend}_{name}_max_rel"] = float((a - b).abs().max() / b.abs().max())
        del m16
    return result


def grad_check(arch: str, n_images: int) -> dict:
    dev = "cuda"
    m32 = load_packing_model(f"random:{arch}", dev, torch.float32, attn_backend="sdpa").train()
    m16 = load_packing_model(f"random:{arch}", dev, torch.bfloat16, attn_backend="varlen").train()
    _, hs, grid = packed_inputs(mixed_sizes(n_images, seed=1), m32.patch_size, dev, seed=1)
    g = torch.Generator(device="cpu").manual_seed(2)
    proj = torch.randn(m32.config.hidden_size, generator=g).to(dev)
    grads = {}
    for name, m in (("fp32", m32), ("bf16", m16)):
        x = hs.detach().to(m.dtype, copy=True).requires_grad_()
        torch.manual_seed(0)  # same RoPE augmentation draws for both
        o = m(x, grid)
        loss = (o.last_hidden_state.float() @ proj).square().mean() + (o.pooler_output.float() @ proj).square().mean()
        loss.backward()
        grads[name] = torch.cat(
            [p.grad.float().flatten() for p in m.parameters() if p.grad is not None] + [x.grad.float().flatten()]
        )
    cos = float(F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0))
    return {"arch": arch, "images": n_images, "grad_cosine_bf16_varlen_vs_fp32": cos}


@torch.no_grad()
def quick_speed(arch: str) -> dict:
    from dinov3_packing.parallel.compile import compile_model

    dev = "cuda"
    m = load_packing_model(f"random:{arch}", dev, torch.bfloat16)
    _, hs, grid = packed_inputs(mixed_sizes(64), m.patch_size, dev)
    hs = hs.bfloat16()

    timing = Timing(target_s=1.0, min_repeats=10, max_repeats=10)

    def bench(fn) -> float:
        return measure(fn, dev, timing, compiled=True)["median_s"]

    eager = bench(lambda: m(hs, grid))
    compile_model(m)
    compiled = bench(lambda: m(hs, grid))
    return {"arch": arch, "mixed64_eager_img_s": 64 / eager, "mixed64_compiled_img_s": 64 / compiled}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/latest/gpu_parity.json")
    parser.add_argument("--archs", default="vits16,vitl16")
    parser.add_argument("--speed", action="store_true", help="also a quick mixed-64 speed check")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {
        "meta": run_metadata("cuda"),
        "forward": [],
        "backward": [],
        "speed": [],
    }
    for arch in args.archs.split(","):
        report["forward"].append(forward_checks(arch, 16))
        print(json.dumps(report["forward"][-1]), flush=True)
        report["backward"].append(grad_check(arch, 8))
        print(json.dumps(report["backward"][-1]), flush=True)
        torch.cuda.empty_cache()
    if args.speed:
        report["speed"].append(quick_speed("vitl16"))
        print(json.dumps(report["speed"][-1]), flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
