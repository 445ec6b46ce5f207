"""What every benchmark shares: timing, the run's metadata, and JSON rows.

Every script in `benchmarks/` and the suite use these, so a figure always comes with the card, the
versions and the code it was measured on, in one format:

    meta = run_metadata(device)                      # card, versions, git commit + dirty flag, sources sha256
    stats = measure(lambda: model(x, grid), device)  # warm-up, then timed repeats: median, min, memory
    write_rows(out, [{"part": "meta", **meta}, {"system": "packed", **stats}])  # JSON lines, appended
    write_report(out_json, {"meta": meta, "results": [...]})                   # or one JSON document

Timing uses CUDA events on a CUDA device (one host sync after the last call, none inside the timed
region) and `time.perf_counter` on the CPU.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # dinov3_packing/


@dataclass(frozen=True)
class Timing:
    """How long to time one call: repeats until about `target_s` of timed work, within the bounds."""

    target_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 20


def time_calls(fn: Callable[[], object], n: int, device: torch.device | str) -> list[float]:
    """Seconds taken by each of `n` back-to-back calls of `fn`.

    On CUDA each call sits between two recorded events and the host synchronizes once, after the last:
    an interval covers the call's GPU work and any host time that left the GPU idle. On the CPU each call
    is timed with `time.perf_counter`.
    """
    if n < 1:
        raise ValueError(f"n: expected at least one call to time, got {n}")
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(
    fn: Callable[[], object], device: torch.device | str, timing: Timing = Timing(), compiled: bool = False
) -> dict:
    """Warm `fn` up, then time repeats of it.

    The first call is timed on its own (`first_call_s`: it includes compilation for compiled functions);
    a second warm-up follows when the first was fast or `compiled` (its first call compiled, the second
    shows the steady state), and sets the number of repeats. On CUDA, `peak_alloc_gib` is
    `max_memory_allocated` over the repeats and `fwd_mem_gib` that peak minus what was allocated before
    (the call's own activations and workspace); both are None on the CPU.

    Returns:
        dict with `median_s`, `min_s`, `repeats`, `times_s`, `first_call_s`, `peak_alloc_gib`, `fwd_mem_gib`.
    """
    device = torch.device(device)
    first = time_calls(fn, 1, device)[0]
    estimate = first
    if compiled or first < timing.target_s:
        estimate = time_calls(fn, 1, device)[0]
    repeats = max(timing.min_repeats, min(timing.max_repeats, math.ceil(timing.target_s / max(estimate, 1e-6))))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = time_calls(fn, repeats, device)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
        "times_s": times,
        "first_call_s": first,
        "peak_alloc_gib": peak / 2**30 if cuda else None,
        "fwd_mem_gib": (peak - before) / 2**30 if cuda else None,
    }


def peak_matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int, repeats: int = 20) -> dict:
    """Measured matmul peak: median over `repeats` `[n, n] @ [n, n]` products of random data, after warm-up."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    time_calls(lambda: torch.mm(a, b, out=c), 5, device)
    median = statistics.median(time_calls(lambda: torch.mm(a, b, out=c), repeats, device))
    return {
        "tflops": 2 * n**3 / median / 1e12,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "median_s": median,
    }


# ---------------------------------------------------------------------------------------------------------
# Run metadata


def git_state(path: str | Path = PACKAGE_DIR) -> dict:
    """`{"git_commit": full sha of HEAD, "git_dirty": tracked files differ from HEAD}` of the checkout
    holding `path`; both None outside a git checkout (a pip install) or without git.

    Untracked files do not count as dirty: a run writes its results into the checkout, and code that is
    not tracked is not imported unless a tracked file changed to import it.
    """
    cwd = Path(path)
    cwd = cwd if cwd.is_dir() else cwd.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(  # noqa: S603 - fixed arguments, no shell
                ["git", *args],  # noqa: S607 - git from PATH, as a user runs it
                capture_output=True,
                text=True,
                timeout=10,
                cwd=cwd,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or not commit.strip():
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status.strip())}


def source_digest(root: str | Path = PACKAGE_DIR) -> str:
    """sha256 over a package's Python sources (relative path and bytes, sorted by path): identifies the
    code measured where git metadata is missing or stale."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def version(package: str) -> str | None:
    """Installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def card_name(device: torch.device | str) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def run_metadata(device: torch.device | str = "cpu", source_root: str | Path = PACKAGE_DIR) -> dict:
    """Where and on what a figure was measured: command, UTC date, device and card, versions, the git commit
    and dirty flag of the checkout holding `source_root`, and the sha256 of its Python sources.

    Args:
        device: the device the benchmark runs on.
        source_root: the package directory measured (default: this package; `ab_trees.py` passes the tree
            it imports).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "card": card_name(device),
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "timm": version("timm"),
        **git_state(source_root),
        "source_sha256": source_digest(source_root),
    }


# ---------------------------------------------------------------------------------------------------------
# JSON rows


def write_rows(path: str | Path | None, rows: Iterable[dict], echo: bool = True) -> None:
    """Append each row to `path` as one JSON line, the moment it is measured (a run that is cut off keeps
    what it measured); `echo` also prints each line. `path=None` only prints."""
    lines = [json.dumps(row) for row in rows]
    if echo:
        for line in lines:
            print(line, flush=True)
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def write_report(path: str | Path, report: dict) -> Path:
    """Write a whole report (one JSON object, indented) to `path`, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file written by `write_rows`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


DEVICE_EVENT_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")


HOST_OP_KINDS = ("cpu_op", "user_annotation")
BACKWARD_MARK = "autograd::engine::evaluate_function"  # the name torch.profiler gives each backward node's run


def _innermost(ops: list[tuple[float, float, str]], starts: list[float], t: float, reach: int = 5000) -> str:
    """The host op running at time `t` that started last (the innermost), from `ops` sorted by start; "-" if none
    within `reach` ops before `t`."""
    i = bisect.bisect_right(starts, t)
    for _, end, name in reversed(ops[max(0, i - reach) : i]):
        if end >= t:
            return name
    return "-"


def device_gaps(events: Iterable[dict], min_gap_us: float = 20.0, top: int = 10) -> dict:
    """Where the device waited, from a torch.profiler chrome trace's `traceEvents` (`export_chrome_trace`).

    The device's work (kernels, copies, fills: `DEVICE_EVENT_KINDS`) is merged into busy intervals; every
    idle stretch of at least `min_gap_us` between two of them is a gap. Returns the span from the first
    work's start to the last one's end, busy and idle time (us), the number of gaps, and the `top` largest,
    each with the work before and after it, the CUDA runtime / driver calls the host was in during it (a
    `cudaStreamSynchronize` or a `cudaFree` there names a host wait; none, host work between launches) and the
    host op it was in at the gap's middle (`host_op`: the innermost `cpu_op` / `user_annotation`). The gaps'
    idle time is also split by what the host was doing then: by phase (`idle_by_phase_us`: "backward" from the
    host's first autograd-engine event on, else "forward") and by host op (`idle_by_host_op_us`, the `top`
    largest, `[name, us]`).
    """
    work, runtime, ops = [], [], []
    backward_from = math.inf
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", ""))
        if e.get("cat") in DEVICE_EVENT_KINDS:
            work.append(span)
        elif e.get("cat") in ("cuda_runtime", "cuda_driver"):
            runtime.append(span)
        elif e.get("cat") in HOST_OP_KINDS:
            ops.append(span)
            if span[2].startswith(BACKWARD_MARK):
                backward_from = min(backward_from, span[0])
    if not work:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": 0, "largest": []}
    work.sort()
    ops.sort()
    starts = [o[0] for o in ops]
    busy, gaps = 0.0, []
    start, end, last = work[0][0], work[0][1], work[0][2]
    for s, e, name in work[1:]:
        if s > end:
            busy += end - start
            if s - end >= min_gap_us:
                gaps.append((s - end, end, s, last, name))
            start, end = s, e
        elif e > end:
            end = e
        if e >= end:
            last = name
    busy += end - start
    span = end - work[0][0]
    by_phase, by_op, host_op = {"forward": 0.0, "backward": 0.0}, {}, {}
    for gap, a, b, *_ in gaps:
        middle = (a + b) / 2
        host_op[(a, b)] = op = _innermost(ops, starts, middle)
        by_phase["backward" if middle >= backward_from else "forward"] += gap
        by_op[op] = by_op.get(op, 0.0) + gap
    largest = []
    for gap, a, b, before, after in sorted(gaps, reverse=True)[:top]:
        calls = sorted({n for s, e, n in runtime if s < b and e > a})
        largest.append(
            {
                "gap_us": round(gap, 1),
                "before": before[:100],
                "after": after[:100],
                "host_calls": calls,
                "host_op": host_op[(a, b)][:100],
            }
        )
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "span_us": round(span, 1),
        "busy_us": round(busy, 1),
        "idle_us": round(span - busy, 1),
        "gaps": len(gaps),
        "idle_in_gaps_us": round(sum(g[0] for g in gaps), 1),
        "idle_by_phase_us": {k: round(v, 1) for k, v in by_phase.items()},
        "idle_by_host_op_us": [[name[:100], round(us, 1)] for name, us in ranked],
        "largest": largest,
    }
