"""`dinov3-packing` command line: each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys

from . import align, bench, embed, pca


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov3-packing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    align.add_arguments(sub.add_parser("align", help="compare the packed model with Hugging Face, image by image"))
    embed.add_arguments(sub.add_parser("embed", help="image files -> features in safetensors shards, resumable"))
    pca.add_arguments(sub.add_parser("pca", help="first three principal components of the patch features as RGB"))
    bench.add_arguments(sub.add_parser("bench", help="throughput, MFU, memory and bf16 parity against the baselines"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        # Bad input is reported as one sentence, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
