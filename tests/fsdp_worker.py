"""One FSDP2 training step on a packed batch, run by `test_fsdp.py` under torchrun (gloo, CPU).

Every rank builds the same seeded model, shards it with `parallel.apply_fsdp`, runs its own share of the
images (a packed batch of mixed sizes; the ranks' token counts differ), takes one SGD step and rank 0
saves the global loss, the full gradients and the updated parameters to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from dinov3_packing import pack, random_packing_model
from dinov3_packing.parallel.fsdp import apply_fsdp

# Shared with test_fsdp.py, which runs the same step on one process.
SIZES = [(2, 3), (1, 1), (3, 2), (2, 2), (2, 1, 2)]
LR = 0.5


def config():
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_register_tokens=4,
        patch_size=16,
        image_size=32,
        pos_embed_rescale=None,
    )


def images():
    g = torch.Generator().manual_seed(0)
    return [torch.randn((*s[:-2], 3, s[-2] * 16, s[-1] * 16), generator=g) for s in SIZES]


def image_loss(out_rows: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return out_rows.pow(2).mean() + cls.sum()


def local_loss(model, imgs, world_size: int, num_images: int) -> torch.Tensor:
    """Sum of this rank's per-image losses, scaled so FSDP's gradient average gives the global mean."""
    hidden_states, grid = pack(imgs, 16)
    out = model(hidden_states, grid)
    rows = out.last_hidden_state.split([t * h * w for t, h, w in grid.tolist()])
    cls = out.pooler_output.split([t for t, _, _ in grid.tolist()])
    total = sum(image_loss(r, c) for r, c in zip(rows, cls, strict=True))
    return total * world_size / num_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = random_packing_model(config(), seed=0).train()
    apply_fsdp(model)
    imgs = images()
    mine = imgs[rank::world]
    loss = local_loss(model, mine, world, len(imgs))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    global_loss = loss.detach() / world
    dist.all_reduce(global_loss)
    if rank == 0:
        torch.save({"loss": global_loss, "grads": grads, "params": params}, os.path.join(args.out, "step.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Everything this run checks is in step.pt by now. About one exit in three, torch 2.14's interpreter
    # teardown then aborts one rank ("terminate called without an active exception", after
    # destroy_process_group returned), so the worker leaves without running the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
