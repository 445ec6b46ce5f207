"""What a benchmark run measures: its sections, architectures and output. Loads without torch (the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_OUT = "benchmarks/results/latest/suite.json"
SMOKE_OUT = "benchmarks/results/smoke.json"
SECTIONS = ("peak", "correctness", "mixed", "uniform", "scaling", "archs")
SWEEP_ARCHS = ("vits16", "vitb16", "vitl16", "vith16plus", "vit7b16")


@dataclass
class Options:
    archs: list[str] = field(default_factory=lambda: ["vitl16"])
    correctness_archs: list[str] = field(default_factory=lambda: ["vits16", "vitl16"])
    sweep_archs: list[str] = field(default_factory=lambda: list(SWEEP_ARCHS))
    sections: list[str] = field(default_factory=lambda: [s for s in SECTIONS if s != "archs"])
    out: str | None = None
    time_budget: float = 420.0
    smoke: bool = False
    compile: bool = True
    timm: bool = True
    seed: int = 0
    fused_mlp: bool = True
