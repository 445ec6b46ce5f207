"""GPU timing of the RoPE kernel (ops/triton/rope.py) against what torch.compile generates for the same work.

    python benchmarks/rope_gpu_check.py --out $OUT/rope.jsonl

ViT-L heads (16 x 64), bf16, mixed-64's 60,038 tokens. Rows (`apps.bench.timing.write_rows`), each the median of
CUDA-event timings after warm-up, with the bytes the work must move and the bandwidth that makes:
    forward   rotate planes 0-1 of a fused [tokens, 3, heads, 64] projection into a new [tokens, 2, heads, 64]:
              `rope_planes` vs `torch.compile(apply_rope)`.
    backward  build the fused q/k/v gradient from the attention's dq, dk, dv: the compiled
              `stack([R^T dq, R^T dk, dv])` (what Inductor generates for RoPE's backward when it stays outside
              the fa4 op) vs the kernel un-rotating in place the q/k planes of a gradient the attention kernel
              wrote into (the fa4 op's path with `DIRECT_GRADS`).
    bias      the forward with the q/k bias added in the pass, and the backward's in-place un-rotation with the
              bias gradient summed in it (`sums`) under each launch of `SUMS_LAUNCH_CANDIDATES` (their sums
              checked against the fp32 sum of the un-rotated gradient); the fastest is adopted in the `adopted`
              row (`ops.triton.rope.SUMS_LAUNCH` is what the training op runs).
"""

from __future__ import annotations

import argparse
import json

import torch

from dinov3_packing.apps.bench.timing import run_metadata, write_rows
from dinov3_packing.ops.attention import apply_rope
from dinov3_packing.ops.triton import rope
from dinov3_packing.ops.triton.rope import rope_planes, rope_reference

SUMS_LAUNCH_CANDIDATES = (
    {"kernel": "rows", "block": 32, "num_warps": 4, "iters": 1},
    {"kernel": "rows", "block": 32, "num_warps": 1, "iters": 1},
    {"kernel": "rows", "block": 64, "num_warps": 2, "iters": 1},
    {"kernel": "heads", "block": 32, "num_warps": 4, "iters": 8},
    {"kernel": "heads", "block": 32, "num_warps": 2, "iters": 8},
    {"kernel": "heads", "block": 64, "num_warps": 4, "iters": 4},
    {"kernel": "heads", "block": 32, "num_warps": 4, "iters": 16},
)


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=60_038)
    ap.add_argument("--adopted-file", default=None, help="write the fastest sums launch here (JSON)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    n, h, d = args.tokens, 16, 64
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(n, 3, h, d, generator=g, device=dev, dtype=dt)
    angles = torch.rand(n, d // 2, generator=g, device=dev).mul(6.3).repeat(1, 2)
    sin = angles.sin()
    cos, sin = angles.cos().to(dt), torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=1).to(dt)
    dq, dk, dv = (torch.randn(n, h, d, generator=g, device=dev, dtype=dt) for _ in range(3))
    plane = n * h * d * qkv.element_size()
    table = 2 * cos.numel() * cos.element_size()
    write_rows(args.out, [{"part": "meta", **run_metadata(dev)}])

    qk = torch.empty(n, 2, h, d, device=dev, dtype=dt)
    fwd_compiled = torch.compile(lambda x: apply_rope(x[:, :2], cos, sin))

    def bwd_reference(dq, dk, dv):
        planes = torch.stack([dq, dk], dim=1)
        return torch.cat([rope_reference(planes, cos, sin, inverse=True), dv[:, None]], dim=1)

    bwd_compiled = torch.compile(bwd_reference)
    grad = torch.empty(n, 3, h, d, device=dev, dtype=dt)
    checks = {
        "forward": (rope_planes(qkv[:, :2], qk, cos, sin), fwd_compiled(qkv)),
        "backward": (None, bwd_compiled(dq, dk, dv)),
    }
    grad[:, 0], grad[:, 1], grad[:, 2] = dq, dk, dv
    rope_planes(grad[:, :2], grad[:, :2], cos, sin, inverse=True)
    checks["backward"] = (grad, checks["backward"][1])
    rows = []
    for kind, (got, want) in checks.items():
        diff = (got.float() - want.float()).abs().max().item()
        rows.append({"part": "check", "kind": kind, "max_abs_diff_vs_compiled": diff})
    cases = {
        ("forward", "rope_planes (Triton)"): (lambda: rope_planes(qkv[:, :2], qk, cos, sin), 4 * plane + table),
        ("forward", "torch.compile(apply_rope)"): (lambda: fwd_compiled(qkv), 4 * plane + table),
        ("backward", "compiled stack of R^T dq, R^T dk, dv"): (lambda: bwd_compiled(dq, dk, dv), 6 * plane + table),
        ("backward", "rope_planes in place on the q/k planes"): (
            lambda: rope_planes(grad[:, :2], grad[:, :2], cos, sin, inverse=True),
            4 * plane + table,
        ),
    }
    for (kind, name), (fn, nbytes) in cases.items():
        ms = _time(fn)
        rows.append(
            {"part": "time", "kind": kind, "impl": name, "ms": ms, "bytes": nbytes, "GB_per_s": nbytes / ms / 1e6}
        )
    # The bias: added in the forward's pass, and its gradient summed in the backward's un-rotation.
    bias = torch.randn(2, h, d, generator=g, device=dev, dtype=dt)
    sums = torch.empty(2, h, d, device=dev)
    want = rope_reference(torch.stack([dq, dk], dim=1).float(), cos.float(), sin.float(), inverse=True).sum(0)
    fn = lambda: rope_planes(qkv[:, :2], qk, cos, sin, bias=bias)  # noqa: E731
    ms = _time(fn)
    rows.append({"part": "time", "kind": "forward", "impl": "rope_planes with the bias", "ms": ms})
    best = None
    saved = dict(rope.SUMS_LAUNCH)
    for launch in SUMS_LAUNCH_CANDIDATES:
        rope.SUMS_LAUNCH = dict(launch)

        def run():
            grad[:, 0], grad[:, 1] = dq, dk  # (the copies are timed apart below)
            rope_planes(grad[:, :2], grad[:, :2], cos, sin, inverse=True, sums=sums)

        run()
        err = ((sums - want).abs().max() / want.abs().max()).item()
        ms = _time(run)
        rows.append({"part": "time", "kind": "backward+sums", "launch": launch, "ms": ms, "sums_max_rel": err})
        if err < 1e-4 and (best is None or ms < best[0]):
            best = (ms, launch)
    rope.SUMS_LAUNCH = saved

    def copies():
        grad[:, 0], grad[:, 1] = dq, dk

    ms = _time(copies)
    rows.append({"part": "time", "kind": "backward+sums", "impl": "the two plane copies alone", "ms": ms})

    def no_sums():
        copies()
        rope_planes(grad[:, :2], grad[:, :2], cos, sin, inverse=True)

    ms = _time(no_sums)
    rows.append({"part": "time", "kind": "backward+sums", "impl": "copies + un-rotation without sums", "ms": ms})
    rows.append({"part": "adopted", "sums_launch": best[1] if best else None, "ms": best[0] if best else None})
    if args.adopted_file and best:  # for `fa4_gpu_check.py --pin-rope-sums FILE` in a later process
        with open(args.adopted_file, "w") as f:
            json.dump(best[1], f)
    for r in rows:
        print(r)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
