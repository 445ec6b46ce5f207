"""`dinov3-packing` command line: every argparse of the package, each subcommand a thin shell over a library
function that the tests call too.

Arguments are parsed and checked before torch or transformers are imported (only the torch-free modules
`model.archs`, `ops.attention`, `data.budget` and `apps.bench.options` are read here), so `--help` and a bad
flag answer at once.

Exit status: 0 done; 1 `embed` skipped unreadable files (without `--allow-skipped`); 2 a usage or input
error, reported as one line `error: ...` naming the flag (library errors name Python arguments, which
`_in_flag_terms` turns into the flags); 130 interrupted (Ctrl-C), one line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .apps.bench.options import SECTIONS, Options
from .data.budget import OVERSIZE
from .model.archs import DEFAULT_CKPT
from .ops.attention import ATTENTION_BACKENDS

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# `data.preprocess.POLICIES` and `data.decode.DEFAULT_MAX_PIXELS`; those modules import torch, numpy and
# Pillow (tests/test_cli.py checks that the copies agree).
POLICIES = ("native", "fixed")
MAX_PIXELS = 64_000_000
# `data.gpu_decode.DECODE_CHOICES` and the defaults of `apps.embed.embed` (same test).
DECODE_CHOICES = ("cpu", "gpu", "auto")
DECODE = "cpu"
CPU_DECODE_SHARE = 0.35  # `apps.embed.job.CPU_DECODE_SHARE`
IMAGE_COLUMN = "image"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= `low`, else one line saying `what` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _share(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _attn_backend(parser: argparse.ArgumentParser, *flags: str) -> None:
    parser.add_argument(
        *flags,
        dest="attn_backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="attention kernel (default auto: the fastest that runs here)",
    )


def _ckpt(parser: argparse.ArgumentParser, required: bool = False) -> None:
    if required:
        # Features of random weights look like features; nobody should get them by leaving out a flag.
        text = f"checkpoint: Hub id, folder or .safetensors file; {DEFAULT_CKPT} for seeded random weights (tests)"
        parser.add_argument("--ckpt", default=None, help=f"required. {text}")
    else:
        parser.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT}, offline)")


def _required_ckpt(args: argparse.Namespace) -> str:
    if args.ckpt is None:
        raise ValueError(
            "ckpt: required: a Hugging Face id (facebook/dinov3-vitl16-pretrain-lvd1689m), a checkpoint folder "
            f"or .safetensors file, or {DEFAULT_CKPT} for seeded random weights (features that mean nothing)"
        )
    return args.ckpt


def add_align(parser: argparse.ArgumentParser) -> None:
    _ckpt(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch_size", type=_positive_int, default=2, help="images in the uniform test (default 2)")
    parser.add_argument("--image_size", type=_positive_int, default=224, help="side of the random test images")
    parser.add_argument("--threshold", type=float, default=0.99, help="minimum cosine similarity (default 0.99)")
    parser.add_argument("--use_real_images", action="store_true", help="also test photographs")
    parser.add_argument("--image_dir", default=None, help="folder of photographs (default: the bundled samples)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="packed model dtype")
    parser.add_argument(
        "--rtol", type=float, default=None, help="max |diff| / max |ref| (default 1e-5 in float32, off otherwise)"
    )
    # The seed's spelling stays accepted here.
    _attn_backend(parser, "--attn-backend", "--attn_backend")
    parser.set_defaults(func=run_align)


def run_align(args: argparse.Namespace) -> int:
    from .apps.align import align

    ok = align(
        ckpt=args.ckpt,
        device=args.device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        threshold=args.threshold,
        use_real_images=args.use_real_images,
        image_dir=args.image_dir,
        dtype=args.dtype,
        rtol=args.rtol,
        attn_backend=args.attn_backend,
    )
    return 0 if ok else 1


def add_embed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="folder (searched recursively), list file (.txt, one path a line), glob, WebDataset .tar shard, "
        ".parquet file, or a brace list of them (shards/{000..099}.tar); quote globs and braces",
    )
    _ckpt(parser, required=True)
    parser.add_argument("--out", required=True, help="output folder (shards, manifests, run.json; one run at a time)")
    parser.add_argument("--save", default="cls,mean", help="comma list of cls, mean, patches (default cls,mean)")
    parser.add_argument("--patch-dtype", choices=DTYPE_NAMES, default="float16", help="storage of patch maps")
    parser.add_argument("--policy", choices=POLICIES, default="native", help="resize policy (default native)")
    parser.add_argument("--size", type=_positive_int, default=224, help="square side of the fixed policy")
    parser.add_argument("--min-tokens", type=_positive_int, default=None, help="native policy: scale up below this")
    parser.add_argument("--max-tokens", type=_positive_int, default=1024, help="native policy: scale down above this")
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=MAX_PIXELS,
        help=f"skip files with more pixels, read from the header before decoding (default {MAX_PIXELS:,}: 64 MP, "
        "below Pillow's 89 MP bomb warning)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="decode at full scale and resize float pixels (default: JPEG draft decoding and uint8 resizing for "
        "the native policy; the fixed policy is always exact)",
    )
    parser.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default=DECODE,
        help=f"where JPEGs are decoded: cpu (DataLoader workers), gpu (on the model's CUDA device: its hardware "
        f"JPEG engines where nvImageCodec is installed, the [nvjpeg] extra, else nvJPEG; needs torchvision; "
        f"other files on the CPU), auto (gpu where it can run); default {DECODE}",
    )
    parser.add_argument(
        "--cpu-decode-share",
        type=_share,
        default=None,
        metavar="F",
        help="with --decode gpu: the fraction of JPEGs the workers decode on the CPU instead (picked by a hash of "
        f"each key, the same on every run), to use the cores GPU decoding leaves idle; default {CPU_DECODE_SHARE}",
    )
    parser.add_argument(
        "--image-column",
        default=IMAGE_COLUMN,
        help=f"parquet sources: the column of encoded images (default {IMAGE_COLUMN})",
    )
    parser.add_argument("--batch-tokens", type=_positive_int, default=16384, help="tokens per forward, prefix included")
    parser.add_argument(
        "--oversize",
        choices=OVERSIZE,
        default="own",
        help="an image above --batch-tokens: own (default) runs it alone and says so, error stops the run",
    )
    parser.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default bfloat16 on CUDA, else float32")
    _attn_backend(parser, "--attn-backend")
    parser.add_argument(
        "--no-fused-mlp", action="store_true", help="MLPs as cuBLAS GEMM + GELU instead of the fused Triton kernel"
    )
    parser.add_argument("--no-compile", action="store_true", help="run the model eagerly (default: compiled on CUDA)")
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="launch the blocks' kernels one by one (default on CUDA with the compiled model: the block stack "
        "replays as CUDA graphs, one per padded pack shape)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=None,
        help="decoding processes per rank (default: the cores this process may use, shared by the ranks of the "
        "host, less one)",
    )
    parser.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard")
    parser.add_argument("--limit", type=_non_negative_int, default=None, help="embed at most N of the images to do")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete earlier results in --out first (never another run's)"
    )
    parser.add_argument("--allow-skipped", action="store_true", help="exit 0 even if some files were unreadable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    ckpt = _required_ckpt(args)
    import torch

    from .apps.embed import embed
    from .apps.embed.writer import WriteFailed

    try:
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        summary = embed(
            args.src,
            args.out,
            ckpt,
            save=args.save,
            patch_dtype=dtypes[args.patch_dtype],
            policy=args.policy,
            size=args.size,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            max_pixels=args.max_pixels,
            exact=True if args.exact else None,
            decode=args.decode,
            cpu_decode_share=args.cpu_decode_share,
            image_column=args.image_column,
            batch_tokens=args.batch_tokens,
            oversize=args.oversize,
            device=args.device,
            dtype=dtypes[args.dtype] if args.dtype else None,
            attn_backend=args.attn_backend,
            fused_mlp=False if args.no_fused_mlp else None,
            compile=False if args.no_compile else None,
            cuda_graphs=False if args.no_cuda_graphs else None,
            workers=args.workers,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        # Every shard committed so far is in the manifests; the same command picks up from there.
        print(
            f"interrupted: results so far are kept in {args.out}; run the same command again to resume", file=sys.stderr
        )
        return 130
    except WriteFailed as e:
        # A disk that fills up or turns read-only mid-run: what was committed stays valid and resumable.
        raise ValueError(
            f"out: {e}; the results committed so far are kept: free space or fix the folder, then run the same "
            "command again to resume"
        ) from None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(summary.line(), file=sys.stderr)
        for path, reason in list(summary.skipped.items())[:20]:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if len(summary.skipped) > 20:
            print(f"... and {len(summary.skipped) - 20} more (status 'error' in the manifests)", file=sys.stderr)
    if summary.skipped and not args.allow_skipped:
        if rank0:
            print(f"error: {len(summary.skipped)} files skipped; pass --allow-skipped to accept", file=sys.stderr)
        return 1
    return 0


def add_pca(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files, any sizes")
    _ckpt(parser, required=True)
    parser.add_argument("--out", required=True, help="PNG file to write (its folder must exist)")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument(
        "--min-tokens", type=_positive_int, default=None, help="scale an image up below this many patches"
    )
    parser.add_argument(
        "--max-tokens", type=_positive_int, default=1024, help="scale an image down above this many patches"
    )
    parser.set_defaults(func=run_pca)


def run_pca(args: argparse.Namespace) -> int:
    ckpt = _required_ckpt(args)
    from .apps.pca import save_pca_picture

    picture = save_pca_picture(
        args.images, args.out, ckpt, device=args.device, min_tokens=args.min_tokens, max_tokens=args.max_tokens
    )
    print(f"wrote {args.out} ({picture.width}x{picture.height})")
    return 0


def add_bench(parser: argparse.ArgumentParser) -> None:
    d = Options()
    parser.add_argument("--arch", nargs="+", default=d.archs, help="architectures for the workload sections")
    parser.add_argument("--correctness-archs", nargs="+", default=d.correctness_archs)
    parser.add_argument("--sweep-archs", nargs="+", default=d.sweep_archs, help="architectures of --archs-sweep")
    parser.add_argument(
        "--sections", nargs="+", default=d.sections, choices=SECTIONS, help="sections to run, in the fixed order"
    )
    parser.add_argument("--archs-sweep", action="store_true", help="also run the per-architecture sweep")
    parser.add_argument("--out", default=None, help="JSON results (default: see `apps/bench/options.py`)")
    parser.add_argument(
        "--time-budget", type=float, default=d.time_budget, help="seconds; later parts are skipped past it"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (tests)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile systems")
    parser.add_argument("--no-timm", action="store_true", help="skip timm NaFlexViT")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the random pixels")
    parser.add_argument(
        "--no-fused-mlp",
        action="store_true",
        help="packed models run the MLP as cuBLAS GEMM + GELU instead of the fused Triton kernel",
    )
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .apps.bench.suite import run_benchmark

    sections = list(args.sections)
    if args.archs_sweep and "archs" not in sections:
        sections.append("archs")
    smoke = args.smoke
    opts = Options(
        archs=["vits16"] if smoke else args.arch,
        correctness_archs=["vits16"] if smoke else args.correctness_archs,
        sweep_archs=["vits16"] if smoke else args.sweep_archs,
        sections=sections,
        out=args.out,
        time_budget=args.time_budget,
        smoke=smoke,
        compile=not args.no_compile,
        timm=not args.no_timm,
        seed=args.seed,
        fused_mlp=not args.no_fused_mlp,
    )
    run_benchmark(opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinov3-packing", description="DINOv3 on packed, mixed-resolution input.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = {
        "align": (add_align, "compare the packed model with Hugging Face, image by image"),
        "embed": (add_embed, "image files -> features in safetensors shards, resumable"),
        "pca": (add_pca, "first three principal components of the patch features as RGB"),
        "bench": (add_bench, "throughput, MFU, memory and bf16 parity against the baselines"),
    }
    for name, (add, text) in commands.items():
        command = sub.add_parser(name, help=text)
        add(command)
        flags = {a.dest: a.option_strings[0] for a in command._actions if a.option_strings and a.dest != "help"}
        switches = {a.dest for a in command._actions if a.nargs == 0 and a.const is True}
        command.set_defaults(flags=flags, switches=switches)
    return parser


def _in_flag_terms(message: str, flags: dict[str, str], switches: set[str]) -> str:
    """A library error in command-line words: `batch_tokens: ...` -> `--batch-tokens: ...`, `batch_tokens=100`
    -> `--batch-tokens 100`, `overwrite=True` -> `--overwrite`. Library messages name their arguments in
    these two forms only, so that prose around them is left alone."""
    for dest, flag in flags.items():
        name = rf"(?<![\w./\\-]){re.escape(dest)}"  # not inside a longer name or a path
        if dest in switches:
            message = re.sub(rf"{name}=True\b", flag, message)
        message = re.sub(rf"{name}(?=:)", flag, message)
        message = re.sub(rf"{name}=", f"{flag} ", message)
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        # Bad input is reported as one sentence, not a traceback.
        print(f"error: {_in_flag_terms(str(e), args.flags, args.switches)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
