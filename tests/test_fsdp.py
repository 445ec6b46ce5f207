"""FSDP2 from outside the model: a real 2-process gloo run on CPU equals the 1-process step.

Reference: the same seeded model, unsharded, one process, all images, the global mean loss; one SGD step.
Tolerance: `conftest.assert_close` (1e-5 relative): the sharded run differs only in summation order
(per-rank forward over a different pack, gradient reduce-scatter averaging in fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import assert_close

from dinov3_packing import random_packing_model

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
