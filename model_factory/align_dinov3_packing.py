"""Seed alignment script: `python align_dinov3_packing.py --ckpt ... --device ...` (same flags as the seed;
the seed's `--attn_backend` spelling included). It is `dinov3-packing align`."""

import sys

from dinov3_packing.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
