"""examples/train_llava_tower.py: a real 2-process FSDP2 run (torchrun, gloo, CPU) against a 1-process run.

Both runs take the same global batch every step (the bundled photos at mixed sizes; the two ranks' packs
hold different images and token counts), with recomputation of the MLPs on. Reference: the 1-process
run. Tolerance: each step's global loss within 1e-5 relative (`conftest.REL_TOL`). fp32; the runs differ
in summation order only (other packs, FSDP2's fp32 reduce-scatter over two ranks, the loss all-reduce):
measured ~1.3e-6. SGD keeps that difference from growing; AdamW divides by the gradient's running RMS,
which turns rounding-level gradient differences on near-zero gradients into visible update differences.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REL_TOL

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_llava_tower.py"
ARGS = ["--layers", "2", "--steps", "4", "--images-per-step", "6", "--recompute", "mlp"]
ARGS += ["--optimizer", "sgd", "--lr", "0.3"]


def _run(nproc: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(SCRIPT)]
    result = subprocess.run([*cmd, *ARGS, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["world_size"] == nproc
    return report["steps"]


def test_two_processes_take_the_steps_of_one_and_the_loss_goes_down(tmp_path):
    two = _run(2, tmp_path / "two.json")
    one = _run(1, tmp_path / "one.json")
    assert [r["merged_tokens"] for r in two] == [r["merged_tokens"] for r in one]
    assert len({r["merged_tokens"] for r in one}) > 1  # the steps' batches differ in size
    for a, b in zip(two, one, strict=True):
        assert abs(a["loss"] - b["loss"]) <= REL_TOL * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    losses = [r["loss"] for r in one]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.98 * losses[0], losses
