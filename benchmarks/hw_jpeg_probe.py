"""Can the H200's hardware JPEG decoders (NVJPG engines, reached through NVIDIA's nvImageCodec) decode camera
JPEGs fast enough for `embed`, and what do they cost the SMs?

Measures, on camera-size JPEGs made like `embed_throughput.py`'s set (a): decode images/s for each
nvImageCodec backend (hardware, GPU, hybrid) and for torchvision's batched nvJPEG; the pixels against
Pillow's; a bf16 matmul's TFLOP/s alone and while the hardware decoder runs in another thread; the GPU cost
of resizing one decoded image to a ViT-L 1024-patch target.

    python benchmarks/hw_jpeg_probe.py --out results.jsonl [--n 256] [--parts decode,contention,resize,gil]

Part `gil` separates the two ways a decoding thread can slow the model: it holds the interpreter lock (the main
thread's Python loop runs slower: the model's launches would), or its kernels share the SMs (a queue of
matmuls launched at once, timed by CUDA events, takes longer while it decodes).

nvImageCodec (`nvidia-nvimgcodec-cu13` with `nvidia-nvjpeg`) is an optional accelerator of `embed --decode
gpu` (`data/gpu_decode.py`, the `[nvjpeg]` extra). A ctypes binding of nvJPEG's own hardware backend (for its
1/2..1/8 scale factors) was tried in commit cbd1f63 and dropped: on the H200 it decoded the first image of a
decoder right and then garbage (RESULTS.md, 2026-12-02, sixth session).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_throughput as et

from dinov3_packing.apps.bench.timing import run_metadata
from dinov3_packing.ops.triton.box_mean import box_mean


def emit(out, **row):
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


def timed(fn, reps=1):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "hwcam"))
    ap.add_argument("--parts", default="decode,contention,resize,gil")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = open(args.out, "a")
    emit(out, part="meta", **run_metadata(torch.device("cuda")))
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with Pool(15) as pool:
        pool.map(et.make_photo, [(i, str(folder), "camera") for i in range(args.n)], chunksize=4)
    files = sorted(folder.glob("*.jpg"))[: args.n]
    blobs = [f.read_bytes() for f in files]
    emit(
        out,
        part="set",
        n=len(blobs),
        build_s=round(time.perf_counter() - t, 1),
        mean_mb=round(sum(map(len, blobs)) / len(blobs) / 1e6, 2),
        gpu=torch.cuda.get_device_name(),
    )

    from nvidia import nvimgcodec

    emit(
        out,
        part="nvimgcodec",
        version=getattr(nvimgcodec, "__version__", "?"),
        backends=[k for k in dir(nvimgcodec.BackendKind) if k.isupper()],
    )
    ref = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
    params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
    results = {}
    for name in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY") if "decode" in parts else ():
        kind = getattr(nvimgcodec.BackendKind, name, None)
        if kind is None:
            continue
        try:
            dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind)])
            for batch in (16, 64):

                def run(batch=batch, dec=dec):
                    got = []
                    for i in range(0, len(blobs), batch):
                        imgs = dec.decode(blobs[i : i + batch], params=params)
                        got.extend(torch.as_tensor(im, device="cuda") for im in imgs if im is not None)
                    return got

                got = run()  # warm
                n_ok = len(got)
                first = got[0].cpu().numpy() if got else None
                del got
                s = timed(run)
                diff = (
                    np.abs(first.astype(int) - ref.astype(int))
                    if first is not None and first.shape == ref.shape
                    else None
                )
                results[(name, batch)] = len(blobs) / s
                emit(
                    out,
                    part="decode",
                    backend=name,
                    batch=batch,
                    decoded=n_ok,
                    img_s=round(len(blobs) / s, 1),
                    shape=list(first.shape) if first is not None else None,
                    vs_pillow_mean=None if diff is None else round(float(diff.mean()), 4),
                    vs_pillow_max=None if diff is None else int(diff.max()),
                )
        except Exception as e:  # a backend this machine lacks
            emit(out, part="decode", backend=name, error=f"{type(e).__name__}: {e}"[:400])

    # torchvision's batched nvJPEG for comparison
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        if "decode" not in parts:
            raise LookupError("part decode not asked for")
        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        for batch in (16, 64):

            def tv(batch=batch):
                for i in range(0, len(datas), batch):
                    decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device="cuda")

            tv()
            s = timed(tv)
            emit(out, part="decode", backend="torchvision", batch=batch, img_s=round(len(blobs) / s, 1))
    except Exception as e:
        emit(out, part="decode", backend="torchvision", error=f"{type(e).__name__}: {e}"[:400])

    # contention: a bf16 matmul loop alone, then with the hardware decoder in a thread
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def mm_rate(seconds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            n += 10
        return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12

    if "contention" in parts:
        mm_rate(1.0)
        alone = mm_rate(4.0)
    for name in ("HW_GPU_ONLY", "GPU_ONLY") if "contention" in parts else ():
        try:
            dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, name))])
            stop, count = threading.Event(), [0]
            stream = torch.cuda.Stream()

            def loop(dec=dec, stop=stop, count=count, stream=stream):
                with torch.cuda.stream(stream):
                    while not stop.is_set():
                        imgs = dec.decode(blobs[:64], params=params, cuda_stream=stream.cuda_stream)
                        _ = [torch.as_tensor(im, device="cuda") for im in imgs]
                        stream.synchronize()
                        count[0] += len(imgs)

            th = threading.Thread(target=loop)
            th.start()
            time.sleep(1.0)
            c0, t0 = count[0], time.perf_counter()
            busy = mm_rate(4.0)
            rate = (count[0] - c0) / (time.perf_counter() - t0)
            stop.set()
            th.join()
            emit(
                out,
                part="contention",
                backend=name,
                matmul_alone_tflops=round(alone, 1),
                matmul_with_decode_tflops=round(busy, 1),
                decode_img_s_meanwhile=round(rate, 1),
            )
        except Exception as e:
            emit(out, part="contention", backend=name, error=f"{type(e).__name__}: {e}"[:400])

    # GPU resize of one decoded 4032x3024 image to 432x576 (ViT-L, 1024 patches), several ways
    hwc = torch.randint(0, 256, (3024, 4032, 3), dtype=torch.uint8, device="cuda")
    target = (432, 576)
    from dinov3_packing.data.gpu_decode import GpuJpegDecoder, JpegJob
    from dinov3_packing.data.preprocess import Preprocessor

    rows_decoder = GpuJpegDecoder(Preprocessor(max_tokens=1024), "cuda", decode_fn=lambda data, device: [])
    job = JpegJob("probe", torch.empty(0, dtype=torch.uint8), 1, (3024, 4032), target)

    def rows_of(pixels):
        return rows_decoder._rows(pixels.permute(2, 0, 1), job)

    ways = {
        "float32 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].float(), size=target, mode="bilinear", antialias=True
        ),
        "float16 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].half(), size=target, mode="bilinear", antialias=True
        ),
        "float32 area": lambda: F.interpolate(hwc.permute(2, 0, 1)[None].float(), size=target, mode="area"),
        "float16 copy + avg_pool2d 4x4 + float32 bilinear aa (embed's GPU path to 2026-12-02)": lambda: F.interpolate(
            F.avg_pool2d(hwc.permute(2, 0, 1)[None].half(), 4).float(), size=target, mode="bilinear", antialias=True
        ),
        "ops.triton.box_mean 4x4 alone": lambda: box_mean(hwc.permute(2, 0, 1), 4),
        "ops.triton.box_mean 4x4 + float32 bilinear aa (embed's GPU path)": lambda: F.interpolate(
            box_mean(hwc.permute(2, 0, 1), 4)[None], size=target, mode="bilinear", antialias=True
        ),
        "gpu_decode.GpuJpegDecoder._rows (box_mean + resize + normalize + patchify)": lambda: rows_of(hwc),
        "uint8 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].contiguous(), size=target, mode="bilinear", antialias=True
        ),
    }
    for name, fn in ways.items() if "resize" in parts else ():
        try:
            fn()
            emit(out, part="resize", way=name, ms=round(timed(fn, 50) * 1e3, 4))
        except Exception as e:
            emit(out, part="resize", way=name, error=f"{type(e).__name__}: {e}"[:300])
    if "gil" in parts:
        gil_part(out, blobs, nvimgcodec, params, a)
    return 0


def python_rate(seconds: float) -> float:
    """Iterations per second of a pure-Python loop in this thread (it needs the interpreter lock throughout)."""
    n, t0 = 0, time.perf_counter()
    while (t := time.perf_counter()) - t0 < seconds:
        for _ in range(1000):
            n += 1
    return n / (t - t0)


def queued_matmul_s(a: torch.Tensor, n: int) -> float:
    """Device seconds of `n` bf16 matmuls launched at once on the current stream (CUDA events): the SMs' share,
    with no host in the way once they are queued."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        a @ a
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def gil_part(out, blobs, nvimgcodec, params, a) -> None:
    """The interpreter lock and the SMs while a helper thread decodes 16 camera JPEGs at a time, three ways:
    nvImageCodec's hardware decoder alone, `GpuJpegDecoder.decode` (decode + block mean + resize + normalize +
    patchify, embed's GPU path) and torchvision's nvJPEG."""
    from dinov3_packing.data.gpu_decode import GpuJpegDecoder, plan_jpeg
    from dinov3_packing.data.preprocess import Preprocessor

    pre = Preprocessor(max_tokens=1024)
    jobs = [plan_jpeg(b, f"{i}.jpg", pre) for i, b in enumerate(blobs[:16])]
    datas = [j.data for j in jobs]
    dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
    gpu = GpuJpegDecoder(pre, "cuda")

    def hw(stream):
        imgs = dec.decode(blobs[:16], params=params, cuda_stream=stream.cuda_stream)
        return [torch.as_tensor(im, device="cuda") for im in imgs]

    def pipeline(stream):
        return gpu.decode(jobs)

    def tv(stream):
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")

    python_rate(0.5)
    alone_py = python_rate(3.0)
    queued_matmul_s(a, 50)
    n_mm = 600
    alone_mm = queued_matmul_s(a, n_mm)
    for name, fn in (("nvimgcodec-hardware", hw), ("GpuJpegDecoder.decode", pipeline), ("torchvision", tv)):
        try:
            stream = torch.cuda.Stream()
            stop, count, busy_s = threading.Event(), [0], [0.0]

            def loop(fn=fn, stream=stream, stop=stop, count=count, busy_s=busy_s):
                with torch.cuda.stream(stream):
                    while not stop.is_set():
                        t = time.thread_time()
                        fn(stream)
                        busy_s[0] += time.thread_time() - t
                        stream.synchronize()
                        count[0] += 16

            th = threading.Thread(target=loop)
            th.start()
            time.sleep(1.0)
            c0, cpu0, t0 = count[0], busy_s[0], time.perf_counter()
            py = python_rate(3.0)
            mm = queued_matmul_s(a, n_mm)
            wall = time.perf_counter() - t0
            rate, thread_cpu = (count[0] - c0) / wall, busy_s[0] - cpu0
            stop.set()
            th.join()
            emit(
                out,
                part="gil",
                thread=name,
                python_loop_alone=round(alone_py),
                python_loop_with_thread=round(py),
                python_share_left=round(py / alone_py, 3),
                queued_matmul_alone_s=round(alone_mm, 4),
                queued_matmul_with_thread_s=round(mm, 4),
                matmul_slowdown=round(mm / alone_mm, 3),
                thread_img_s=round(rate, 1),
                thread_cpu_ms_per_img=round(thread_cpu / max(count[0] - c0, 1) * 1e3, 3),
            )
        except Exception as e:
            emit(out, part="gil", thread=name, error=f"{type(e).__name__}: {e}"[:400])


if __name__ == "__main__":
    sys.exit(main())
