"""The main process's CPU per image for receiving `embed`'s decoded chunks, by chunk size, in one run.

`embed`'s DataLoader workers hand each chunk of `job.DECODE_CHUNK` images to the main process as one
shared-memory buffer per dtype (`job.pack_chunk`); receiving it (unpickling the records, the buffer's file
descriptor passed over a fresh socket connection, mapping it) and unpacking it (`job.unpack_chunk`) is main
process time, which on the GPU competes with launching packs for the interpreter lock (the H200 profile of
ViT-B embedding, 2026-12-03: the largest cost outside the forward). This script measures only that side, on
the CPU: for each chunk size, a DataLoader as `embed` makes it on CUDA (uint8 pixels, `pixels=True`; no
pinning here) reads a set of ~500 x 375 JPEGs built from the bundled photos, and the main process's CPU
time (`time.process_time`, all its threads) per image is reported, with the wall time. Chunk sizes are
timed interleaved over `--rounds` rounds (median, min, max). No model runs: the figures are the cost per
image the main loop pays before any GPU work, not a throughput.

    python benchmarks/loader_receive.py --chunks 8,16,32 --n 1200 --workers 2 --rounds 3 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from dinov3_packing.apps.bench.timing import run_metadata, write_rows
from dinov3_packing.apps.embed import job
from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.data.sources import open_source, work_units


def build_small(root: Path, n: int) -> None:
    photos = sample_image_paths()
    for i in range(n):
        image = Image.open(photos[i % len(photos)]).convert("RGB").resize((500 + i % 7, 375 - i % 5))
        image.save(root / f"{i:05d}.jpg", quality=90)


def receive_pass(src: Path, chunk: int, workers: int) -> tuple[int, float, float]:
    """(images, main-process CPU seconds, wall seconds) of one pass over `src` with chunks of `chunk`."""
    job.DECODE_CHUNK = chunk
    records = open_source(str(src))
    units = work_units(records, max_records=chunk)
    loader = torch.utils.data.DataLoader(
        job.DecodedUnits(units, Preprocessor(max_tokens=1024), gpu=False, pixels=True),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=job.prefetch_chunks(),
        in_order=False,
    )
    images, cpu, wall = 0, time.process_time(), time.perf_counter()
    for item in loader:
        images += len(job.unpack_chunk(item))
    return images, time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="8,16,32", help="chunk sizes, comma-separated (embed's default is 8)")
    ap.add_argument("--n", type=int, default=1200, help="images in the set")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        chunks = []
    if not chunks or min(chunks) < 1:
        ap.error(f"--chunks: expected comma-separated positive ints, got {args.chunks!r}")
    for name in ("n", "workers", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    write_rows(args.out, [{"part": "meta", **run_metadata("cpu")}])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        build_small(src, args.n)
        receive_pass(src, chunks[0], args.workers)  # warm: the file cache, the workers' imports
        seen: dict[int, list[tuple[float, float]]] = {c: [] for c in chunks}
        for _ in range(args.rounds):
            for chunk in chunks:
                images, cpu, wall = receive_pass(src, chunk, args.workers)
                assert images == args.n, (images, args.n)
                seen[chunk].append((cpu / images * 1e3, wall))
    rows = []
    for chunk, runs in seen.items():
        per_image = [ms for ms, _ in runs]
        rows.append(
            {
                "part": "receive",
                "chunk": chunk,
                "images": args.n,
                "workers": args.workers,
                "main_cpu_ms_per_image_median": round(statistics.median(per_image), 4),
                "main_cpu_ms_per_image_min_max": [round(min(per_image), 4), round(max(per_image), 4)],
                "wall_s_median": round(statistics.median(w for _, w in runs), 3),
            }
        )
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
