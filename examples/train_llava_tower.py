"""LLaVA-style training of a DINOv3 vision tower with FSDP2: tower (layer -2, 2x2 merge) + 2-layer MLP projector.

    torchrun --nproc_per_node=8 examples/train_llava_tower.py --ckpt random:vitl16 --compile --recompute mlp \
        --images-per-step 512 --steps 50 --out train.json      # GPUs: NCCL, bf16 compute, fp32 master weights
    torchrun --nproc_per_node=2 examples/train_llava_tower.py --ckpt random:vits16 --layers 2 --steps 4
                                                               # CPU: gloo, fp32

The toy objective stands in for the LLM: every photo has a fixed random target in the LLM's width, and
each image's projected tokens, averaged, regress their photo's target (mean squared error). The bundled
photos (`dinov3_packing/assets/images`) are drawn at random sizes (multiples of 32 px, so the 2x2 merge
applies), so every rank runs one packed batch of mixed sizes, and the ranks' token counts differ.

Each step's global batch is the same whatever the number of processes: image i of step s is photo i mod 5
at a size drawn from a generator seeded with (s, i), and rank r takes images r, r + world, ... Each rank's
loss is the sum of its per-image losses times world / global images, so FSDP2's gradient average is the
gradient of the global mean: a run on N processes takes the steps of a run on one (up to summation order).
Rank 0 prints one JSON line per step and writes them all to `--out`, with the number of graphs
`torch.compile` built (`--compile` compiles each block on its own, as FSDP2 needs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dinov3_packing.apps.tower import DINOv3VisionTower
from dinov3_packing.data.files import load_at_patch_multiple, sample_image_paths
from dinov3_packing.parallel.compile import compile_model, compile_stats
from dinov3_packing.parallel.fsdp import apply_fsdp
from dinov3_packing.parallel.recompute import RECOMPUTE_POLICIES, apply_recompute
from dinov3_packing.weights.load import load_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="random:vits16", help="any checkpoint load_packing_model takes")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (quick runs)")
    p.add_argument("--llm-width", type=int, default=512, help="the projector's output width (the LLM's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images-per-step", type=int, default=8, help="global batch, split over the ranks")
    p.add_argument("--min-side", type=int, default=2, help="smallest image side, in 32 px units")
    p.add_argument("--max-side", type=int, default=6, help="largest image side, in 32 px units")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--recompute", choices=[str(r) for r in RECOMPUTE_POLICIES], default="None")
    p.add_argument("--compile", action="store_true", help="compile the tower's blocks (parallel.compile)")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the per-step log (rank 0)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.images_per_step < 1:
        p.error("--steps and --images-per-step must be at least 1")
    if not 1 <= args.min_side <= args.max_side:
        p.error("--min-side and --max-side: expected 1 <= min-side <= max-side")
    if args.layers is not None and args.layers < 2:
        p.error("--layers: expected at least 2 (the tower reads layer -2)")
    args.recompute = None if args.recompute == "None" else args.recompute
    return args


class Projector(nn.Sequential):
    """LLaVA-1.5's projector: Linear, GELU, Linear, from the merged tower width to the LLM's."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


def photos(mean, std) -> list[torch.Tensor]:
    return [load_at_patch_multiple(path, 16, mean, std) for path in sample_image_paths()]


def global_batch(step: int, args, sources: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(photo index, image) for every image of `step`'s global batch, each at its own size."""
    batch = []
    for i in range(args.images_per_step):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 10_007 + i)
        h, w = (32 * int(torch.randint(args.min_side, args.max_side + 1, (1,), generator=g)) for _ in range(2))
        photo = i % len(sources)
        image = F.interpolate(sources[photo][None], size=(h, w), mode="bilinear", antialias=True)[0]
        batch.append((photo, image))
    return batch


def forward_flops(tower: DINOv3VisionTower, images: list[torch.Tensor]) -> float:
    """Matmul FLOPs of the tower's forward over `images` (the blocks that run up to layer -2)."""
    cfg = tower.model.config
    blocks = cfg.num_hidden_layers - 1
    per_block = 4 * cfg.hidden_size**2 + (3 if cfg.use_gated_mlp else 2) * cfg.hidden_size * cfg.intermediate_size
    total = 0.0
    for img in images:
        patches = img.shape[-2] * img.shape[-1] // 256
        n = 1 + cfg.num_register_tokens + patches
        total += blocks * (2 * per_block * n + 4 * n * n * cfg.hidden_size) + 2 * patches * cfg.hidden_size * 768
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)

    loaded = load_checkpoint(args.ckpt)
    model = loaded.model
    if args.layers is not None:
        del model.model.layer[args.layers :]
        model.config.num_hidden_layers = len(model.model.layer)
    model.attn_backend = args.attn_backend
    tower = DINOv3VisionTower(model.to(device), select_layer=-2, merge=True, trainable=True).train()
    g = torch.Generator().manual_seed(args.seed)
    projector = Projector(tower.hidden_size, args.llm_width)
    with torch.no_grad():
        for p in projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    targets = torch.randn(len(sample_image_paths()), args.llm_width, generator=g)
    projector, targets = projector.to(device), targets.to(device)

    # The order torchtitan applies them in: recomputation, compile (one graph per block), then FSDP2. FSDP2
    # runs its untraceable hooks around each block, so the block stack cannot be one graph.
    apply_recompute(tower.model, args.recompute)
    if args.compile:
        compile_model(tower.model, scope="block")
    # bf16 compute on GPU with fp32 master weights and fp32 gradient reduction; fp32 throughout on CPU.
    param_dtype = torch.bfloat16 if cuda else None
    apply_fsdp(tower.model, param_dtype=param_dtype)
    fully_shard(projector, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    params = [*tower.parameters(), *projector.parameters()]
    opt = (
        torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        if args.optimizer == "adamw"
        else torch.optim.SGD(params, lr=args.lr)
    )

    sources = photos(loaded.mean, loaded.std)
    peak = None
    if cuda:
        from dinov3_packing.apps.bench.timing import peak_matmul_tflops

        peak = peak_matmul_tflops(device, torch.bfloat16, 8192)["tflops"]
    log = []
    for step in range(args.steps):
        batch = global_batch(step, args, sources)
        mine = batch[rank::world]
        start = time.perf_counter()
        feats = tower([img.to(device) for _, img in mine])
        pooled = torch.stack([projector(f).float().mean(0) for f in feats])
        losses = (pooled - targets[[photo for photo, _ in mine]]).pow(2).mean(1)
        (losses.sum() * world / len(batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.stack([losses.detach().sum(), torch.tensor(float(sum(f.shape[0] for f in feats)), device=device)])
        dist.all_reduce(stats)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        flops = torch.tensor(3 * forward_flops(tower, [img for _, img in mine]), device=device, dtype=torch.float64)
        dist.all_reduce(flops)
        row = {
            "step": step,
            "loss": stats[0].item() / len(batch),
            "images": len(batch),
            "merged_tokens": int(stats[1].item()),
            "step_s": seconds,
            "images_per_s": len(batch) / seconds,
        }
        if cuda:
            row["mfu_per_gpu"] = flops.item() / world / seconds / (peak * 1e12)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        log.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0 and args.out:
        meta = {"world_size": world, "device": str(device), "args": {k: v for k, v in vars(args).items()}}
        meta["graphs_compiled"] = compile_stats()["unique_graphs"]  # rank 0's; 0 without --compile
        Path(args.out).write_text(json.dumps({"meta": meta, "steps": log}, indent=1))
    dist.barrier()
    # FSDP2's state on the modules (and the optimizer's on their sharded parameters) keeps the process group alive:
    # release them while the interpreter is whole, so the group's native threads stop in destroy_process_group
    # rather than in the interpreter's teardown.
    del opt, params, tower, projector, model, loaded
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
