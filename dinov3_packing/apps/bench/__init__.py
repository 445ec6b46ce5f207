"""The benchmark suite (`dinov3-packing bench`): `options` (what a run measures), `suite` (workloads, systems,
timing, the report)."""
