"""Before/after on one GPU: the same compiled forwards from several source trees, interleaved.

Two versions of one package cannot be imported in one process, so each measurement runs in its own
process that imports `dinov3_packing` from one tree (`--tree PATH`, a checkout). The driver runs the
trees as interleaved rounds (A B A B ...), so drift of the card's clocks hits them alike, and prints the
median forward per tree and workload with the bf16 min token cosine against Hugging Face fp32.

    git worktree add /tmp/base e638667
    python benchmarks/ab_trees.py --drive --tree /tmp/base --label base --tree . --label new \\
        --rounds 3 --out $OUT/ab_trees.jsonl

One round for one tree (what the driver runs; `--reference` adds the cosine rows):
    python benchmarks/ab_trees.py --tree /tmp/base --label base --inputs inputs.pt --out rows.jsonl

Workloads: ViT-L/16 (`random:vitl16`, bf16, `compile_model` defaults) on mixed-64 and uniform 64 x 224,
the inputs made once by the driver and loaded by every round. Each round compiles anew (the first call,
`first_call_s`, is not timed) and times its forwards with `apps.bench.timing.measure` (CUDA events). The
cosine compares each tree's bf16 output with Hugging Face's `DINOv3ViTModel` in fp32, image by image,
holding that tree's own `random:` weights, so it measures the tree's numerics whatever its init draws.
Every row carries the measured tree's git commit, dirty flag and source sha256.

The timing helper is loaded from this script's own checkout by file path (the tree measured may predate
it); the model, packing and compile code come from `--tree` alone.

`--smoke` runs the same paths on the CPU (`random:vits16` in fp32 on tiny images, no compile).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
TIMING_PY = HERE.parents[1] / "dinov3_packing" / "apps" / "bench" / "timing.py"
WORKLOADS = ("mixed-64", "uniform-64x224")


def load_timing():
    """The shared timing helper of this checkout, by path: the package name may belong to another tree."""
    spec = importlib.util.spec_from_file_location("ab_trees_timing", TIMING_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def check_trees(trees: list[str], labels: list[str]) -> list[Path]:
    """The trees as resolved paths, each holding a `dinov3_packing` package, with one distinct label each."""
    if not trees:
        raise ValueError("--tree: expected at least one checkout of the package")
    if len(labels) != len(trees):
        raise ValueError(f"--label: expected one per --tree ({len(trees)}), got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--label: expected distinct labels, got {labels}")
    paths = []
    for tree in trees:
        path = Path(tree).resolve()
        if not (path / "dinov3_packing" / "__init__.py").is_file():
            raise ValueError(f"--tree: {tree} is not a checkout of the package (no dinov3_packing/__init__.py)")
        paths.append(path)
    return paths


def interleaved(labels: list[str], rounds: int) -> list[tuple[int, str]]:
    """`(round, label)` in the order the driver runs them: every tree once per round, in the given order."""
    if rounds < 1:
        raise ValueError(f"--rounds: expected at least 1, got {rounds}")
    return [(r, label) for r in range(rounds) for label in labels]


# ---------------------------------------------------------------------------------------------------------
# One round of one tree (its own process)


def import_tree(tree: Path):
    """`dinov3_packing` imported from `tree`, and its `compile_model` (it moved to `parallel.compile` in the
    reorganisation; older trees have it in `dinov3_packing.compile`)."""
    sys.path.insert(0, str(tree))
    package = importlib.import_module("dinov3_packing")
    if Path(package.__file__).resolve().parent != tree / "dinov3_packing":
        raise ValueError(f"--tree: imported dinov3_packing from {package.__file__}, not from {tree}")
    for name in ("dinov3_packing.parallel.compile", "dinov3_packing.compile"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # older trees have `parallel` as a module, not a package
            found = False
        if found:
            return package, importlib.import_module(name).compile_model
    raise ValueError(f"--tree: {tree} has no compile_model")


def one_round(args: argparse.Namespace) -> None:
    tree, label = check_trees(args.tree, args.label)[0], args.label[0]
    timing = load_timing()
    import torch

    if args.smoke:
        torch.set_num_threads(1)  # tiny matmuls: threads only contend on a loaded CPU

    package, compile_model = import_tree(tree)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is exact fp32
    torch.backends.cudnn.allow_tf32 = False
    inputs = torch.load(args.inputs)
    meta = timing.run_metadata(device, tree / "dinov3_packing")
    base = {
        "label": label,
        "round": args.round,
        "arch": inputs["arch"],
        "dtype": str(dtype).removeprefix("torch."),
        **{k: meta[k] for k in ("card", "torch", "git_commit", "git_dirty", "source_sha256")},
        "tree": str(tree),
    }
    model = package.load_packing_model(inputs["ckpt"], device, dtype)
    run = model if args.smoke else compile_model(model)
    spec = timing.Timing(0.0, 1, 1) if args.smoke else timing.Timing(target_s=1.0, min_repeats=8, max_repeats=40)
    rows = []
    with torch.no_grad():
        for name in WORKLOADS:
            hs, grid = inputs[name]
            hs = hs.to(device, dtype)
            m = timing.measure(lambda hs=hs, grid=grid: run(hs, grid), device, spec, compiled=not args.smoke)
            rows.append(
                base
                | {
                    "workload": name,
                    "images": int(grid.shape[0]),
                    "median_ms": m["median_s"] * 1e3,
                    "min_ms": m["min_s"] * 1e3,
                    "images_per_s": int(grid.shape[0]) / m["median_s"],
                    "repeats": m["repeats"],
                    "first_call_s": m["first_call_s"],
                    "times_ms": [t * 1e3 for t in m["times_s"]],
                }
            )
        if args.reference:
            rows.append(base | {"workload": WORKLOADS[0], **reference_cosine(package, run, inputs, device, dtype)})
    timing.write_rows(args.out, rows)


def reference_cosine(package, run, inputs: dict, device, dtype) -> dict:
    """bf16 packed output on mixed-64 against Hugging Face fp32 with the same weights, image by image."""
    import torch
    import torch.nn.functional as F

    hs, grid = inputs[WORKLOADS[0]]
    got = run(hs.to(device, dtype), grid).last_hidden_state.float()
    fp32 = package.load_packing_model(inputs["ckpt"], "cpu", torch.float32)
    ref = package.reference_model(fp32).to(device).eval()
    prefix = fp32.num_prefix_tokens
    cos = []
    for rows, image in zip(package.split(got, grid), inputs["images"], strict=True):
        want = ref(pixel_values=image[None].to(device)).last_hidden_state[0, prefix:]
        cos.append(F.cosine_similarity(rows.reshape(want.shape), want, dim=-1).min())
    return {"kind": "cosine", "reference": "HF DINOv3ViTModel fp32 per image", "min_cos": float(min(cos))}


# ---------------------------------------------------------------------------------------------------------
# The driver


def make_inputs(path: Path, smoke: bool) -> None:
    """The rounds' inputs, made once (the driver's own package: any tree packs them the same way)."""
    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    from dinov3_packing import pack
    from dinov3_packing.apps.bench.workloads import mixed_sizes

    sizes = {
        "mixed-64": mixed_sizes(4, 1, 4) if smoke else mixed_sizes(64),
        "uniform-64x224": [(32, 32)] * 2 if smoke else [(224, 224)] * 64,
    }
    g = torch.Generator().manual_seed(0)
    images = {name: [torch.randn(3, h, w, generator=g) for h, w in s] for name, s in sizes.items()}
    arch = "vits16" if smoke else "vitl16"
    ckpt = f"random:{arch}"
    inputs = {"arch": arch, "ckpt": ckpt, "images": images[WORKLOADS[0]]}
    inputs |= {name: pack(imgs, 16) for name, imgs in images.items()}
    torch.save(inputs, path)


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per tree and workload: median of the rounds' medians, their spread, the min cosine, and the ratio
    of each tree's median to the first tree's."""
    out = []
    for name in WORKLOADS:
        first = None
        for label in labels:
            timed = [r for r in rows if r["label"] == label and r["workload"] == name and "median_ms" in r]
            cos = [r["min_cos"] for r in rows if r["label"] == label and r["workload"] == name and "min_cos" in r]
            if not timed:
                continue
            medians = [r["median_ms"] for r in timed]
            row = {
                "kind": "summary",
                "label": label,
                "workload": name,
                "rounds": len(timed),
                "median_ms": statistics.median(medians),
                "round_medians_ms": medians,
                "min_cos": min(cos) if cos else None,
                "git_commit": timed[0]["git_commit"],
                "git_dirty": timed[0]["git_dirty"],
            }
            first = first or row
            row["vs_first"] = row["median_ms"] / first["median_ms"]
            out.append(row)
    return out


def drive(args: argparse.Namespace) -> int:
    trees = check_trees(args.tree, args.label)
    order = interleaved(args.label, args.rounds)
    timing = load_timing()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        make_inputs(inputs, args.smoke)
        start = len(timing.read_rows(out)) if out.exists() else 0
        seen = set()
        for r, label in order:
            tree = trees[args.label.index(label)]
            cmd = [sys.executable, str(HERE), "--tree", str(tree), "--label", label, "--round", str(r)]
            cmd += ["--inputs", str(inputs), "--out", str(out)] + (["--smoke"] if args.smoke else [])
            if label not in seen:
                cmd.append("--reference")  # the cosine once per tree: it does not depend on the round
                seen.add(label)
            print(f"round {r} {label}: {tree}", flush=True)
            proc = subprocess.run(cmd, check=False)  # noqa: S603 - this script, our own arguments
            if proc.returncode != 0:
                raise RuntimeError(f"round {r} of {label} ({tree}) exited with {proc.returncode}")
    rows = timing.read_rows(out)[start:]
    summary = summarize(rows, args.label)
    timing.write_rows(out, summary, echo=False)
    print(f"{'tree':<12} {'workload':<16} {'median ms':>10} {'vs first':>9} {'min cos':>9}  commit")
    for s in summary:
        cos = "-" if s["min_cos"] is None else f"{s['min_cos']:.6f}"
        dirty = " (dirty)" if s["git_dirty"] else ""
        print(
            f"{s['label']:<12} {s['workload']:<16} {s['median_ms']:10.2f} {s['vs_first']:9.4f} {cos:>9}  "
            f"{(s['git_commit'] or '?')[:12]}{dirty}"
        )
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="a checkout of the package (repeat with --drive)")
    ap.add_argument("--label", action="append", default=[], help="a name for each --tree, in the same order")
    ap.add_argument("--out", required=True, help="JSON lines, appended")
    ap.add_argument("--drive", action="store_true", help="run every tree as interleaved subprocess rounds")
    ap.add_argument("--rounds", type=int, default=3, help="with --drive: rounds of every tree")
    ap.add_argument("--inputs", help="one round: the inputs file the driver made")
    ap.add_argument("--round", type=int, default=0, help="one round: its index, recorded in the rows")
    ap.add_argument("--reference", action="store_true", help="one round: also the cosine against HF fp32")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, ViT-S, tiny images, no compile")
    args = ap.parse_args(argv)
    if not args.drive:
        if len(args.tree) != 1 or len(args.label) != 1:
            raise ValueError("--tree/--label: one round takes exactly one of each (or pass --drive)")
        if not args.inputs:
            raise ValueError("--inputs: one round needs the inputs file the driver made (or pass --drive)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        check_trees(args.tree, args.label)
        if args.drive:
            interleaved(args.label, args.rounds)
            return drive(args)
        one_round(args)
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
