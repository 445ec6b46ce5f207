"""Seed alignment script: `python align_dinov3_packing.py --ckpt ... --device ...` (same flags as the seed)."""

import argparse
import sys

from dinov3_packing.align import add_arguments

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        sys.exit(args.func(args))
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
