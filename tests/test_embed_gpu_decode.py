"""GPU JPEG decoding (`data/gpu_decode.py`) and its routing in `embed`, run on the CPU: torchvision's
`decode_jpeg` decodes on the CPU through the same code (`device="cpu"`), so which file goes to the batch,
which falls back, EXIF orientation and the pixel arithmetic are all exercised for real.

References: Pillow's `ImageOps.exif_transpose` for orientation (exact: the same decoded pixels turned both
ways); the exact CPU path (`Preprocessor(exact=True)`) for rows, whose decode, float resize and normalize
the GPU path repeats (tolerance 1e-5 relative: the normalization is folded into one multiply-add).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image, ImageOps
from test_embed import DATA

from dinov3_packing.apps.embed import job
from dinov3_packing.cli import main
from dinov3_packing.data import gpu_decode
from dinov3_packing.data.gpu_decode import GpuJpegDecoder, plan_jpeg, resolve_decode, upright
from dinov3_packing.data.preprocess import Preprocessor

torchvision_io = pytest.importorskip("torchvision.io")  # optional dependency; installed in the test environment

PRE = Preprocessor(max_tokens=1024)
EXACT = Preprocessor(max_tokens=1024, exact=True)
ASTRONAUT = DATA / "astronaut_rgb.jpg"


def cpu_decoder(fail_on: bytes | None = None) -> GpuJpegDecoder:
    """The GPU decoder's code on the CPU; `fail_on`: bytes the decode function refuses, as nvJPEG refuses
    what it does not support (the batch fails, then that file alone)."""

    def decode(data, device):
        if fail_on is not None and any(d.numpy().tobytes() == fail_on for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return torchvision_io.decode_jpeg(data, mode=torchvision_io.ImageReadMode.RGB, device=device)

    return GpuJpegDecoder(PRE, "cpu", decode_fn=decode)


def jpeg_bytes(image: Image.Image, orientation: int = 1, **options) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def test_plan_routes_by_header():
    rgb, gray = ASTRONAUT.read_bytes(), jpeg_bytes(Image.open(DATA / "camera_gray.png").convert("L"))
    assert plan_jpeg(rgb, "a", PRE).target == PRE.target_size(130, 150)
    assert plan_jpeg(gray, "g", PRE) is not None  # nvJPEG expands grayscale to RGB itself
    rotated = plan_jpeg((DATA / "more" / "rocket_exif6.jpg").read_bytes(), "r", PRE)
    assert rotated.orientation == 6 and rotated.original == (108, 72)  # upright size, as the CPU path records
    for cpu_only in (DATA / "camera_gray.png", DATA / "coffee_rgba.png", DATA / "more" / "chelsea_cmyk.jpg"):
        assert plan_jpeg(cpu_only.read_bytes(), cpu_only.name, PRE) is None, cpu_only
    assert plan_jpeg(b"\xff\xd8\xff garbage", "x", PRE) is None  # unreadable header: the CPU path says why
    small_limit = Preprocessor(max_tokens=1024, max_pixels=1000)
    assert plan_jpeg(rgb, "a", small_limit) is None  # over max_pixels: the CPU path drafts it or refuses it


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_like_pillow(orientation):
    stored = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    im = Image.fromarray(stored.permute(1, 2, 0).numpy())
    im.getexif()[0x0112] = orientation
    expected = torch.from_numpy(np.array(ImageOps.exif_transpose(im))).permute(2, 0, 1)
    assert torch.equal(upright(stored, orientation), expected)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_gpu_path_rows_equal_the_exact_cpu_path(orientation):
    data = jpeg_bytes(Image.open(DATA / "more" / "hubble_wide.jpg"), orientation)
    plan = plan_jpeg(data, "h", PRE)
    ((rows, grid),) = cpu_decoder().decode([plan])
    ref_rows, ref_grid, ref_size = EXACT.rows(data)
    assert grid == ref_grid and plan.original == ref_size
    assert_close(rows, ref_rows)


def test_embed_routing_fallbacks_and_skips():
    """A chunk as a worker makes it with GPU decoding on, then decoded in the main process: JPEGs through
    the batch, other files on the CPU in the worker, a JPEG the device refuses on the CPU in the main
    process, a truncated JPEG skipped with the CPU decoder's reason."""
    good = ASTRONAUT.read_bytes()
    refused = jpeg_bytes(Image.open(ASTRONAUT), 8, subsampling=0)
    truncated = good[: len(good) // 2]
    files = {
        "good.jpg": good,
        "refused.jpg": refused,
        "truncated.jpg": truncated,
        "palette.png": (DATA / "coffee_palette.png").read_bytes(),
        "cmyk.jpg": (DATA / "more" / "chelsea_cmyk.jpg").read_bytes(),
        "missing.jpg": FileNotFoundError(2, "No such file or directory"),
    }
    units = job.DecodedUnits([], PRE, gpu=True)
    chunk = [units.decoded(key, data) for key, data in files.items()]
    assert [("job" in r, "rows" in r, "error" in r) for r in chunk] == [
        (True, False, False),
        (True, False, False),
        (True, False, False),
        (False, True, False),
        (False, True, False),
        (False, False, True),
    ]
    out = {r["path"]: r for r in job.decode_on_device(cpu_decoder(fail_on=refused), PRE, chunk)}
    assert list(out) == list(files)
    # the device's rows repeat the exact path's arithmetic; every CPU decode is the default (fast) path
    expected = {"good.jpg": EXACT, "refused.jpg": PRE, "palette.png": PRE, "cmyk.jpg": PRE}
    for key, pre in expected.items():
        ref_rows, ref_grid, ref_size = pre.rows(files[key])
        assert out[key]["grid"] == ref_grid and tuple(out[key]["size"]) == ref_size, key
        assert_close(out[key]["rows"], ref_rows)
    assert out["truncated.jpg"]["error"].startswith("OSError: ")
    assert out["missing.jpg"]["error"].startswith("FileNotFoundError: ")


def test_asking_for_gpu_decoding_where_it_cannot_run_is_one_error(tmp_path, capfd, monkeypatch):
    assert resolve_decode("auto", torch.device("cpu"), exact=False) == "cpu"
    assert resolve_decode("cpu", torch.device("cpu"), exact=True) == "cpu"
    with pytest.raises(ValueError, match="decode: expected one of"):
        resolve_decode("nvjpeg", torch.device("cpu"), exact=False)
    with pytest.raises(ValueError, match=r"decode: 'gpu' .*exact path"):
        resolve_decode("gpu", torch.device("cpu"), exact=True)
    out = tmp_path / "out"
    args = ["embed", str(DATA), "--ckpt", "/no/such/ckpt", "--out", str(out), "--device", "cpu", "--decode", "gpu"]
    assert main(args) == 2  # refused before the checkpoint is looked at
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: --decode: 'gpu' needs CUDA and torchvision") and "\n" not in err
    assert err.endswith("pass --decode cpu")
    monkeypatch.setattr(gpu_decode.importlib.util, "find_spec", lambda name: None)
    assert "torchvision is not installed" in gpu_decode.gpu_decoding_missing()
    with pytest.raises(ValueError, match="torchvision is not installed"):
        GpuJpegDecoder(PRE, "cpu")


def test_the_pixel_path_is_part_of_the_settings(tmp_path):
    """exact, max_pixels and decode shape the features: run.json records them and a resume with another
    pixel path is refused instead of mixing fast and exact features in one folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(ASTRONAUT.read_bytes())
    out = tmp_path / "out"
    options = dict(device="cpu", progress=False, workers=0)
    job.embed(src, out, "random:vits16", **options)
    settings = json.loads((out / "run.json").read_text())
    assert (settings["exact"], settings["max_pixels"], settings["decode"]) == (False, 64_000_000, "cpu")
    with pytest.raises(ValueError, match=r"other settings.*'exact': \(False, True\)"):
        job.embed(src, out, "random:vits16", exact=True, **options)


def test_box_factor_keeps_both_sides_at_or_above_the_target():
    assert gpu_decode.box_factor((3024, 4032), (432, 576)) == 4  # 1/8 would give 378 rows < 432
    assert gpu_decode.box_factor((4032, 3024), (576, 432)) == 4
    assert gpu_decode.box_factor((130, 150), (64, 64)) == 2
    assert gpu_decode.box_factor((1000, 1000), (125, 125)) == 8
    assert gpu_decode.box_factor((100, 100), (60, 60)) == 1  # under twice the target: no block average


def test_large_jpeg_is_block_averaged_then_resized():
    """An image over twice its target: the rows are the k x k block mean of the decoded pixels as stored,
    turned upright, resized with antialiased bilinear filtering and normalized (each step computed here)."""
    big = Image.open(DATA / "more" / "hubble_wide.jpg").convert("RGB").resize((1603, 1201), Image.BICUBIC)
    data = jpeg_bytes(big, 6)  # stored turned: the block mean is taken as stored, then turned upright
    plan = plan_jpeg(data, "big", PRE)
    k = gpu_decode.box_factor(plan.original, plan.target)
    assert k >= 2
    ((rows, grid),) = cpu_decoder().decode([plan])
    decoded = torchvision_io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    stored = decoded.numpy().astype(np.float64)  # the block mean as stored, then turned upright
    h, w = stored.shape[1] // k, stored.shape[2] // k
    mean = upright(torch.from_numpy(stored[:, : h * k, : w * k].reshape(3, h, k, w, k).mean(axis=(2, 4))).float(), 6)
    x = torch.nn.functional.interpolate(mean[None], size=plan.target, mode="bilinear", antialias=True)[0]
    x = (x / 255 - torch.tensor(PRE.mean)[:, None, None]) / torch.tensor(PRE.std)[:, None, None]
    from dinov3_packing.packing import patchify

    assert grid == (plan.target[0] // 16, plan.target[1] // 16)
    assert_close(rows, patchify(x, 16))


def test_decoder_results_may_hold_per_image_failures():
    """A decode function that returns an exception in an image's place (nvImageCodec returns None for a
    JPEG its hardware decoder cannot take, `hardware_decode_fn` turns it into a ValueError): that image
    alone takes the CPU path."""
    good, other = ASTRONAUT.read_bytes(), jpeg_bytes(Image.open(ASTRONAUT), 3)

    def decode(data, device):
        out = torchvision_io.decode_jpeg(data, mode=torchvision_io.ImageReadMode.RGB, device=device)
        return [ValueError("no") if d.numpy().tobytes() == other else o for d, o in zip(data, out, strict=True)]

    units = job.DecodedUnits([], PRE, gpu=True)
    chunk = [units.decoded("a.jpg", good), units.decoded("b.jpg", other)]
    out = {r["path"]: r for r in job.decode_on_device(GpuJpegDecoder(PRE, "cpu", decode_fn=decode), PRE, chunk)}
    assert_close(out["a.jpg"]["rows"], EXACT.rows(good)[0])
    assert_close(out["b.jpg"]["rows"], PRE.rows(other)[0])  # the CPU's default path


def test_the_hardware_decoder_is_taken_when_it_can_be_made(monkeypatch):
    made = []
    monkeypatch.setattr(gpu_decode, "require_gpu_decoding", lambda device: None)
    monkeypatch.setattr(gpu_decode, "nvimgcodec_missing", lambda: None)
    monkeypatch.setattr(gpu_decode, "hardware_decode_fn", lambda device: made.append(device) or "hw")
    assert GpuJpegDecoder(PRE, "cpu").backend == "nvimgcodec-hardware" and made
    assert GpuJpegDecoder(PRE, "cpu").decode_fn == "hw"

    def no_engines(device):
        raise RuntimeError("Could not create decoder")

    monkeypatch.setattr(gpu_decode, "hardware_decode_fn", no_engines)
    with pytest.warns(UserWarning, match="Could not create decoder"):
        assert GpuJpegDecoder(PRE, "cpu").backend == "torchvision-nvjpeg"
    monkeypatch.setattr(gpu_decode, "nvimgcodec_missing", lambda: "not installed")
    assert GpuJpegDecoder(PRE, "cpu").backend == "torchvision-nvjpeg"


def _packed_chunks(n_chunks: int) -> tuple[list[dict], list[str]]:
    units = job.DecodedUnits([], PRE, gpu=True)
    files = [ASTRONAUT.read_bytes(), jpeg_bytes(Image.open(ASTRONAUT), 6), (DATA / "coffee_palette.png").read_bytes()]
    chunks, keys = [], []
    for c in range(n_chunks):
        chunk = [units.decoded(f"{c}-{i}", data) for i, data in enumerate(files)]
        keys += [r["path"] for r in chunk]
        chunks.append(job.pack_chunk(chunk))
    return chunks, keys


def test_the_decode_thread_gives_the_main_loops_chunks():
    """`decoded_chunks` with the helper thread (the CUDA default) against the main-loop decoding: the same
    chunks in the same order, the same rows; the time waiting for it is counted as decode."""
    chunks, keys = _packed_chunks(5)
    gpu = cpu_decoder()
    meter = job.Meter()
    threaded = list(job._decoded_in_thread(iter(chunks), meter, gpu, PRE, contextlib.nullcontext))
    inline = [job.decode_on_device(gpu, PRE, job.unpack_chunk(c)) for c in chunks]
    assert [r["path"] for c in threaded for r in c] == keys
    for a, b in zip((r for c in threaded for r in c), (r for c in inline for r in c), strict=True):
        assert a["grid"] == b["grid"]
        assert torch.equal(a["rows"], b["rows"])
    assert meter.seconds["decode"] > 0


def test_the_decode_thread_raises_in_the_main_loop_and_stops_with_it():
    chunks, _ = _packed_chunks(50)
    gpu = cpu_decoder()

    def failing():
        yield chunks[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(job._decoded_in_thread(failing(), job.Meter(), gpu, PRE, contextlib.nullcontext))
    read = []

    def counted():
        for c in chunks:
            read.append(1)
            yield c

    gen = job._decoded_in_thread(counted(), job.Meter(), gpu, PRE, contextlib.nullcontext)
    next(gen)
    gen.close()  # the main loop stops (an error, Ctrl-C): the thread stops reading
    assert not any(t.name == "embed-gpu-decode" and t.is_alive() for t in threading.enumerate())
    assert len(read) <= 1 + job.GPU_DECODE_AHEAD + 1


def test_gpu_path_features_stay_close_to_the_exact_path(tmp_path):
    """fp32 `random:vits16`, the GPU path's arithmetic (block mean for images over twice their target, then
    the float resize) on torchvision's CPU decode, against the exact path, image by image: camera-size
    photos (4032 x 3024 and an EXIF-rotated 3024 x 4032, block mean 4 x 4) at max_tokens=1024 and the
    bundled photos (no block mean: their rows equal the exact path's, above). The same bounds as the CPU
    fast path's (`test_decode.py`: min token cosine >= 0.999, min CLS cosine >= 0.99999); the measured
    values are printed and recorded in docs/preprocess.md."""
    from test_decode import camera_jpeg

    from dinov3_packing.data.files import sample_image_paths
    from dinov3_packing.weights.load import load_packing_model

    photos = sample_image_paths()
    files = [
        camera_jpeg(tmp_path / "a.jpg", photos[0], (4032, 3024)),
        camera_jpeg(tmp_path / "b.jpg", photos[3], (3024, 4032), 6),
    ]
    files += list(photos)
    datas = [f.read_bytes() for f in files]
    plans = [plan_jpeg(d, str(f), PRE) for d, f in zip(datas, files, strict=True)]
    assert [gpu_decode.box_factor(p.original, p.target) for p in plans[:2]] == [4, 4]
    decoded = cpu_decoder().decode(plans)
    exact = [EXACT.rows(d) for d in datas]
    assert [g for _, g in decoded] == [tuple(e[1]) for e in exact]
    model = load_packing_model("random:vits16")
    grid = torch.tensor([(1, *g) for _, g in decoded])
    with torch.no_grad():
        fast = model(torch.cat([r for r, _ in decoded]), grid)
        ref = model(torch.cat([e[0] for e in exact]), grid)
    token_cos = torch.nn.functional.cosine_similarity(fast.last_hidden_state, ref.last_hidden_state, dim=-1)
    cls_cos = torch.nn.functional.cosine_similarity(fast.pooler_output, ref.pooler_output, dim=-1)
    camera_tokens = int(grid[0].prod() + grid[1].prod()) + 2 * (model.num_prefix_tokens)
    print(
        f"\nGPU path (block mean + float resize) vs exact, random:vits16 fp32: min token cosine "
        f"{token_cos.min():.6f} (camera JPEGs {token_cos[:camera_tokens].min():.6f}), min CLS cosine "
        f"{cls_cos.min():.8f}"
    )
    assert token_cos.min() >= 0.999 and cls_cos.min() >= 0.99999


def test_the_cpu_share_is_picked_by_key():
    """`embed(cpu_decode_share=...)`: which JPEGs the workers decode although the GPU decodes depends on the
    key alone (the same records on every run and resume), takes about the share asked for, and a larger share
    takes every key a smaller one took."""
    keys = [f"/data/photos/{i:05d}.jpg" for i in range(4000)]
    assert not any(job.takes_cpu_share(k, 0.0) for k in keys)
    assert all(job.takes_cpu_share(k, 1.0) for k in keys)
    picked = {share: {k for k in keys if job.takes_cpu_share(k, share)} for share in (0.2, 0.5)}
    assert 0.17 < len(picked[0.2]) / len(keys) < 0.23 and 0.46 < len(picked[0.5]) / len(keys) < 0.54
    assert picked[0.2] < picked[0.5]
    assert picked[0.2] == {k for k in keys if job.takes_cpu_share(k, 0.2)}


def test_a_cpu_share_of_jpegs_is_decoded_in_the_worker():
    """With GPU decoding and a CPU share, the picked JPEGs leave the worker as the CPU path's rows (uint8
    rows on CUDA, float rows here), the others as jobs for the device."""
    data = ASTRONAUT.read_bytes()
    keys = [f"img{i}.jpg" for i in range(40)]
    units = job.DecodedUnits([], PRE, gpu=True, cpu_share=0.5)
    chunk = [units.decoded(key, data) for key in keys]
    on_cpu = [job.takes_cpu_share(k, 0.5) for k in keys]
    assert 0 < sum(on_cpu) < len(keys)
    assert [("rows" in r, "job" in r) for r in chunk] == [(c, not c) for c in on_cpu]
    ref_rows, ref_grid, _ = PRE.rows(data)
    for record in (r for r, c in zip(chunk, on_cpu, strict=True) if c):
        assert record["grid"] == ref_grid and torch.equal(record["rows"], ref_rows)
    pixels = job.DecodedUnits([], PRE, gpu=True, pixels=True, cpu_share=1.0).decoded("a.jpg", data)
    assert pixels["rows8"].dtype == torch.uint8 and "job" not in pixels


@pytest.mark.parametrize(
    ("share", "error", "match"),
    [
        (-0.1, ValueError, r"cpu_decode_share: expected a number from 0 to 1, got -0.1"),
        (1.5, ValueError, r"cpu_decode_share: expected a number from 0 to 1, got 1.5"),
        ("0.5", TypeError, r"cpu_decode_share: expected a number from 0 to 1, got '0.5'"),
        (True, TypeError, r"cpu_decode_share: expected a number"),
    ],
)
def test_a_bad_cpu_share_is_refused_before_compute(tmp_path, share, error, match):
    with pytest.raises(error, match=match):
        job.embed(DATA, tmp_path / "out", "random:vits16", device="cpu", cpu_decode_share=share, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_bad_cpu_share_in_one_line(tmp_path, capfd):
    args = ["embed", str(DATA), "--ckpt", "random:vits16", "--out", str(tmp_path / "o"), "--cpu-decode-share", "2"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capfd.readouterr().err.strip()
    assert "--cpu-decode-share: expected a number from 0 to 1, got '2'" in err and "\n" not in err
