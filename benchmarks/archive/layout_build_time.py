"""Host time of `PackedLayout.build` (CPU only): the numpy version in `packing.py` against the torch-ops

Archived study, not maintained: it wrote benchmarks/results/archive/2026-11-25_12117d3/layout_build_cpu.txt,
and is kept as the record of how those figures were measured. It may no longer run against the package: it
imports `mixed_sizes` from `apps.bench.suite` (now `apps.bench.workloads`); its torch-ops reference now lives
in tests/test_packing.py.
version it replaced (commit 872271c), on the mixed-64 and uniform 64 x 224 grids.

    python benchmarks/layout_build_time.py --threads 2 16 [--out layout_build_cpu.txt]

`build_with_torch_ops` is kept here as an independent reference: `tests/test_packing.py` checks that both
give the same tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence

import torch

from dinov3_packing.apps.bench.suite import mixed_sizes
from dinov3_packing.packing import PackedLayout


def build_with_torch_ops(grid: Sequence[tuple[int, int, int]], num_prefix: int) -> dict[str, torch.Tensor]:
    """The index tensors of a layout computed with torch CPU ops (the implementation before numpy)."""
    segment_hw = [(h, w) for t, h, w in grid for _ in range(t)]
    seq_lens = [num_prefix + h * w for h, w in segment_hw]
    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + n)
    starts = torch.tensor(offsets[:-1], dtype=torch.long)
    patch_counts = torch.tensor([h * w for h, w in segment_hw], dtype=torch.long)
    seg_of_row = torch.repeat_interleave(torch.arange(len(segment_hw)), patch_counts)
    first_row = torch.cumsum(patch_counts, 0) - patch_counts
    row = torch.arange(int(patch_counts.sum()))
    patch_index = starts[seg_of_row] + num_prefix + (row - first_row[seg_of_row])
    prefix_index = starts[:, None] + torch.arange(num_prefix)[None, :]
    token_source = torch.empty(offsets[-1], dtype=torch.long)
    token_source[prefix_index.flatten()] = torch.arange(prefix_index.numel())
    token_source[patch_index] = prefix_index.numel() + row
    token_segment = torch.repeat_interleave(torch.arange(len(segment_hw)), torch.tensor(seq_lens))
    return {
        "cu_seqlens_host": torch.tensor(offsets, dtype=torch.int32),
        "patch_index": patch_index,
        "prefix_index": prefix_index,
        "token_source": token_source,
        "token_segment": token_segment,
    }


def ms_per_call(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="torch CPU threads")
    args = ap.parse_args()
    grids = {
        "mixed-64": [(1, h // 16, w // 16) for h, w in mixed_sizes(64)],
        "uniform 64 x 224": [(1, 14, 14)] * 64,
    }
    lines = [f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, grid in grids.items():
            new = ms_per_call(lambda g=grid: PackedLayout.build(g, 5, "cpu"))
            old = ms_per_call(lambda g=grid: build_with_torch_ops(g, 5))
            lines.append(
                f"{threads} torch threads, {name}: PackedLayout.build (numpy) {new:.2f} ms; "
                f"torch-ops version {old:.2f} ms"
            )
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
