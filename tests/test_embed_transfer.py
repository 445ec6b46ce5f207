"""How decoded images cross from the DataLoader workers to the model, and how the bound is named.

- A chunk crosses as one flat buffer per dtype (uint8 pixels and JPEG bytes, float32 rows), not one tensor
  per image; unpacked, its records equal the ones the worker decoded.
- The CUDA path's uint8 rows (pixels patchified in the worker, converted and normalized a whole pack at once
  in the main process's runner) give the same features as float32 rows made in the workers: run here on
  the CPU through `embed`, compared bit for bit (the same float32 operations in the same order:
  `Preprocessor.rows_from_pixels`, `patchify8` + `normalize_rows8_`).
- The bound rests on the device's busy time, not on the main loop's `model` stage.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_embed import DATA, tiny_ckpt  # noqa: F401  (tiny_ckpt: fixture)
from test_embed_store import photo_folder
from torch.utils.data import DataLoader

from dinov3_packing.apps.embed import EmbedReader, embed, job
from dinov3_packing.apps.embed.progress import WAIT_SHARE, Meter
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.data.sources import open_source, work_units

PRE = Preprocessor(max_tokens=64)
FAST = dict(progress=False, device="cpu", save=("cls", "mean", "patches"), patch_dtype=torch.float32)


def test_rows_from_pixels_equal_the_rows_of_every_test_photograph():
    for record in open_source(DATA):
        if record.key.endswith("corrupt.jpg"):
            continue
        data = record.read()
        x, grid, size = PRE.rows_or_pixels(data, record.key)
        rows, ref_grid, ref_size = PRE.rows(data, record.key)
        assert (grid, size) == (ref_grid, ref_size), record.key
        assert torch.equal(PRE.rows_from_pixels(x) if x.dtype == torch.uint8 else x, rows), record.key
    assert PRE.rows_or_pixels((DATA / "astronaut_rgb.jpg").read_bytes())[0].dtype == torch.uint8


def test_a_pack_of_uint8_rows_normalized_at_once_equals_the_rows_of_each_photograph():
    """What the runner does with a pack: every image's `patchify8` rows in one uint8 block, converted and
    normalized by one `normalize_rows8_`: bit for bit the float32 rows of each image."""
    blocks, refs = [], []
    for record in open_source(DATA):
        if record.key.endswith("corrupt.jpg"):
            continue
        x, _, _ = PRE.rows_or_pixels(record.read(), record.key)
        if x.dtype == torch.uint8:
            rows8 = PRE.patchify8(x)
            assert rows8.dtype == torch.uint8 and rows8.shape == PRE.rows_from_pixels(x).shape
            blocks.append(rows8)
            refs.append(PRE.rows(record.read(), record.key)[0])
    assert len(blocks) >= 5
    block = torch.cat(blocks)
    got = PRE.normalize_rows8_(torch.empty(block.shape, dtype=torch.float32).copy_(block))
    assert torch.equal(got, torch.cat(refs))


def test_a_chunk_crosses_as_one_buffer_per_dtype_and_unpacks_to_the_worker_records():
    units = work_units(open_source(DATA), max_records=job.DECODE_CHUNK)
    dataset = job.DecodedUnits(units, PRE, gpu=True, pixels=True)  # JPEG jobs, pixels, 16-bit rows, an error
    expected = {r.key: dataset.decoded(r.key, r.read()) for unit in units for r in unit}
    loader = DataLoader(dataset, batch_size=None, num_workers=1, in_order=True)
    seen = {}
    for item in loader:
        assert set(item) == {"records", "buffers"} and len(item["buffers"]) <= 2  # uint8 and float32 at most
        for record in job.unpack_chunk(item):
            seen[record["path"]] = record
    assert set(seen) == set(expected)
    kinds = set()
    for key, want in expected.items():
        got = seen[key]
        assert set(got) == set(want), key
        for name in ("rows8", "rows"):
            if name in want:
                kinds.add(name)
                assert torch.equal(got[name], want[name]), key
        if "job" in want:
            kinds.add("job")
            assert torch.equal(got["job"].data, want["job"].data) and got["job"].target == want["job"].target
        if "error" in want:
            kinds.add("error")
            assert got["error"] == want["error"]
    assert kinds == {"rows8", "rows", "job", "error"}


def test_pixels_decoded_in_workers_give_the_features_of_rows(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    src = photo_folder(tmp_path, 12)
    rows = tmp_path / "rows"
    embed(src, rows, tiny_ckpt, workers=1, batch_tokens=200, **FAST)
    real = job.decode_loader

    def pixels_loader(units, preprocessor, device, workers, gpu, cpu_share=0.0):
        loader = real(units, preprocessor, device, workers, gpu, cpu_share)
        loader.dataset.pixels = True  # what CUDA gets: uint8 pixels, rows made in the runner
        return loader

    monkeypatch.setattr(job, "decode_loader", pixels_loader)
    pixels = tmp_path / "pixels"
    embed(src, pixels, tiny_ckpt, workers=1, batch_tokens=200, **FAST)
    got, ref = EmbedReader(pixels), EmbedReader(rows)
    assert got.paths == ref.paths
    for path in ref.paths:
        for kind in ("cls", "mean", "patches"):
            assert torch.equal(got.get(path, kind), ref.get(path, kind)), (path, kind)


def test_the_bound_is_model_only_when_the_device_was_busy():
    now = [0.0]
    meter = Meter(clock=lambda: now[0])
    with meter.stage("model"):  # launching a pack: host work the old meter counted as the model's
        now[0] += 6.0
    with meter.waiting_on_device():
        now[0] += 3.5
    meter.device_busy(4.0)
    with meter.stage("decode"):
        now[0] += 0.5
    assert meter.seconds["model"] == 9.5 and meter.elapsed() == 10.0
    shares = meter.shares()
    assert shares["device"] == 0.4 and shares["host"] == 0.6
    assert meter.bound() == "host"  # the device idled 60% of the run while the main loop worked
    assert "host 60%, device busy 40%" in meter.postfix()
    meter.device_busy(10 * (1 - WAIT_SHARE) - 4.0)
    assert meter.bound() == "model"  # busy 90% of the run, and the main loop ahead of it (waited 35%)
    assert "device busy 90%, device wait 35%" in meter.postfix()


def test_a_busy_device_the_host_never_waits_for_reads_as_host():
    """Busy 95% of the run with the main loop hardly ever waiting on it: the host feeds it just in time (the
    H200 run of 2026-12-01 with ViT-S read "model" at 35% of the model-alone speed, launch gaps inside
    packs counting as busy), so the bound is the host's work, not the model."""
    now = [0.0]
    meter = Meter(clock=lambda: now[0])
    with meter.stage("model"):
        now[0] += 9.0
    with meter.waiting_on_device():
        now[0] += WAIT_SHARE * 10 - 0.01
    meter.device_busy(9.5)
    shares = meter.shares()
    assert shares["device"] > 1 - WAIT_SHARE and shares["device wait"] < WAIT_SHARE
    assert meter.bound() == "host"
    with meter.waiting_on_device():
        now[0] += 0.5
    assert meter.shares()["device wait"] >= WAIT_SHARE and meter.bound() == "model"


class _Niceness(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.nice(0)


def test_decode_workers_run_below_the_main_process():
    """With a worker per core the main loop's threads must not queue behind the decoders: every worker of
    `decode_loader` starts at WORKER_NICENESS above the main process (read in the worker itself)."""
    loader = job.decode_loader([], Preprocessor(), torch.device("cpu"), workers=2, gpu=False)
    probe = DataLoader(_Niceness(), batch_size=None, num_workers=2, worker_init_fn=loader.worker_init_fn)
    main = os.nice(0)
    assert list(probe) == [min(main + job.WORKER_NICENESS, 19)] * 2


def _runner(model=None) -> job._PackRunner:
    """A CPU `_PackRunner` on PRE (the writer side is not exercised by `_upload`)."""
    runner = job._PackRunner.__new__(job._PackRunner)
    runner.model, runner.preprocessor, runner.device, runner.copy_stream = model, PRE, torch.device("cpu"), None
    return runner


def test_the_upload_of_a_pack_mixing_uint8_and_float_rows_equals_the_rows_of_each_image():
    """The runner's upload of one pack holding 8-bit photographs (uint8 rows from the worker) and a 16-bit
    one (float32 rows): every slot equals `Preprocessor.rows` of its image, bit for bit; a record with no
    rows at all is refused, not left as uninitialised memory."""
    records, refs = [], []
    for record in open_source(DATA):
        if record.key.endswith("corrupt.jpg"):
            continue
        decoded = job._cpu_rows(PRE, record.key, record.read(), pixels=True)
        if "error" not in decoded:
            records.append(decoded)
            refs.append(PRE.rows(record.read(), record.key)[0])
    assert {"rows8", "rows"} <= {k for r in records for k in r}  # both kinds in the pack
    chunk = job.unpack_chunk(job.pack_chunk(records))
    counts = [h * w for h, w in (r["grid"] for r in chunk)]
    assert torch.equal(_runner()._upload(chunk, counts), torch.cat(refs))
    bad = [{"path": "x.jpg", "grid": (1, 1), "size": (16, 16)}]
    with pytest.raises(ValueError, match=r"x\.jpg"):
        _runner()._upload(bad, [1])


def test_a_pack_run_reads_nothing_back_from_the_device(tmp_path, tiny_ckpt):  # noqa: F811
    """`_PackRunner.run` must not read a tensor's value on the host (`.item()`, a checked `segment_reduce`):
    on CUDA that waits for the queued forward and the next pack is no longer launched ahead. Profiled on
    the CPU, where such a read shows as `aten::_local_scalar_dense` all the same."""
    from dinov3_packing.weights.load import load_checkpoint

    model = load_checkpoint(tiny_ckpt, "cpu", torch.float32).model
    records = [job._cpu_rows(PRE, "a.jpg", (DATA / "astronaut_rgb.jpg").read_bytes(), pixels=True)]
    records.append(job._cpu_rows(PRE, "g.png", (DATA / "camera_gray.png").read_bytes(), pixels=True))
    handed = []

    class Sink:  # stands in for the shard writer: what reaches it is checked, nothing is written
        patch_dtype = torch.float32

        def add_pack(self, pack):
            handed.extend(pack.records())

    runner = _runner(model)
    runner.writer, runner.save, runner.meter, runner._in_flight = Sink(), ("cls", "mean", "patches"), Meter(), None
    runner.heap = job._FrozenHeap()
    try:
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.inference_mode(), torch.profiler.profile(activities=cpu) as prof:
            runner.run(records, tokens=0)
    finally:
        runner.heap.release()
    reads = [e.key for e in prof.key_averages() if e.key in ("aten::item", "aten::_local_scalar_dense")]
    assert reads == []
    runner.finish()
    assert [path for path, _, _ in handed] == ["a.jpg", "g.png"]
    for (_, features, _), record in zip(handed, records, strict=True):
        n = record["grid"][0] * record["grid"][1]
        assert features["patches"].shape[0] == n
        assert torch.allclose(features["mean"], features["patches"].mean(0), rtol=1e-6, atol=1e-6)
