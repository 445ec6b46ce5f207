"""Plot a benchmark JSON: throughput and forward memory against tokens per pack (the scaling section).

python benchmarks/plot.py benchmarks/results/h100.json [--out benchmarks/results/throughput_vs_tokens.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PNG = "throughput_vs_tokens.png"
STYLE = {  # system -> (colour, marker)
    "packed-compiled": ("tab:red", "o"),
    "packed": ("tab:orange", "s"),
    "hf-loop": ("tab:blue", "^"),
    "timm-naflex": ("tab:green", "D"),
}


def plot(results_json: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG for `results_json` (default: beside it, named throughput_vs_tokens.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(Path(results_json).read_text())
    rows = [r for r in report["results"] if r["section"] == "scaling" and "error" not in r]
    if not rows:
        raise ValueError(f"results_json: {results_json} has no scaling rows to plot")
    meta = report["meta"]
    out = Path(out) if out else Path(results_json).with_name(DEFAULT_PNG)
    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in sorted({r["system"] for r in rows}, key=lambda s: list(STYLE).index(s) if s in STYLE else 99):
        pts = sorted((r["tokens"], r) for r in rows if r["system"] == system)
        colour, marker = STYLE.get(system, (None, "x"))
        tokens = [t for t, _ in pts]
        ax_tp.plot(tokens, [r["tokens_per_s"] / 1e3 for _, r in pts], marker=marker, color=colour, label=system)
        mem = [(t, r["fwd_mem_gib"]) for t, r in pts if r.get("fwd_mem_gib") is not None]
        if mem:
            ax_mem.plot(*zip(*mem, strict=True), marker=marker, color=colour, label=system)
    arch = rows[0]["arch"]
    ax_tp.set(xscale="log", xlabel="tokens per pack", ylabel="throughput (k tokens/s)", title="forward throughput")
    ax_mem.set(xscale="log", yscale="log", xlabel="tokens per pack", ylabel="forward memory (GiB)",
               title="peak memory above resident weights")  # fmt: skip
    for ax in (ax_tp, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    if not ax_mem.lines:
        ax_mem.text(0.5, 0.5, f"no GPU memory figures ({meta['device']})", ha="center", transform=ax_mem.transAxes)
    fig.suptitle(f"DINOv3 {arch}, {meta['dtype']}, {meta['card']} (torch {meta['torch']}, {meta['date'][:10]})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_json", help="JSON written by `dinov3-packing bench`")
    parser.add_argument("--out", default=None, help=f"PNG path (default: {DEFAULT_PNG} beside the JSON)")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.results_json, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
