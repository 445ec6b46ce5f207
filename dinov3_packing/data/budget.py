"""Token-budget packing: a stream of images -> packs of at most `max_tokens` tokens each.

A pack is one forward of the packed model, so its cost is its token count *including* the prefix tokens
(CLS + registers) that the model adds to every frame: an image of grid (t, h, w) costs
`t * (num_prefix + h * w)` tokens.

The packer holds back up to `lookahead` packs' worth of tokens from the stream and fills packs
first-fit-decreasing from them. Every pack whose fill reaches `target_fill` is emitted; the items of
emptier packs go back into the queue to meet later images, so that the stream's end is the only place a
pack may be left part full.
Emitting at least the fullest pack on every round bounds what is held back (and the memory it takes).

Determinism: the packs depend only on the sequence of (tokens) in the stream and the parameters; ties are
broken by arrival order, and the items of a pack keep their arrival order.

An image larger than the budget: with `oversize="own"` (default) it becomes a pack of its own, which is
then larger than `max_tokens`; with `oversize="error"` it raises a ValueError naming the image. (With the
`native` resize policy, `Preprocessor(max_tokens=...)` below the budget makes this impossible.)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

OVERSIZE = ("own", "error")


def segment_tokens(grid: tuple[int, int, int] | tuple[int, int], num_prefix: int) -> int:
    """Tokens an image costs in a forward: `t * (num_prefix + h * w)` (t = 1 for an (h, w) grid)."""
    t, h, w = grid if len(grid) == 3 else (1, *grid)
    return t * (num_prefix + h * w)


@dataclass
class Pack:
    """Items of one forward, in arrival order, and their total token count."""

    items: list[Any] = field(default_factory=list)
    tokens: int = 0


class TokenBudgetPacker:
    """Streaming first-fit-decreasing packer (see the module docstring).

    Args:
        max_tokens: token budget of a pack (prefix tokens included).
        lookahead: how many packs' worth of tokens the packer may hold back to fill packs well (memory: that
            many packs of decoded images); 4 gives >= 98% fill on photographs of 200-2300 patches.
        target_fill: a pack at least this full is emitted as soon as it forms.
        oversize: "own" or "error" for an item above the budget.

    Use: `for pack in packer.add(item, tokens): ...` for each item, then `for pack in packer.flush(): ...`.
    """

    def __init__(self, max_tokens: int, lookahead: float = 4.0, target_fill: float = 0.99, oversize: str = "own"):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
        if not isinstance(lookahead, (int, float)) or lookahead < 1:
            raise ValueError(f"lookahead: expected a number >= 1, got {lookahead!r}")
        if not 0 < target_fill <= 1:
            raise ValueError(f"target_fill: expected a fraction in (0, 1], got {target_fill!r}")
        if oversize not in OVERSIZE:
            raise ValueError(f"oversize: expected one of {OVERSIZE}, got {oversize!r}")
        self.max_tokens, self.lookahead, self.target_fill, self.oversize = max_tokens, lookahead, target_fill, oversize
        self._pending: list[tuple[int, int, Any]] = []  # (arrival, tokens, item)
        self._pending_tokens = 0
        self._arrivals = 0

    def add(self, item: Any, tokens: int) -> Iterator[Pack]:
        """Queue one item of `tokens` tokens; yields the packs that are ready."""
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens: expected a positive int, got {tokens!r}")
        arrival, self._arrivals = self._arrivals, self._arrivals + 1
        if tokens > self.max_tokens:
            if self.oversize == "error":
                name = item if isinstance(item, Hashable) and not isinstance(item, tuple) else f"item {arrival}"
                raise ValueError(
                    f"max_tokens: {name} needs {tokens} tokens, more than the budget of {self.max_tokens}; "
                    "raise the budget, lower the image's max_tokens, or use oversize='own'"
                )
            yield Pack([item], tokens)
            return
        self._pending.append((arrival, tokens, item))
        self._pending_tokens += tokens
        if self._pending_tokens >= self.lookahead * self.max_tokens:
            yield from self._emit(final=False)

    def flush(self) -> Iterator[Pack]:
        """Yield every remaining pack (the end of the stream)."""
        yield from self._emit(final=True)

    def _emit(self, final: bool) -> Iterator[Pack]:
        bins = _first_fit_decreasing(self._pending, self.max_tokens)
        if final:
            ready, held = bins, []
        else:
            ready = [b for b in bins if sum(t for _, t, _ in b) >= self.target_fill * self.max_tokens]
            held = [b for b in bins if sum(t for _, t, _ in b) < self.target_fill * self.max_tokens]
            if not ready:  # progress: the fullest pack goes even if it misses the target
                fullest = max(range(len(held)), key=lambda i: (sum(t for _, t, _ in held[i]), -i))
                ready = [held.pop(fullest)]
        self._pending = sorted((x for b in held for x in b), key=lambda x: x[0])
        self._pending_tokens = sum(t for _, t, _ in self._pending)
        # Packs leave in the order of their earliest item, items in arrival order.
        for b in sorted((sorted(b, key=lambda x: x[0]) for b in ready), key=lambda b: b[0][0]):
            yield Pack([item for _, _, item in b], sum(t for _, t, _ in b))


def _first_fit_decreasing(items: list[tuple[int, int, Any]], capacity: int) -> list[list[tuple[int, int, Any]]]:
    bins: list[list[tuple[int, int, Any]]] = []
    free: list[int] = []
    for x in sorted(items, key=lambda x: (-x[1], x[0])):
        for i, room in enumerate(free):
            if x[1] <= room:
                bins[i].append(x)
                free[i] -= x[1]
                break
        else:
            bins.append([x])
            free.append(capacity - x[1])
    return bins


def pack_by_budget(
    grids: Iterable[tuple[int, int, int] | tuple[int, int]],
    max_tokens: int,
    num_prefix: int = 5,
    lookahead: float = 4.0,
    target_fill: float = 0.99,
    oversize: str = "own",
) -> list[list[int]]:
    """Pack a whole sequence of image grids; returns the packs as lists of indices into `grids`."""
    packer = TokenBudgetPacker(max_tokens, lookahead, target_fill, oversize)
    packs = []
    for i, grid in enumerate(grids):
        packs.extend(p.items for p in packer.add(i, segment_tokens(grid, num_prefix)))
    packs.extend(p.items for p in packer.flush())
    return packs
