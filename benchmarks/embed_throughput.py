"""End-to-end `embed` throughput against its stages, on a folder of mixed-size JPEGs.

Makes `--n` JPEG photographs of random sizes (random crops of the bundled sample photographs, sides
`--min-side`..`--max-side` px) in a temporary folder, then measures, in images/s:
    decode    the DataLoader alone (workers decode + preprocess into packed rows), no model
    model     the packed forwards alone, on the same packs, inputs already on the device
    embed     `embed()` end to end (decode, packing, forwards, shards written), model load excluded
The slowest of decode and model bounds embed; the script names it. Each stage is wall-clock time
(`time.perf_counter`, the device synchronized at the end): decode and embed are host pipelines with
worker processes, which CUDA events would not cover.

    python benchmarks/embed_throughput.py --n 3000 --ckpt random:vitl16 --device cuda --workers 14
    python benchmarks/embed_throughput.py --n 24 --ckpt random:vits16 --device cpu --workers 2 --max-tokens 64  # smoke
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinov3_packing.apps.bench.timing import run_metadata, write_report
from dinov3_packing.apps.embed import embed
from dinov3_packing.apps.embed.job import DTYPES, ImageFiles
from dinov3_packing.data.budget import pack_by_budget, segment_tokens
from dinov3_packing.data.files import list_images, sample_image_paths
from dinov3_packing.data.preprocess import Preprocessor
from dinov3_packing.weights.load import load_packing_model


def make_photo(job: tuple[int, str, int, int, int]) -> None:
    seed, folder, n_sources, min_side, max_side = job
    r = random.Random(seed)
    source = Image.open(sample_image_paths()[seed % n_sources]).convert("RGB")
    w, h = r.randint(min_side, max_side), r.randint(min_side, max_side)
    # a random crop of the photograph, scaled to w x h: real image content at every size
    cw, ch = r.randint(source.width // 2, source.width), r.randint(source.height // 2, source.height)
    x, y = r.randint(0, source.width - cw), r.randint(0, source.height - ch)
    source.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(f"{folder}/{seed:06d}.jpg", quality=90)


def keep_list(batch: list) -> list:
    """DataLoader collate: the worker's records as they are (packing happens after)."""
    return batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--ckpt", default="random:vitl16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bfloat16 on CUDA, else float32")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--min-side", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--save", default="cls,mean")
    ap.add_argument(
        "--json",
        default=None,
        help="also write the figures and run metadata to this JSON file "
        "(benchmarks/results/latest/embed_throughput.json holds the current run)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        t = time.perf_counter()
        jobs = [(i, str(folder), len(sample_image_paths()), args.min_side, args.max_side) for i in range(args.n)]
        with Pool(max(1, args.workers)) as pool:
            pool.map(make_photo, jobs, chunksize=16)
        paths = list_images(folder)
        mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        print(f"made {len(paths)} JPEGs ({mb:.0f} MB) in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        model = load_packing_model(args.ckpt, device, dtype)
        load_s = time.perf_counter() - t
        pre = Preprocessor.for_checkpoint(args.ckpt, patch_size=model.patch_size, max_tokens=args.max_tokens)

        # decode: the DataLoader alone
        loader = DataLoader(
            ImageFiles(paths, pre),
            batch_size=8,
            collate_fn=keep_list,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if args.workers else None,
        )
        t = time.perf_counter()
        records = [r for batch in loader for r in batch]
        decode_s = time.perf_counter() - t

        # model: the same packs, inputs already on the device
        grids = [r["grid"] for r in records]
        packs = pack_by_budget(grids, args.batch_tokens, model.num_prefix_tokens)
        batches = [
            (
                torch.cat([records[i]["rows"] for i in p]).to(device, dtype),
                torch.tensor([(1, *grids[i]) for i in p]),
            )
            for p in packs
        ]
        tokens = sum(segment_tokens(g, model.num_prefix_tokens) for g in grids)
        del records
        with torch.inference_mode():
            for x, g in batches[:3]:  # warm-up
                model(x, g)
            sync(device)
            t = time.perf_counter()
            for x, g in batches:
                model(x, g)
            sync(device)
            model_s = time.perf_counter() - t
        del batches, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # embed: end to end, model load timed apart and subtracted
        t = time.perf_counter()
        summary = embed(
            folder,
            Path(tmp) / "features",
            args.ckpt,
            save=args.save,
            max_tokens=args.max_tokens,
            batch_tokens=args.batch_tokens,
            device=device,
            dtype=dtype,
            workers=args.workers,
            progress=False,
        )
        embed_s = time.perf_counter() - t - load_s
        assert summary.embedded == len(paths) and not summary.skipped

    n = len(paths)
    fill = tokens / (len(packs) * args.batch_tokens)
    rates = {"decode": n / decode_s, "model": n / model_s, "embed": n / embed_s}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.ckpt} {str(dtype).removeprefix('torch.')}, {n} images, {tokens / n:.0f} tokens/image")
    print(f"packs {len(packs)} of <= {args.batch_tokens} tokens, fill {fill:.1%}; workers {args.workers}")
    print(f"decode only : {rates['decode']:8.1f} images/s")
    print(f"model only  : {rates['model']:8.1f} images/s  ({tokens / model_s:,.0f} tokens/s)")
    print(f"embed e2e   : {rates['embed']:8.1f} images/s  (model load {load_s:.1f} s excluded)")
    bound = "decode" if rates["decode"] < rates["model"] else "model"
    print(f"bound by    : {bound} ({rates['embed'] / min(rates['decode'], rates['model']):.0%} of it reached)")
    if args.json:
        info = {"device": name, "ckpt": args.ckpt, "n": n, "tokens": tokens, "fill": fill, "bound": bound}
        write_report(args.json, {"meta": run_metadata(device), **vars(args), **info, "images_per_s": rates})


if __name__ == "__main__":
    main()
