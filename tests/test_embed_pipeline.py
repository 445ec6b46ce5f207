"""The `embed` pipeline around the model: compiled forwards (no recompilation across packs after warm-up, the
eager features), the shard writer thread (a failure stops the run, nothing referenced that was not written),
the stage meter behind the progress bar and the bound, the default number of decoding workers.

Reference for features: an eager run of the same call (tiny random model, fp32, CPU). Tolerance: conftest's
1e-5 relative (compiled kernels reorder sums; a wrong image or a broken graph is off by O(1)). For `mean`,
bit for bit: the stored float32 patches added in order and divided by their count, correctly rounded.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_embed import DATA, manifest_lines, tiny_ckpt  # noqa: F401  (tiny_ckpt: fixture)
from test_embed_store import assert_same_features, photo_folder

from dinov3_packing.apps.embed import EmbedReader, embed, job, store
from dinov3_packing.apps.embed.progress import BOUNDS, STAGES, WAIT_SHARE, Meter
from dinov3_packing.apps.embed.writer import WriteFailed
from dinov3_packing.cli import main
from dinov3_packing.data.files import list_images
from dinov3_packing.parallel.compile import compile_stats
from dinov3_packing.weights.load import load_checkpoint

FAST = dict(workers=0, progress=False, device="cpu", save=("cls", "mean", "patches"), patch_dtype=torch.float32)


def record_forwards(monkeypatch, after_each):
    """Make `embed` build its model through `load_checkpoint` as usual, with `after_each(grid)` called
    after every forward of it (the real model: only the instance's forward is wrapped)."""

    def load(*args, **kwargs):
        loaded = load_checkpoint(*args, **kwargs)
        model = loaded.model
        forward = model.forward

        def recorded(hidden_states, grid_thw, *rest, **options):
            out = forward(hidden_states, grid_thw, *rest, **options)
            after_each(grid_thw)
            return out

        model.forward = recorded
        return loaded

    monkeypatch.setattr(job, "load_checkpoint", load)


def test_compiled_embed_recompiles_nothing_after_warm_up_and_equals_eager(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    src = tmp_path / "src"  # every readable test photograph (all sizes and modes) three times
    src.mkdir()
    photos = [Path(p) for p in list_images(DATA) if not p.endswith("corrupt.jpg")]
    for i, photo in enumerate(photos * 3):
        shutil.copy(photo, src / f"{i:03d}{photo.suffix}")
    eager = tmp_path / "eager"
    embed(src, eager, tiny_ckpt, batch_tokens=150, **FAST)
    packs = []
    # Dynamo reuses graphs across model instances of one config: an earlier test's compile of this tiny
    # model would otherwise serve the first pack, and this test would see nothing compile.
    torch._dynamo.reset()
    before = compile_stats()["unique_graphs"]
    record_forwards(monkeypatch, lambda grid: packs.append((grid.clone(), compile_stats()["unique_graphs"])))
    compiled = tmp_path / "compiled"
    embed(src, compiled, tiny_ckpt, batch_tokens=150, compile=True, **FAST)
    tokens = {int((g[:, 1] * g[:, 2]).sum()) for g, _ in packs}
    longest = {int((g[:, 1] * g[:, 2]).max()) for g, _ in packs}
    assert len(packs) >= 5 and len(tokens) >= 3 and len(longest) >= 3, "the packs should differ in size"
    graphs = [n for _, n in packs]
    assert graphs[0] > before, "compile=True compiled nothing"
    assert graphs[2:] == [graphs[1]] * (len(graphs) - 2), f"recompiled after the two warm-up packs: {graphs}"
    assert_same_features(compiled, eager)


def test_compile_defaults_to_cuda_only(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    compiled = []
    monkeypatch.setattr(job, "compile_model", lambda model: compiled.append(model) or model)
    embed(DATA, tmp_path / "a", tiny_ckpt, **FAST)
    assert compiled == []  # the CPU default: eager
    with pytest.raises(TypeError, match="compile"):
        embed(DATA, tmp_path / "b", tiny_ckpt, compile="yes", **FAST)


def test_writer_failure_stops_the_run_and_the_manifest_names_only_written_shards(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    """The disk turns read-only after the first shard: the run stops with that error (WriteFailed), the
    committed shard is served, the rest is embedded by the next run."""
    src = photo_folder(tmp_path, 8)
    fresh = tmp_path / "fresh"
    embed(src, fresh, tiny_ckpt, shard_size=2, **FAST)
    real_save = store.save_file
    calls = []

    def save_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(errno.EROFS, "Read-only file system", filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(store, "save_file", save_then_fail)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed, match="Read-only file system") as failure:
        embed(src, out, tiny_ckpt, shard_size=2, batch_tokens=200, **FAST)
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == errno.EROFS
    lines = manifest_lines(out)
    assert len(calls) == 2 and len(lines) == 2  # the first shard's two images, nothing of the failed one
    assert {line["shard"] for line in lines} == {p.name for p in out.glob("shard-*.safetensors")}
    reader = EmbedReader(out)  # checks every referenced shard
    assert len(reader.paths) == 2

    monkeypatch.setattr(store, "save_file", real_save)
    summary = embed(src, out, tiny_ckpt, shard_size=2, **FAST)
    assert summary.embedded == summary.total == 8
    assert sorted(line["path"] for line in manifest_lines(out)) == list_images(src)
    assert_same_features(out, fresh)


def test_writer_failure_is_one_cli_line(tmp_path, tiny_ckpt, monkeypatch, capfd):  # noqa: F811
    src = photo_folder(tmp_path, 3)

    def read_only(tensors, filename, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system", filename)

    monkeypatch.setattr(store, "save_file", read_only)
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(["embed", str(src), "--ckpt", tiny_ckpt, "--out", str(out), "--workers", "0", "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: --out: writing shards into {str(out)!r} failed")
    assert "Read-only file system" in errors[0] and "run the same command again" in errors[0]
    assert not list(out.glob("manifest-*.jsonl"))


def test_meter_accounts_each_stage_and_names_the_bound():
    now = [0.0]
    meter = Meter(clock=lambda: now[0])

    def items():
        for i in range(3):
            now[0] += 2.0  # each decoded chunk takes 2 s to arrive
            yield i

    for _ in meter.timed("decode", items()):
        with meter.stage("model"):
            now[0] += 1.0
    with meter.stage("write"):
        now[0] += 0.5
    assert meter.seconds == {"decode": 6.0, "model": 3.0, "write": 0.5}
    assert meter.elapsed() == 9.5 and meter.bound() == "decode"
    meter.embedded, meter.tokens = 19, 9500
    text = meter.postfix()
    assert "embedded 19, 2.0 img/s, 1,000 tok/s" in text and "bound: decode (waits: decode 63%, write 5%)" in text

    meter = Meter(clock=lambda: now[0])
    with meter.stage("decode"):
        now[0] += WAIT_SHARE * 10 - 0.01
    with meter.stage("model"):
        now[0] += 10 - WAIT_SHARE * 10 + 0.01
    assert meter.bound() == "model"  # waited on decoding for less than WAIT_SHARE of the run
    with meter.stage("write"):
        now[0] += 5
    assert meter.bound() == "write"


def test_progress_moves_before_the_first_pack_and_the_summary_records_the_bound(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    """One pack holds every image (the budget is large): the bar still counts each decoded chunk before it,
    and its line ends on the finished run (the pack ran after the last chunk: "embedded 20", not 0)."""
    events, postfixes = [], []

    class Bar(job.tqdm):
        def update(self, n=1):
            events.append(("decoded", n))
            return super().update(n)

        def set_postfix_str(self, s="", refresh=True):
            postfixes.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(job, "tqdm", Bar)
    record_forwards(monkeypatch, lambda grid: events.append(("forward", len(grid))))
    src = photo_folder(tmp_path, 20)
    summary = embed(src, tmp_path / "out", tiny_ckpt, batch_tokens=100_000, **{**FAST, "progress": True})
    assert events.index(("forward", 20)) == len(events) - 1 == 3  # chunks of 8, 8, 4, then the one pack
    assert [n for kind, n in events if kind == "decoded"] == [8, 8, 4]
    assert postfixes[0].startswith("embedded 0,") and postfixes[-1].startswith("embedded 20,")
    assert summary.bound in BOUNDS and set(summary.stage_seconds) == set(STAGES)
    assert sum(summary.stage_seconds.values()) <= summary.seconds
    assert f"bound: {summary.bound} (waited on decode " in summary.line()


def test_a_rerun_with_nothing_to_embed_reports_no_bound(tmp_path, tiny_ckpt):  # noqa: F811
    src, out = photo_folder(tmp_path, 4), tmp_path / "out"
    embed(src, out, tiny_ckpt, batch_tokens=200, **FAST)
    summary = embed(src, out, tiny_ckpt, batch_tokens=200, **FAST)  # every image already has its line
    assert (summary.new, summary.embedded, summary.tokens) == (0, 4, 0)
    assert summary.bound is None and summary.device_busy == 0.0
    assert summary.line().endswith("bound: none (no pack ran)")


def test_the_bound_leaves_out_the_wait_after_the_loop(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    """A rank done first waits at the barrier for the others (here: a million seconds on the meter's clock):
    that wait is neither host work nor a stage, and the summary's bound and device share leave it out."""
    offset = [0.0]
    meters = []

    def meter():
        meters.append(Meter(clock=lambda: time.perf_counter() + offset[0]))
        return meters[-1]

    at_barrier = []

    def slow_barrier(world):
        at_barrier.append((meters[0].bound(), meters[0].shares()["device"]))
        offset[0] += 1e6

    monkeypatch.setattr(job, "Meter", meter)
    monkeypatch.setattr(job, "_barrier", slow_barrier)
    summary = embed(photo_folder(tmp_path, 12), tmp_path / "out", tiny_ckpt, batch_tokens=200, **FAST)
    assert len(meters) == len(at_barrier) == 1 and summary.new == 12
    bound, busy = at_barrier[0]
    assert summary.bound == bound and summary.bound in BOUNDS
    # The loop took at most the call's wall time: the forwards' share of it is at least their share of the call.
    assert summary.device_busy == pytest.approx(busy, rel=1e-3)
    assert summary.device_busy >= summary.stage_seconds["model"] / summary.seconds > 0


def test_mean_features_are_the_patches_summed_in_order_over_their_count(tmp_path, tiny_ckpt):  # noqa: F811
    """Bit for bit: each image's `mean` is its float32 patch features added one token after the other
    (as `index_add_` does on the CPU) and divided, correctly rounded, by the patch count."""
    out = tmp_path / "out"
    embed(photo_folder(tmp_path, 12), out, tiny_ckpt, batch_tokens=200, **FAST)
    reader = EmbedReader(out)
    for path in reader.paths:
        mean = reader.get(path, "mean")
        patches = reader.get(path, "patches").reshape(-1, mean.shape[-1])  # (h, w, dim) on disk
        assert patches.dtype == torch.float32 and patches.shape[0] > 1
        acc = torch.zeros(patches.shape[1])
        for row in patches:
            acc += row
        assert torch.equal(mean, (acc.double() / patches.shape[0]).float()), path


def test_default_workers_follow_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert job.default_workers() == 15  # one core left for the main process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert job.default_workers() == 7  # torchrun: the host's cores shared by its ranks
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert job.default_workers() == 0  # one core: decode in the main process


def test_the_heap_is_frozen_during_the_run_and_released_after_it(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    """A real `embed` run keeps the collector off the heap its first packs left (`_FrozenHeap`), and gives
    the objects back to it when it returns or fails."""
    import gc

    src = photo_folder(tmp_path, 12)
    assert gc.get_freeze_count() == 0
    seen = []
    record_forwards(monkeypatch, lambda grid: seen.append(gc.get_freeze_count()))
    embed(src, tmp_path / "a", tiny_ckpt, batch_tokens=150, **FAST)
    assert len(seen) >= 4
    assert seen[0] == 0 and all(n > 0 for n in seen[1:]), seen  # frozen from the first pack's end on
    assert gc.get_freeze_count() == 0

    def fail_third(grid):
        seen.append(gc.get_freeze_count())
        if len(seen) == 3:
            raise RuntimeError("third pack")

    seen.clear()
    record_forwards(monkeypatch, fail_third)
    with pytest.raises(RuntimeError, match="third pack"):
        embed(src, tmp_path / "b", tiny_ckpt, batch_tokens=150, **FAST)
    assert seen[1] > 0 and gc.get_freeze_count() == 0


def test_the_heap_freezes_after_the_first_packs_and_after_each_compilation(monkeypatch):
    """`_FrozenHeap`'s policy, pack by pack: a full collection then a freeze after the first pack, a freeze
    after packs 2-4, nothing after, a collection and a freeze after a pack that compiled a graph; one
    unfreeze at the end. A process that froze objects itself is left alone."""
    import gc

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 0)
    # Dynamo's graph count: 0 when the run starts, 1 after pack 1 (its compile), 2 after pack 7
    graphs = iter([0, 1, 1, 1, 1, 1, 1, 2, 2, 2])
    monkeypatch.setattr(job, "compile_stats", lambda: {"unique_graphs": next(graphs)})
    heap = job._FrozenHeap()
    per_pack = []
    for _ in range(9):
        calls.clear()
        heap.after_pack()
        per_pack.append(tuple(calls))
    collect_freeze, freeze = ("collect", "freeze"), ("freeze",)
    assert per_pack == [collect_freeze, freeze, freeze, freeze, (), (), collect_freeze, (), ()]
    calls.clear()
    heap.release()
    heap.release()
    assert calls == ["unfreeze"]

    monkeypatch.setattr(gc, "get_freeze_count", lambda: 5)  # the process's own freeze
    monkeypatch.setattr(job, "compile_stats", lambda: {"unique_graphs": 0})
    calls.clear()
    heap = job._FrozenHeap()
    for _ in range(3):
        heap.after_pack()
    heap.release()
    assert calls == []
