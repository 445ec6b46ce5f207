"""FSDP2 on GPUs through NCCL: one training step on N ranks equals the same step on one GPU.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_nccl.py --out $OUT/fsdp.json

Every rank builds the same seeded ViT-S/16 (fp32, exact SDPA path so the comparison is tight), shards it
with `parallel.apply_fsdp`, runs its share of a mixed-size pack and steps. Rank 0 then runs the whole pack
on one GPU without FSDP and compares loss and every gradient (max |diff| / max |ref|). Then the same
sharded step in bf16 through `varlen_attn` is timed on every rank with CUDA events (five steps after a
warm-up, `apps.bench.timing.time_calls`); rank 0 reports the median of the slowest rank's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from dinov3_packing import load_packing_model, pack
from dinov3_packing.apps.bench.timing import run_metadata, time_calls, write_report
from dinov3_packing.parallel.fsdp import apply_fsdp


def batch(n: int):
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 16 * rng.randint(14, 40), 16 * rng.randint(14, 40), generator=g) for _ in range(n)]


def loss_of(model, imgs, scale: float, dtype) -> torch.Tensor:
    hs, grid = pack(imgs, 16)
    out = model(hs.to("cuda", dtype), grid)
    return (out.last_hidden_state.float().square().sum() + out.pooler_output.float().sum()) * scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/latest/fsdp_nccl.json")
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = False
    imgs = batch(args.images)
    scale = 1.0 / args.images

    model = load_packing_model("random:vits16", "cuda", torch.float32, attn_backend="sdpa").train()
    # RoPE coordinate augmentation draws per image from each rank's RNG; off, so both runs see the same inputs.
    model.config.pos_embed_rescale = None
    apply_fsdp(model)
    loss = loss_of(model, imgs[rank::world], scale * world, torch.float32)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    total = loss.detach() / world
    dist.all_reduce(total)

    report = {}
    if rank == 0:
        ref = load_packing_model("random:vits16", "cuda", torch.float32, attn_backend="sdpa").train()
        ref.config.pos_embed_rescale = None
        ref_loss = loss_of(ref, imgs, scale, torch.float32)
        ref_loss.backward()
        worst = max(
            float((grads[n] - p.grad).abs().max() / p.grad.abs().max())
            for n, p in ref.named_parameters()
            if p.grad is not None and p.grad.abs().max() > 0
        )
        report = {
            "meta": run_metadata("cuda"),
            "world_size": world,
            "loss_fsdp": float(total),
            "loss_one_gpu": float(ref_loss),
            "loss_rel_diff": abs(float(total) - float(ref_loss)) / abs(float(ref_loss)),
            "grad_max_rel_diff": worst,
            "grads_compared": len(grads),
        }
        print(json.dumps(report), flush=True)

    # Timed bf16 sharded steps through the varlen kernel.
    m16 = load_packing_model("random:vits16", "cuda", torch.bfloat16).train()
    apply_fsdp(m16)
    mine = imgs[rank::world]

    def step() -> None:
        m16.zero_grad(set_to_none=True)
        loss_of(m16, mine, scale * world, torch.bfloat16).backward()

    step()  # warm-up
    torch.cuda.synchronize()
    dist.barrier()
    times = torch.tensor(time_calls(step, 5, "cuda"), device="cuda")
    # Every step waits for the slowest rank's collectives: its times are the step's.
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        step_s = statistics.median(times.tolist())
        report["bf16_varlen_step_ms"] = step_s * 1e3
        report["bf16_images_per_s"] = args.images / step_s
        print(json.dumps(report), flush=True)
        write_report(args.out, report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
