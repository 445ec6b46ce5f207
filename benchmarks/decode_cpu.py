"""CPU preprocessing speed on camera-size JPEGs, one core, three pipelines in the same run:

    default   `Preprocessor(max_tokens=N)`: the fast path (header, JPEG draft, EXIF, colour modes, uint8
              resize, normalize, patchify into packed rows)
    exact     `Preprocessor(max_tokens=N, exact=True)`: full-scale decode, float resize (Hugging Face's order)
    plain     a plain PIL pipeline: `Image.draft("RGB", target)`, `convert("RGB")`, uint8 bilinear resize,
              normalize to a float `[3, H, W]` tensor (no EXIF, no mode handling, no patchify)

to the same target size (`target_size`, at most N patches). The images: the bundled photos re-encoded at
4032x3024 and 3024x4032, q90, in a temporary folder (10 files). Passes over the set alternate between the
pipelines, so load on a shared machine hits all three alike; each figure is the median pass. Reported:
images/s of each and default/plain (issue 13's bar: >= 0.8).

`--drift` also measures how far the fast path's features move from the exact path's (fp32 `random:vits16`,
image by image: min token and min CLS cosine) on the bundled photos, the camera-size set, and a "mosaic"
set (the photos tiled at full scale into 4032x3024 frames: sharp detail everywhere, the hard case for
draft decoding).

    python benchmarks/decode_cpu.py                # speed, ~1 min
    python benchmarks/decode_cpu.py --drift        # and the feature drift, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinov3_packing.apps.bench.timing import run_metadata, time_calls, write_report, write_rows
from dinov3_packing.data.files import sample_image_paths
from dinov3_packing.data.preprocess import Preprocessor, target_size
from dinov3_packing.model.archs import IMAGENET_MEAN, IMAGENET_STD
from dinov3_packing.weights.load import load_packing_model

SIZES = ((4032, 3024), (3024, 4032))


def camera_set(folder: Path) -> list[Path]:
    paths = []
    for source in sample_image_paths():
        photo = Image.open(source).convert("RGB")
        for width, height in SIZES:
            path = folder / f"{source.stem}_{width}x{height}.jpg"
            photo.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
            paths.append(path)
    return paths


def mosaic_set(folder: Path) -> list[Path]:
    paths = []
    for source in sample_image_paths():
        photo = Image.open(source).convert("RGB")
        for width, height in SIZES:
            frame = Image.new("RGB", (width, height))
            for x in range(0, width, photo.width):
                for y in range(0, height, photo.height):
                    frame.paste(photo, (x, y))
            path = folder / f"{source.stem}_mosaic_{width}x{height}.jpg"
            frame.save(path, quality=90)
            paths.append(path)
    return paths


def plain_pil(max_tokens: int):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]

    def run(path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            height, width = target_size(im.height, im.width, 16, max_tokens=max_tokens)
            im.draft("RGB", (width, height))
            rgb = im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255
        return (x - mean) / std

    return run


def speed(paths: list[Path], max_tokens: int, passes: int) -> dict:
    pipelines = {
        "default": Preprocessor(max_tokens=max_tokens).rows,
        "exact": Preprocessor(max_tokens=max_tokens, exact=True).rows,
        "plain": plain_pil(max_tokens),
    }
    for run in pipelines.values():  # warm-up: file cache, first-call allocations
        run(paths[0])
    seconds = {name: [] for name in pipelines}
    for _ in range(passes):
        for name, run in pipelines.items():
            seconds[name] += time_calls(lambda run=run: [run(p) for p in paths], 1, "cpu")
    result = {name: {"img_per_s": len(paths) / statistics.median(s), "pass_s": s} for name, s in seconds.items()}
    result["default_over_plain"] = result["default"]["img_per_s"] / result["plain"]["img_per_s"]
    return result


def drift(model, paths: list[Path], max_tokens: int) -> dict:
    token_min, cls_min = 1.0, 1.0
    for path in paths:  # one image at a time: bounded memory, per-image figures
        out = []
        for exact in (False, True):
            batch = Preprocessor(max_tokens=max_tokens, exact=exact)(path)
            with torch.no_grad():
                result = model(batch.hidden_states, batch.grid_thw)
            out.append((batch.grid_thw, result.last_hidden_state, result.pooler_output))
        assert torch.equal(out[0][0], out[1][0]), f"{path}: the two paths disagree on the grid"
        token_min = min(token_min, F.cosine_similarity(out[0][1], out[1][1], dim=-1).min().item())
        cls_min = min(cls_min, F.cosine_similarity(out[0][2], out[1][2], dim=-1).min().item())
    return {"images": len(paths), "min_token_cos": token_min, "min_cls_cos": cls_min}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the set per pipeline")
    parser.add_argument("--drift", action="store_true", help="also measure the feature drift (random:vits16)")
    parser.add_argument("--out", default=None, help="write the report (JSON) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = {**run_metadata("cpu"), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        camera = camera_set(Path(tmp))
        result = {"speed": speed(camera, args.max_tokens, args.passes)}
        s = result["speed"]
        print(
            f"{len(camera)} camera JPEGs (4032x3024 / 3024x4032 q90) to <= {args.max_tokens} patches, 1 thread: "
            f"default {s['default']['img_per_s']:.1f} img/s, exact {s['exact']['img_per_s']:.1f} img/s, "
            f"plain PIL {s['plain']['img_per_s']:.1f} img/s; default / plain = {s['default_over_plain']:.2f}"
        )
        if args.drift:
            model = load_packing_model("random:vits16")
            sets = {"bundled": sample_image_paths(), "camera": camera, "mosaic": mosaic_set(Path(tmp))}
            result["drift"] = {name: drift(model, paths, args.max_tokens) for name, paths in sets.items()}
            for name, d in result["drift"].items():
                print(
                    f"drift {name} ({d['images']} images, max_tokens={args.max_tokens}): min token cosine "
                    f"{d['min_token_cos']:.6f}, min CLS cosine {d['min_cls_cos']:.8f}"
                )
    write_rows(None, [{"part": "meta", **meta}, {"part": "result", **result}])
    if args.out:
        write_report(args.out, {"meta": meta, "results": result})


if __name__ == "__main__":
    main()
