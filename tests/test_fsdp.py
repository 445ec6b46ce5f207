"""FSDP2 from outside the model: a real 2-process gloo run on CPU equals the 1-process step; with
`compile_model` only the per-block scope composes with it.

Reference: the same seeded model, unsharded, one process, all images, the global mean loss; one SGD step.
Tolerance: `conftest.assert_close` (1e-5 relative): the sharded run differs only in summation order
(per-rank forward over a different pack, gradient reduce-scatter averaging in fp32, inductor's kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_close

from dinov3_packing import random_packing_model
from dinov3_packing.parallel.compile import compile_model, compile_stats
from dinov3_packing.parallel.fsdp import apply_fsdp

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker as worker


def test_fsdp2_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(Path(worker.__file__)),
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "step.pt", weights_only=True)

    model = random_packing_model(worker.config(), seed=0).train()
    imgs = worker.images()
    loss = worker.local_loss(model, imgs, world_size=1, num_images=len(imgs))
    loss.backward()
    assert_close(got["loss"][None], loss.detach()[None])
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(grads) and len(grads) > 20
    for name, grad in grads.items():
        assert_close(got["grads"][name], grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(worker.LR * p.grad)
    for name, p in model.named_parameters():
        assert_close(got["params"][name], p.detach())


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group in this process (FSDP2 shards over it like over many)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_stack_compile_and_fsdp_reject_each_other_in_either_order(one_rank_group):
    # FSDP2's hooks around each block are dynamo-disabled: a one-graph stack over them raised
    # torch._dynamo.exc.Unsupported at the first forward (examples/train_llava_tower.py --compile).
    stacked = compile_model(random_packing_model(worker.config(), seed=0))
    with pytest.raises(ValueError, match=r"model: .*scope='block'"):
        apply_fsdp(stacked)
    sharded = apply_fsdp(random_packing_model(worker.config(), seed=0))
    with pytest.raises(ValueError, match=r"scope: .*scope='block'"):
        compile_model(sharded)


@pytest.mark.parametrize("compile_first", [True, False])
def test_block_compile_composes_with_fsdp_in_either_order(one_rank_group, compile_first):
    torch._dynamo.reset()
    model = random_packing_model(worker.config(), seed=0).train()
    if compile_first:
        apply_fsdp(compile_model(model, scope="block"))
    else:
        compile_model(apply_fsdp(model), scope="block")
    imgs = worker.images()
    worker.local_loss(model, imgs, world_size=1, num_images=len(imgs)).backward()
    assert compile_stats()["unique_graphs"] >= 1
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}

    eager = random_packing_model(worker.config(), seed=0).train()
    worker.local_loss(eager, imgs, world_size=1, num_images=len(imgs)).backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert set(got) == set(grads) and len(grads) > 20
    for name, grad in grads.items():
        assert_close(got[name], grad)
