"""The benchmark suite (`dinov3-packing bench`): `options` (what a run measures; torch-free, the CLI reads it),
`workloads` (image sizes, FLOPs, inputs), `systems` (packed, Hugging Face, timm), `timing` (timing, run
metadata and JSON rows, shared by every script in `benchmarks/`) and `suite` (the run and its report)."""
