"""Shard writing off the critical path: a thread that owns the `ShardWriter`, fed through a bounded queue.

The main loop hands over one pack's results at a time and goes back to the model; the thread gathers them,
writes, fsyncs and renames shards and appends manifest lines in the order the main loop handed them over,
so the store's guarantees hold as they do in one thread (a shard's lines follow its rename). The queue
holds at most `depth` packs: a disk slower than the model makes the main loop wait there (the `write`
stage of the progress line) instead of piling results up in memory.

A failure in the thread stops the run, raised in the main thread at its next hand-over or at `close`: a
full or read-only disk (any OSError) as `WriteFailed`, anything else as it was raised. Nothing queued after
the failure is written, and no manifest line names a shard that was not committed.
"""

from __future__ import annotations

import queue
import threading

from .store import PackFeatures, ShardWriter

_CLOSE, _ABORT = "close", "abort"


class WriteFailed(OSError):
    """Writing a shard or a manifest line failed; the OSError that did it is the cause."""


class BackgroundWriter:
    """`ShardWriter` behind a thread (module docstring).

    Args:
        writer: the store's writer for this rank.
        depth: packs the queue may hold.
    """

    def __init__(self, writer: ShardWriter, depth: int = 4):
        self.writer, self.patch_dtype = writer, writer.patch_dtype
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="embed-shard-writer", daemon=True)
        self._thread.start()

    def add_pack(self, pack: PackFeatures) -> None:
        """Queue one pack's results; blocks while the queue is full."""
        self._put(("add", pack))

    def skip(self, path: str, reason: str) -> None:
        self._put(("skip", path, reason))

    def close(self) -> None:
        """Commit everything queued (the last shard included) and stop the thread; raises its failure."""
        self._put((_CLOSE,))
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without committing what is still buffered (the run is ending with an error of its own)."""
        if self._thread.is_alive():
            self._queue.put((_ABORT,))
            self._thread.join()

    def _put(self, item: tuple) -> None:
        self._raise()
        self._queue.put(item)

    def _raise(self) -> None:
        if isinstance(self._error, OSError):
            raise WriteFailed(f"writing shards into {str(self.writer.out)!r} failed ({self._error})") from self._error
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item[0] == _ABORT:
                return
            if self._error is not None:  # failed: drain, so that the main loop never blocks on a full queue
                if item[0] == _CLOSE:
                    return
                continue
            try:
                if item[0] == "add":
                    self.writer.add_pack(item[1])
                elif item[0] == "skip":
                    self.writer.skip(item[1], item[2])
                else:
                    self.writer.close()
                    return
            except BaseException as e:  # handed to the main thread, which stops the run with it
                self._error = e
                if item[0] == _CLOSE:
                    return
