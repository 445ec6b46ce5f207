"""The benchmark suite (`dinov3_packing/bench.py`): workload and FLOP definitions, and `--smoke` end to end
on the CPU through the CLI, so the GPU suite never rots. No timing is asserted: only that every code path
runs and that the report carries every field the issue asks for."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dinov3_packing.apps.bench.workloads import Workload, matmul_params, mixed_sizes, pack_of_tokens
from dinov3_packing.cli import main
from dinov3_packing.model.archs import arch_config
from dinov3_packing.model.modeling import DINOv3ViTPackingModel

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"images_per_s", "tokens_per_s", "tflops", "mfu", "median_s", "repeats", "tflop", "tokens", "ratios"}


def test_mixed64_is_the_issues_workload():
    """Issue 3: 64 images, 224..768 px, 60,038 tokens with 5 prefix tokens each, 43.3 TFLOP on ViT-L/16."""
    wl = Workload("mixed-64", tuple(mixed_sizes(64)))
    assert all(224 <= s <= 768 and s % 16 == 0 for size in wl.sizes for s in size)
    d = wl.describe(arch_config("vitl16"))
    assert (d["images"], d["tokens"]) == (64, 60038)
    assert round(d["tflop"], 1) == 43.3


@pytest.mark.parametrize("gated", [False, True])
def test_flop_params_are_the_linear_weights(tiny, gated):
    """N_block counts exactly the Linear weights of the blocks, N_patch the patch embedding."""
    config = tiny(use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    model = DINOv3ViTPackingModel(config)
    linear = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(config) == (linear, model.embeddings.patch_embeddings.weight.numel())


def test_scaling_packs_are_the_longest_prefix_within_target():
    config = arch_config("vitl16")
    stream = mixed_sizes(200)
    for target in (4096, 131072):
        wl = pack_of_tokens(target, config)
        n = len(wl.sizes)
        assert list(wl.sizes) == stream[:n]
        assert wl.tokens(config) <= target < Workload("next", tuple(stream[: n + 1])).tokens(config)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    assert main(["bench", "--smoke", "--archs-sweep", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_smoke_meta_and_peak(smoke):
    _, report = smoke
    meta = report["meta"]
    assert meta["smoke"] is True and meta["device"] == "cpu" and meta["dtype"] == "float32"
    for key in ("card", "torch", "transformers", "command", "date", "elapsed_s"):
        assert meta[key], key
    assert "bench" in meta["command"] or "pytest" in meta["command"]
    assert report["peak"]["tflops"] > 0
    assert report["workload_definitions"]["mixed-64"]["tokens"] == 60038
    assert "N_block" in report["flops_definition"]


def test_smoke_correctness(smoke):
    """fp32 packed against fp32 Hugging Face (both on CPU): within the parity tests' 1e-5 relative bound."""
    (row,) = smoke[1]["correctness"]
    assert row["pass"] and row["threshold"] == 0.999  # the suite's bar, for bf16 on the GPU
    # Here the "packed" run is fp32 too, so the fp32 parity bar applies to it.
    assert row["packed_min_cos"] >= 0.99999 and row["packed_cls_min_cos"] >= 0.99999
    assert row["fp32_max_rel"] < 1e-5


def test_smoke_results_cover_every_section_and_system(smoke):
    _, report = smoke
    rows = report["results"]
    assert not [r for r in rows if "error" in r]
    systems = {(r["section"], r["system"]) for r in rows}
    expected_timm = {"timm-naflex"} if report["meta"]["timm"] else set()
    assert {s for sec, s in systems if sec == "mixed"} == {"packed", "hf-loop"} | expected_timm
    assert {s for sec, s in systems if sec == "uniform"} == {"packed", "hf-batched"} | expected_timm
    assert {s for sec, s in systems if sec == "scaling"} == {"packed", "hf-loop"} | expected_timm
    assert {s for sec, s in systems if sec == "archs"} == {"packed"}
    assert len({r["workload"] for r in rows if r["section"] == "scaling"}) >= 2
    for r in rows:
        assert ROW_FIELDS - {"ratios"} <= r.keys(), r
        assert r["tflops"] == pytest.approx(r["tflop"] / r["median_s"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_s"])
        assert r["mfu"] == pytest.approx(r["tflops"] / report["peak"]["tflops"])
    mixed = {r["system"]: r for r in rows if r["section"] == "mixed"}
    assert mixed["hf-loop"]["ratios"]["hf-loop"] == pytest.approx(1.0)
    assert mixed["packed"]["ratios"]["hf-loop"] == pytest.approx(
        mixed["packed"]["images_per_s"] / mixed["hf-loop"]["images_per_s"]
    )
    # Compiled systems are skipped on the CPU, and the report says so.
    assert any("compiled systems skipped" in n for n in report["notes"])


def test_smoke_markdown_table_and_plot(smoke):
    out, _ = smoke
    table = out.with_suffix(".md").read_text()
    assert "| arch | workload | images | tokens | system | ms | img/s | tok/s | TFLOP/s | MFU | fwd mem GiB |" in table
    for section in ("Correctness", "## mixed", "## uniform", "## scaling", "## archs"):
        assert section in table
    plot = runpy.run_path(str(ROOT / "benchmarks" / "plot.py"))
    png = plot["plot"](out)
    assert png.name == "throughput_vs_tokens.png" and png.stat().st_size > 10_000


def test_run_py_is_the_bench_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmarks/run.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "benchmarks" / "run.py"), run_name="__main__")
    assert e.value.code == 0
    assert "--archs-sweep" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="would start the full GPU suite")
def test_full_suite_without_cuda_is_one_sentence(capsys):
    assert main(["bench", "--out", "unused.json"]) == 2
    assert "use --smoke" in capsys.readouterr().err


def test_smoke_packed_rows_record_the_fused_mlp_default(smoke):
    """ViT-S has a plain GELU MLP, so the bench's packed models run with `fused_mlp` on (the model default)."""
    _, report = smoke
    packed = [r for r in report["results"] if r["system"] == "packed"]
    assert packed and all(r["fused_mlp"] is True for r in packed)
    assert report["meta"]["options"]["fused_mlp"] is True
