"""What the `embed` loop spends its time on, and the progress line built from it.

The main process does three things in turn: it waits for the next decoded chunk from the DataLoader
(`decode`), runs packs through the model, host-to-device copies and the wait for results included
(`model`), and hands results to the shard writer, which blocks only when its queue is full (`write`).
Decoding and writing run beside the model, so the main loop waits on them only when they are slower: the
bound is the stage it waited on for more than `WAIT_SHARE` of its time (the larger wait, if both), else
the model. Below that share the model is busy at least 90% of the run, the issue's target for `embed`
against the model alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STAGES = ("decode", "model", "write")
WAIT_SHARE = 0.1


class Meter:
    """Counts and stage times of one `embed` call on one rank.

    Attributes:
        decoded: images out of the decoders (skipped files included): what the progress bar counts, so it
            moves from the first image instead of the first finished pack.
        embedded: images whose features went to the writer.
        tokens: tokens of the packs run (prefix tokens included).
        seconds: stage -> seconds the main loop spent in it.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.decoded = self.embedded = self.tokens = 0
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed code as stage `name` (nested stages are not subtracted: do not nest)."""
        t = self.clock()
        try:
            yield
        finally:
            self.seconds[name] += self.clock() - t

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
        """Stage -> its share of the time since the start."""
        total = max(self.elapsed(), 1e-9)
        return {k: v / total for k, v in self.seconds.items()}

    def bound(self) -> str:
        """The stage that limits the run (module docstring)."""
        shares = self.shares()
        waited = max(("decode", "write"), key=lambda k: shares[k])
        return waited if shares[waited] > WAIT_SHARE else "model"

    def postfix(self) -> str:
        """The progress bar's text after its counter and rate (decoded images/s): embedded images/s,
        tokens/s, and the bound with the share of time the main loop waited on each of its sides."""
        elapsed = max(self.elapsed(), 1e-9)
        shares = self.shares()
        return (
            f"embedded {self.embedded}, {self.embedded / elapsed:.1f} img/s, {self.tokens / elapsed:,.0f} tok/s, "
            f"bound: {self.bound()} (waits: decode {shares['decode']:.0%}, write {shares['write']:.0%})"
        )


_END = object()
