"""Benchmark entry point: `python benchmarks/run.py ARGS` is `dinov3-packing bench ARGS`.

Works from a checkout without installing the package (the repo root is put on the path).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov3_packing.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
