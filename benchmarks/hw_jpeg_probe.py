"""Can the H200's hardware JPEG decoders (NVJPG engines, reached through NVIDIA's nvImageCodec) decode camera
JPEGs fast enough for `embed`, and what do they cost the SMs?

Measures, on camera-size JPEGs made like `embed_throughput.py`'s set (a): decode images/s for each
nvImageCodec backend (hardware, GPU, hybrid) and for torchvision's batched nvJPEG; the pixels against
Pillow's; a bf16 matmul's TFLOP/s alone and while the hardware decoder runs in another thread; the GPU cost
of resizing one decoded image to a ViT-L 1024-patch target.

    python benchmarks/hw_jpeg_probe.py --out results.jsonl [--n 256]

nvImageCodec (`nvidia-nvimgcodec-cu13`, with `nvidia-nvjpeg`) is not a dependency of the package: this
probe decides whether it should become an optional one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
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
    ap.add_argument("--folder", default="/tmp/hwcam")
    ap.add_argument("--parts", default="nvjpeg,nvimgcodec", help="comma-separated subset of nvjpeg,nvimgcodec")
    args = ap.parse_args()
    parts = args.parts.split(",")
    out = open(args.out, "a")
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

    if "nvjpeg" in parts:
        probe_nvjpeg(out, blobs)
    if "nvimgcodec" not in parts:
        return 0
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
    for name in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY"):
        kind = getattr(nvimgcodec.BackendKind, name, None)
        if kind is None:
            continue
        try:
            dec = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind)])
            for batch in (16, 64):

                def run(batch=batch):
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

    mm_rate(1.0)
    alone = mm_rate(4.0)
    for name in ("HW_GPU_ONLY", "GPU_ONLY"):
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
    ways = {
        "float32 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].float(), size=target, mode="bilinear", antialias=True
        ),
        "float16 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].half(), size=target, mode="bilinear", antialias=True
        ),
        "float32 area": lambda: F.interpolate(hwc.permute(2, 0, 1)[None].float(), size=target, mode="area"),
        "uint8 bilinear aa": lambda: F.interpolate(
            hwc.permute(2, 0, 1)[None].contiguous(), size=target, mode="bilinear", antialias=True
        ),
    }
    for name, fn in ways.items():
        try:
            fn()
            emit(out, part="resize", way=name, ms=round(timed(fn, 50) * 1e3, 4))
        except Exception as e:
            emit(out, part="resize", way=name, error=f"{type(e).__name__}: {e}"[:300])
    return 0


def probe_nvjpeg(out, blobs) -> None:
    """dinov3_packing.data.nvjpeg (nvJPEG's hardware backend through ctypes): pixels against Pillow's at each
    scale (odd sizes included: are the last row and column written?), speed per scale, the host time of
    a batch's call (does it block?), a matmul's rate while it decodes in a thread, the resize after it."""
    from dinov3_packing.data import nvjpeg

    emit(out, part="nvjpeg", missing=nvjpeg.hardware_decoding_missing())
    dec = nvjpeg.HardwareJpegDecoder("cuda")
    emit(out, part="nvjpeg", engines=dec.engines, cores_per_engine=dec.cores_per_engine)
    photo = Image.open(et.sample_image_paths()[0]).convert("RGB")
    pipelined = nvjpeg.HardwareJpegDecoder("cuda", flags=0)
    for w, h in ((1001, 751), (4032, 3024), (333, 517)):
        buf = io.BytesIO()
        photo.resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        for scale in nvjpeg.SCALES:
            im = Image.open(io.BytesIO(data))
            if scale > 1:
                im.draft("RGB", (w // scale, h // scale))
            ref = np.asarray(im.convert("RGB")).astype(int)
            for variant in ("as is", "sync", "init+sync", "new decoder", "pipelined"):
                try:
                    if variant == "new decoder":
                        d_ = nvjpeg.HardwareJpegDecoder("cuda")
                    elif variant == "pipelined":
                        d_ = pipelined
                    else:
                        d_ = dec
                    if variant == "init+sync":
                        d_._batch = 0
                    t = d_.decode([data], [(h, w)], [scale])[0]
                    if variant != "as is":
                        torch.cuda.synchronize()
                    got = t.cpu().numpy().astype(int)
                except Exception as e:
                    emit(out, part="nvjpeg_pixels", size=[h, w], scale=scale, variant=variant, error=str(e))
                    continue
                row = {
                    "part": "nvjpeg_pixels",
                    "size": [h, w],
                    "scale": scale,
                    "variant": variant,
                    "got": list(got.shape),
                    "pillow": list(ref.shape),
                }
                if got.shape == ref.shape:
                    d = np.abs(got - ref)
                    row.update(
                        mean=round(float(d.mean()), 4),
                        max=int(d.max()),
                        last_row_max=int(d[-1].max()),
                        last_col_max=int(d[:, -1].max()),
                    )
                emit(out, **row)
    dec = nvjpeg.HardwareJpegDecoder("cuda")
    sizes = [tuple(reversed(Image.open(io.BytesIO(b)).size)) for b in blobs]
    got = dec.decode(blobs[:8], sizes[:8], [4] * 8)
    torch.cuda.synchronize()
    for b, g in zip(blobs[:8], got):
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (im.width // 4, im.height // 4))
        ref = np.asarray(im.convert("RGB")).astype(int)
        emit(
            out,
            part="nvjpeg_batch_pixels",
            shape=list(g.shape),
            mean=round(float(np.abs(g.cpu().numpy().astype(int) - ref).mean()), 4)
            if tuple(g.shape) == ref.shape
            else None,
        )
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    for scale in nvjpeg.SCALES:
        for batch in (16, 64):
            host = []

            def run(scale=scale, batch=batch, host=host):
                for i in range(0, len(datas), batch):
                    t0 = time.perf_counter()
                    dec.decode(datas[i : i + batch], sizes[i : i + batch], [scale] * len(datas[i : i + batch]))
                    host.append(time.perf_counter() - t0)

            try:
                run()
                host.clear()
                s = timed(run)
            except Exception as e:
                emit(out, part="nvjpeg_speed", scale=scale, batch=batch, error=str(e))
                continue
            emit(
                out,
                part="nvjpeg_speed",
                scale=scale,
                batch=batch,
                img_s=round(len(datas) / s, 1),
                host_share=round(sum(host) / s, 3),
            )
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def mm_rate(seconds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            n += 10
        return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12

    mm_rate(1.0)
    alone = mm_rate(4.0)
    for scale in (1, 4):
        stop, count, stream = threading.Event(), [0], torch.cuda.Stream()

        def loop(stop=stop, count=count, stream=stream, scale=scale):
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    outs = dec.decode(datas[:64], sizes[:64], [scale] * 64)
                    stream.synchronize()
                    count[0] += len(outs)

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
            part="nvjpeg_contention",
            scale=scale,
            matmul_alone_tflops=round(alone, 1),
            matmul_with_decode_tflops=round(busy, 1),
            decode_img_s_meanwhile=round(rate, 1),
        )
    x = torch.randint(0, 256, (756, 1008, 3), dtype=torch.uint8, device="cuda")
    for name, fn in {
        "1/4 scale: float32 bilinear aa to 432x576": lambda: F.interpolate(
            x.permute(2, 0, 1)[None].float(), size=(432, 576), mode="bilinear", antialias=True
        ),
    }.items():
        fn()
        emit(out, part="resize", way=name, ms=round(timed(fn, 50) * 1e3, 4))


if __name__ == "__main__":
    sys.exit(main())
