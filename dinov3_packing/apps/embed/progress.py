"""What the `embed` loop spends its time on, what limited it, and the progress line built from both.

The main process does three things in turn: it waits for the next decoded chunk from the DataLoader, GPU
decoding included (`decode`), runs packs through the model, host-to-device copies and the wait for results
included (`model`), and hands results to the shard writer, which blocks only when its queue is full
(`write`). Two more figures say whether the device was the limit:

    device busy   seconds the device spent on forwards: on CUDA, two timing events around each pack on the
                  compute stream (after its wait for the upload, through the copies of its features back);
                  on the CPU, where a forward runs in the main loop, the `model` stage itself
    device wait   seconds the main loop was blocked on the device's results (CUDA: the event of the pack in
                  flight; CPU: the forward, as above)

The bound (one of `BOUNDS`): "model" when the device was busy for at least 1 - `WAIT_SHARE` of the time
and the main loop, ahead of it, waited on its results for at least `WAIT_SHARE` of the time (then `embed`
runs at >= 90% of what the device gives, the issue's target against the model alone, with the host to
spare). A device that reads busy while the main loop hardly ever waits for it is being fed just in time:
the host's own work sets the pace, and launch gaps inside packs (which count as busy, below) are likely;
that reads as "host". Otherwise the bound is where the main loop's time went instead of feeding the
device, the largest of: `decode` (waiting for decoded images), `write` (waiting on the shard
writer) and `host` (the main loop's own work: everything but those waits and the device wait, such as
unpacking chunks, packing, issuing the uploads, a main process short of CPU between packs). `embed` takes
these figures at the end of its loop (the writer closed), before any barrier with other ranks, and reports
no bound when no pack ran.

What this measures, and what it does not: the events bracket a whole pack, from its first kernel to the
copies of its features back, so the device counts as busy for the whole of that interval, gaps included.
Host work *between* packs (while the device has nothing queued) shows up as idle device time and so as
`host`; the host launching a pack's kernels slower than the device runs them does not: such a launch gap
inside the pack counts as busy, and only the device wait (the host's slack) tells it apart. The model-only figure of
`benchmarks/embed_throughput.py` (the same packs, replayed without the rest of `embed`) is the check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STAGES = ("decode", "model", "write")
BOUNDS = (*STAGES, "host")
WAIT_SHARE = 0.1


class Meter:
    """Counts and stage times of one `embed` call on one rank.

    Attributes:
        decoded: images out of the decoders (skipped files included): what the progress bar counts, so it
            moves from the first image instead of the first finished pack.
        embedded: images whose features went to the writer.
        tokens: tokens of the packs run (prefix tokens included).
        seconds: stage -> seconds the main loop spent in it.
        device_seconds, wait_seconds: device busy and device wait (module docstring); None until the
            runner reports them (`device_busy`, `waiting_on_device`), then the `model` stage stands in.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.decoded = self.embedded = self.tokens = 0
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.device_seconds: float | None = None
        self.wait_seconds: float | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed code as stage `name` (nested stages are not subtracted: do not nest)."""
        t = self.clock()
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - t

    @contextmanager
    def waiting_on_device(self) -> Iterator[None]:
        """Time the enclosed wait for the device's results: stage `model`, and device wait."""
        t = self.clock()
        try:
            yield
        finally:
            waited = self.clock() - t
            self.seconds["model"] += waited
            self.wait_seconds = (self.wait_seconds or 0.0) + waited

    def device_busy(self, seconds: float) -> None:
        """Add the device time of one pack (measured on the device)."""
        self.device_seconds = (self.device_seconds or 0.0) + seconds

    def timed(self, name: str, items: Iterator) -> Iterator:
        """`items`, with the time spent waiting for each one counted as stage `name`."""
        while True:
            with self.stage(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def elapsed(self) -> float:
        return self.clock() - self.start

    def shares(self) -> dict[str, float]:
        """Share of the time since the start: each stage, `device` (busy), `device wait` and `host` (module
        docstring)."""
        total = max(self.elapsed(), 1e-9)
        shares = {k: v / total for k, v in self.seconds.items()}
        busy = self.seconds["model"] if self.device_seconds is None else self.device_seconds
        waited = self.seconds["model"] if self.wait_seconds is None else self.wait_seconds
        shares["device"] = min(busy / total, 1.0)
        shares["device wait"] = min(waited / total, 1.0)
        host = total - self.seconds["decode"] - self.seconds["write"] - waited
        shares["host"] = max(host / total, 0.0)
        return shares

    def bound(self) -> str:
        """What limits the run: one of `BOUNDS` (module docstring)."""
        shares = self.shares()
        if shares["device"] >= 1 - WAIT_SHARE and shares["device wait"] >= WAIT_SHARE:
            return "model"
        return max(("decode", "write", "host"), key=lambda k: shares[k])

    def postfix(self) -> str:
        """The progress bar's text after its counter and rate (decoded images/s): embedded images/s,
        tokens/s, the bound with the share of time the main loop waited on each of its sides, the share of
        its own work and how busy the device was."""
        elapsed = max(self.elapsed(), 1e-9)
        shares = self.shares()
        return (
            f"embedded {self.embedded}, {self.embedded / elapsed:.1f} img/s, {self.tokens / elapsed:,.0f} tok/s, "
            f"bound: {self.bound()} (waits: decode {shares['decode']:.0%}, write {shares['write']:.0%}), "
            f"host {shares['host']:.0%}, device busy {shares['device']:.0%}, device wait {shares['device wait']:.0%}"
        )


_END = object()
