"""GPU checks of `embed`'s CUDA branches: skipped without CUDA, so not CI tests; run them on a CUDA machine
(`python -m pytest -q tests/test_embed_cuda.py`).

- `Preprocessor.rows_from_pixels` on the device (the uint8 pixels the workers hand over on CUDA) gives the
  CPU workers' float32 rows (`Preprocessor.rows`) bit for bit, written into a slice of a larger buffer as
  `_PackRunner._upload` does.
- The same for a pack: every image's uint8 rows (`patchify8`) copied into one block on the device and
  normalized at once (`normalize_rows8_`), as `_PackRunner._upload` does.
- `embed` on CUDA (random:vits16, fp32 and bf16, eager): the uint8 path gives the features of the rows
  path (float32 rows made on the CPU; same packs, `workers=0` keeps the order) bit for bit (the mean too:
  a segment sum, deterministic; with index_add_'s atomics it differed in the last bits on the H200,
  2026-12-01); in fp32 its CLS
  features are also those of a direct forward of each image alone on its CPU rows (tolerance 1e-3
  relative: other packs, other kernels' sums; a wrong image or a broken upload is off by O(1)); the
  device-busy share is in (0, 1].
- A pack's launch makes no blocking copy (sync debug mode: no synchronizing call from `_PackRunner.run`'s
  own lines), so the next pack is queued while the device computes.
- One process on `cuda:1` with cuda:0 current (two GPUs): a sleep kernel on cuda:1 after each forward must
  show in the device-busy time and be waited for before the features reach the writer (the features
  equal a cuda:0 run's), which holds only when the events are recorded on cuda:1's stream.
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from conftest import assert_close
from test_embed import DATA
from test_embed_pipeline import record_forwards
from test_embed_store import photo_folder

from dinov3_packing.apps.embed import EmbedReader, embed, job
from dinov3_packing.apps.embed.progress import Meter
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.data.sources import open_source
from dinov3_packing.weights.load import load_checkpoint, resolve_alias

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA (run on the device)")

CKPT = "random:vits16"
MAX_TOKENS = 256
RUN = dict(
    max_tokens=MAX_TOKENS,
    batch_tokens=1024,
    workers=0,
    compile=False,
    progress=False,
    save=("cls", "mean", "patches"),
    patch_dtype=torch.float32,
)
KINDS = ("cls", "mean", "patches")


def preprocessor() -> Preprocessor:
    """The preprocessing `embed` uses for CKPT with RUN's settings."""
    return Preprocessor.for_checkpoint(resolve_alias(CKPT), max_tokens=MAX_TOKENS)


def photos() -> list[tuple[str, bytes]]:
    return [(r.key, r.read()) for r in open_source(DATA) if not r.key.endswith("corrupt.jpg")]


def rows_path(monkeypatch) -> None:
    """Make `embed` read float32 rows made in the workers (the CPU path) instead of uint8 pixels."""
    real = job.decode_loader

    def loader(units, preprocessor, device, workers, gpu, cpu_share=0.0):
        loader = real(units, preprocessor, device, workers, gpu, cpu_share)
        loader.dataset.pixels = False
        return loader

    monkeypatch.setattr(job, "decode_loader", loader)


def keep_meters(monkeypatch) -> list[Meter]:
    meters: list[Meter] = []

    def meter():
        meters.append(Meter())
        return meters[-1]

    monkeypatch.setattr(job, "Meter", meter)
    return meters


def features(out, kinds=KINDS) -> dict[tuple[str, str], torch.Tensor]:
    reader = EmbedReader(out)
    return {(path, kind): reader.get(path, kind) for path in reader.paths for kind in kinds}


def test_rows_from_pixels_on_cuda_equal_the_cpu_rows():
    pre, seen = preprocessor(), 0
    for key, data in photos():
        x, grid, _ = pre.rows_or_pixels(data, key)
        if x.dtype != torch.uint8:
            continue  # 16-bit grayscale: float rows from the worker, nothing for the device to do
        ref, ref_grid, _ = pre.rows(data, key)
        assert grid == ref_grid
        assert torch.equal(pre.rows_from_pixels(x.cuda()).cpu(), ref), key
        buffer = torch.full((ref.shape[0] + 7, ref.shape[1]), float("nan"), device="cuda")
        pre.rows_from_pixels(x.cuda(), buffer[3 : 3 + ref.shape[0]])
        assert torch.equal(buffer[3 : 3 + ref.shape[0]].cpu(), ref), key
        assert buffer[:3].isnan().all() and buffer[3 + ref.shape[0] :].isnan().all()
        seen += 1
    assert seen >= 3


def test_a_pack_of_uint8_rows_normalized_on_cuda_equals_the_cpu_rows():
    """The runner's CUDA upload: each image's `patchify8` rows copied into one uint8 block on the device,
    converted and normalized as one pack (`normalize_rows8_`): bit for bit the CPU workers' rows."""
    pre, blocks, refs = preprocessor(), [], []
    for key, data in photos():
        x, _, _ = pre.rows_or_pixels(data, key)
        if x.dtype == torch.uint8:
            blocks.append(pre.patchify8(x).pin_memory())
            refs.append(pre.rows(data, key)[0])
    block = torch.empty(sum(b.shape[0] for b in blocks), blocks[0].shape[1], dtype=torch.uint8, device="cuda")
    start = 0
    for b in blocks:
        block[start : start + b.shape[0]].copy_(b, non_blocking=True)
        start += b.shape[0]
    rows = pre.normalize_rows8_(torch.empty(block.shape, dtype=torch.float32, device="cuda").copy_(block))
    assert len(blocks) >= 3 and torch.equal(rows.cpu(), torch.cat(refs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pixels_on_cuda_give_the_features_of_cpu_rows(tmp_path, monkeypatch, dtype):
    src = photo_folder(tmp_path, 12)
    meters = keep_meters(monkeypatch)
    pixels = embed(src, tmp_path / "pixels", CKPT, device="cuda", dtype=dtype, **RUN)
    assert pixels.new == 12 and len(meters) == 1 and meters[0].device_seconds > 0
    assert 0 < pixels.device_busy <= 1 and pixels.bound is not None
    rows_path(monkeypatch)
    rows = embed(src, tmp_path / "rows", CKPT, device="cuda", dtype=dtype, **RUN)
    assert 0 < rows.device_busy <= 1
    got, ref = features(tmp_path / "pixels"), features(tmp_path / "rows")
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    if dtype != torch.float32:
        return
    # fp32: each image alone through the model, on the CPU workers' rows
    model = load_checkpoint(CKPT, "cuda", torch.float32).model
    pre = preprocessor()
    with torch.inference_mode():
        for path in EmbedReader(tmp_path / "pixels").paths:
            x, grid, _ = pre.rows(path)
            out = model(x.cuda(), torch.tensor([(1, *grid)]))
            assert_close(got[(path, "cls")], out.pooler_output[0].float().cpu(), rel_tol=1e-3)
            patches = out.last_hidden_state.float().cpu()
            assert_close(got[(path, "patches")].reshape(patches.shape), patches, rel_tol=1e-3)


def test_a_pack_launches_without_a_blocking_copy(tmp_path):
    """`sums.new_tensor(counts)` was a blocking host-to-device copy inside the launch: the host waited for
    the whole queued forward before the next pack could be queued."""
    lines, first = inspect.getsourcelines(job._PackRunner.run)
    run_lines = range(first, first + len(lines))
    src = photo_folder(tmp_path, 12)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = embed(src, tmp_path / "out", CKPT, device="cuda", **{**RUN, "save": ("cls", "mean")})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summary.new == 12
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    mine = [(w.lineno, str(w.message)) for w in syncs if w.filename == job.__file__ and w.lineno in run_lines]
    assert not mine, mine


def sleep_cycles_for(device: torch.device, seconds: float) -> tuple[int, float]:
    """A `torch.cuda._sleep` length near `seconds` on `device`, and the seconds it takes (events there)."""
    cycles = 10_000_000
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for _ in range(2):  # the second measurement on a warm device
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            torch.cuda._sleep(cycles)
            end.record(stream)
            end.synchronize()
            took = start.elapsed_time(end) / 1e3
            cycles = max(int(cycles * seconds / took), 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        torch.cuda._sleep(cycles)
        end.record(stream)
        end.synchronize()
        return cycles, start.elapsed_time(end) / 1e3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="GPU check: needs two CUDA devices")
def test_one_process_on_cuda_1_times_and_waits_on_cuda_1(tmp_path, monkeypatch):
    torch.cuda.set_device(0)
    src = photo_folder(tmp_path, 12)
    save = {"save": ("cls", "patches")}  # no "mean": see below
    ref_summary = embed(src, tmp_path / "ref", CKPT, device="cuda:0", **{**RUN, **save})
    second = torch.device("cuda", 1)
    cycles, sleep_s = sleep_cycles_for(second, 0.1)
    forwards = []

    def stall(grid):  # inside the pack: after its forward, before its features are summed and copied back
        with torch.cuda.device(second):
            torch.cuda._sleep(cycles)
        forwards.append(len(grid))

    record_forwards(monkeypatch, stall)
    meters = keep_meters(monkeypatch)
    # no "mean": before its counts were summed on the device, that blocking copy made the host wait out
    # the sleep between the two events whatever stream they were on
    summary = embed(src, tmp_path / "second", CKPT, device="cuda:1", **{**RUN, **save})
    assert torch.cuda.current_device() == 0  # the call left the caller's current device as it was
    assert summary.new == ref_summary.new == 12 and forwards
    # each pack's interval holds its sleep: events on cuda:0's idle stream would time the launch only
    assert meters[0].device_seconds >= 0.9 * len(forwards) * sleep_s
    assert 0 < summary.device_busy <= 1
    # waited for before the writer read them: features copied back after the sleep, complete
    got, ref = features(tmp_path / "second", save["save"]), features(tmp_path / "ref", save["save"])
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert_close(got[key], value, rel_tol=1e-5)


def test_gpu_decoding_features_stay_close_to_the_exact_path(tmp_path):
    """`embed(decode="gpu", cpu_decode_share=0)` (every JPEG on the device: nvImageCodec's hardware decoder
    where installed, else torchvision's nvJPEG; the helper thread, `job.GPU_DECODE_THREAD`) against
    `embed(exact=True)` on the CPU's decode, fp32, the bundled photos and two camera-size JPEGs (one
    EXIF-rotated; block mean 4 x 4 on the device): the same bounds as the CPU fast path's (min token cosine
    >= 0.999, min CLS cosine >= 0.99999)."""
    from test_decode import camera_jpeg

    from dinov3_packing.data.files import sample_image_paths
    from dinov3_packing.data.gpu_decode import GpuJpegDecoder

    src = tmp_path / "src"
    src.mkdir()
    photos = sample_image_paths()
    camera_jpeg(src / "cam_a.jpg", photos[0], (4032, 3024))
    camera_jpeg(src / "cam_b.jpg", photos[3], (3024, 4032), 6)
    for p in photos:
        (src / p.name).write_bytes(p.read_bytes())
    run = dict(RUN, max_tokens=1024, batch_tokens=4096)
    backend = GpuJpegDecoder(Preprocessor(max_tokens=1024), "cuda").backend
    embed(src, tmp_path / "gpu", CKPT, device="cuda", dtype=torch.float32, decode="gpu", cpu_decode_share=0, **run)
    embed(src, tmp_path / "exact", CKPT, device="cuda", dtype=torch.float32, exact=True, **run)
    got, ref = features(tmp_path / "gpu"), features(tmp_path / "exact")
    assert got.keys() == ref.keys()
    cls = min(torch.cosine_similarity(got[k], ref[k], dim=-1).min().item() for k in ref if k[1] == "cls")
    tokens = min(torch.cosine_similarity(got[k], ref[k], dim=-1).min().item() for k in ref if k[1] == "patches")
    print(f"\nGPU decoding ({backend}) vs exact, {CKPT} fp32: min token cosine {tokens:.6f}, min CLS cosine {cls:.8f}")
    assert tokens >= 0.999 and cls >= 0.99999


def test_a_cpu_share_with_gpu_decoding_gives_each_record_its_paths_features(tmp_path):
    """`embed(decode="gpu", cpu_decode_share=0.5)`: each record's features are those of the path its key
    picks (fp32, 1e-5): the CPU fast path's (`decode="cpu"`) for the picked half, the device's
    (`cpu_decode_share=0`) for the rest; run.json records the share and a resume with another is refused."""
    from test_decode import camera_jpeg

    from dinov3_packing.apps.embed import job
    from dinov3_packing.data.files import sample_image_paths
    from dinov3_packing.data.sources import open_source

    src = tmp_path / "src"
    src.mkdir()
    photos = sample_image_paths()
    # two files of each path, named so (the pick hashes each key, here the file's absolute path)
    names = [f"cam_{i}.jpg" for i in range(64)]
    picked = [n for n in names if job.takes_cpu_share(str(src.resolve() / n), 0.5)]
    names = picked[:2] + [n for n in names if n not in picked][:2]
    for i, name in enumerate(names):
        camera_jpeg(src / name, photos[i % len(photos)], (4032, 3024) if i % 2 else (3024, 4032))
    keys = [r.key for r in open_source(src)]
    assert sorted(keys) == sorted(str(src.resolve() / n) for n in names)
    assert sum(job.takes_cpu_share(k, 0.5) for k in keys) == 2  # both paths are taken
    run = dict(RUN, max_tokens=1024, batch_tokens=4096)
    out = tmp_path / "gpu"
    options = dict(device="cuda", dtype=torch.float32, **run)
    embed(src, out, CKPT, decode="gpu", cpu_decode_share=0.5, **options)
    assert json.loads((out / "run.json").read_text())["cpu_decode_share"] == 0.5
    with pytest.raises(ValueError, match=r"other settings.*'cpu_decode_share': \(0.5, None\)"):
        embed(src, out, CKPT, decode="gpu", cpu_decode_share=0, **options)
    with pytest.raises(ValueError, match=r"other settings.*'cpu_decode_share': \(0.5, 0.35\)"):
        embed(src, out, CKPT, decode="gpu", **options)  # the default share
    embed(src, tmp_path / "all_gpu", CKPT, decode="gpu", cpu_decode_share=0, **options)
    embed(src, tmp_path / "cpu", CKPT, decode="cpu", **options)
    got, on_gpu, on_cpu = features(out), features(tmp_path / "all_gpu"), features(tmp_path / "cpu")
    assert got.keys() == on_gpu.keys() == on_cpu.keys()
    for (key, kind), value in got.items():
        ref = on_cpu if job.takes_cpu_share(key, 0.5) else on_gpu
        assert_close(value, ref[key, kind], rel_tol=1e-5)
