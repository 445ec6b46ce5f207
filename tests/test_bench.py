"""The benchmark suite (`dinov3_packing/apps/bench/`): workload and FLOP definitions, the shared timing and
metadata helper, `--smoke` end to end on the CPU through the CLI (so the GPU suite never rots), the rules
the scripts in `benchmarks/` follow, and the CPU-runnable part of `benchmarks/ab_trees.py`. No speed is
asserted: only that every code path runs and that the reports carry every field the issue asks for."""

from __future__ import annotations

import ast
import json
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_embed import tiny_ckpt  # noqa: F401  (fixture: a saved tiny random model)
from torch import nn

from dinov3_packing.apps.bench.timing import (
    Timing,
    git_state,
    measure,
    read_rows,
    run_metadata,
    source_digest,
    time_calls,
    write_rows,
)
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
    # The command that ran (here pytest's argv) and the checkout's real commit, not a symbolic "HEAD".
    assert meta["command"] == shlex.join([Path(sys.executable).name, *sys.argv])
    assert meta["git_commit"] == git("rev-parse", "HEAD").strip()
    assert meta["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no").strip())
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


# ---------------------------------------------------------------------------------------------------------
# The shared helper (apps/bench/timing.py)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout  # noqa: S607


def test_run_metadata_is_the_checkouts_commit_and_dirty_flag():
    meta = run_metadata("cpu")
    assert meta["git_commit"] == git("rev-parse", "HEAD").strip() and len(meta["git_commit"]) == 40
    assert meta["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no").strip())
    assert meta["source_sha256"] == source_digest(ROOT / "dinov3_packing")
    assert meta["device"] == "cpu" and meta["card"] and meta["torch"] == torch.__version__


def test_git_state_follows_commits_and_edits(tmp_path):
    """A repository of its own: clean after a commit, dirty after an edit of a tracked file (not after a new
    untracked one, such as a results file), no commit outside any repository."""
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    git("init", "-q", cwd=repo)
    git("add", "pkg", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    assert git_state(repo / "pkg") == {"git_commit": head, "git_dirty": False}
    (repo / "results.json").write_text("{}")
    assert git_state(repo / "pkg")["git_dirty"] is False
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert git_state(repo / "pkg") == {"git_commit": head, "git_dirty": True}
    first = source_digest(repo / "pkg")
    (repo / "pkg" / "a.py").write_text("x = 3\n")
    assert source_digest(repo / "pkg") != first


def test_cpu_timing_measures_each_call():
    times = time_calls(lambda: time.sleep(0.01), 3, "cpu")
    assert len(times) == 3 and all(0.01 <= t < 1.0 for t in times)
    m = measure(lambda: time.sleep(0.005), "cpu", Timing(target_s=0.02, min_repeats=2, max_repeats=3))
    assert 2 <= m["repeats"] <= 3 and len(m["times_s"]) == m["repeats"]
    assert m["min_s"] <= m["median_s"] and m["min_s"] >= 0.005
    assert m["peak_alloc_gib"] is None and m["fwd_mem_gib"] is None  # no device memory on the CPU
    with pytest.raises(ValueError, match="n: expected at least one call"):
        time_calls(lambda: None, 0, "cpu")


def test_rows_are_appended_json_lines(tmp_path, capsys):
    out = tmp_path / "sub" / "rows.jsonl"
    write_rows(out, [{"a": 1}])
    write_rows(out, [{"b": [1.5, None]}, {"c": "x"}], echo=False)
    assert read_rows(out) == [{"a": 1}, {"b": [1.5, None]}, {"c": "x"}]
    assert capsys.readouterr().out == '{"a": 1}\n'


# ---------------------------------------------------------------------------------------------------------
# The scripts in benchmarks/

LIVE = sorted(p for p in (ROOT / "benchmarks").glob("*.py"))
NO_TIMING = {"run.py", "plot.py", "fa4_ex2.py"}  # the suite's entry point (the suite uses the helper), the plot, and
# fa4_gpu_check.py's experiment module (it times nothing: the fa4-ex2 part does)


def package_imports(path: Path) -> list[tuple[str, str]]:
    """`(module, name)` of every `from dinov3_packing... import name` in a script."""
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinov3_packing")
        for alias in node.names
    ]


@pytest.mark.parametrize("script", LIVE, ids=lambda p: p.name)
def test_live_scripts_use_the_shared_helper_and_no_private_names(script):
    imports = package_imports(script)
    private = [f"{m}.{n}" for m, n in imports if n.startswith("_")]
    assert not private, f"{script.name} imports private names {private}"
    modules = {m for m, _ in imports} | {f"{m}.{n}" for m, n in imports}
    tree = ast.parse(script.read_text())
    aliased = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinov3_packing")
        for a in node.names
    }
    reached = [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliased
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]
    assert not reached, f"{script.name} reaches into private names {reached}"
    if script.name not in NO_TIMING and script.name != "ab_trees.py":
        assert "dinov3_packing.apps.bench.timing" in modules, f"{script.name} does not use apps.bench.timing"


def test_ab_trees_loads_this_checkouts_helper():
    ab = runpy.run_path(str(ROOT / "benchmarks" / "ab_trees.py"))
    assert ab["TIMING_PY"] == ROOT / "dinov3_packing" / "apps" / "bench" / "timing.py"
    timing = ab["load_timing"]()
    assert timing.run_metadata("cpu", ROOT / "dinov3_packing")["git_commit"] == git("rev-parse", "HEAD").strip()


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks" / "archive").glob("*.py")), ids=lambda p: p.name)
def test_archived_scripts_say_they_are_archived_and_where_their_results_are(script):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert "Archived study, not maintained" in doc
    results = ROOT / "benchmarks" / "results"
    folders = [w.strip(",.()") for w in doc.split() if "archive/2026-" in w]
    assert folders, script.name
    for folder in folders:
        name = folder.removeprefix("benchmarks/results/").split("/")[1]
        assert (results / "archive" / name).is_dir(), (script.name, folder)
    assert script.name.removesuffix(".py") in (results / "RESULTS.md").read_text()


def test_results_index_names_every_results_file():
    """Every file under benchmarks/results/ is named in RESULTS.md's index: by path in latest/, in its
    folder's row in archive/."""
    results = ROOT / "benchmarks" / "results"
    index = (results / "RESULTS.md").read_text()
    files = [p for p in results.rglob("*") if p.is_file() and p.name not in ("RESULTS.md", "smoke.json", "smoke.md")]
    assert len(files) > 50
    for p in files:
        rel = p.relative_to(results)
        if rel.parts[0] == "latest":
            assert f"`{rel}`" in index or f"`{rel.with_suffix('')}." in index, rel
        else:
            assert rel.parts[0] == "archive", rel
            (row,) = [line for line in index.splitlines() if line.startswith(f"| `archive/{rel.parts[1]}/` |")]
            assert f"`{p.name}`" in row, rel


# ---------------------------------------------------------------------------------------------------------
# benchmarks/ab_trees.py: argument checks, interleaving, rows (CPU)


@pytest.fixture(scope="module")
def ab():
    return runpy.run_path(str(ROOT / "benchmarks" / "ab_trees.py"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--drive", "--out", "x.jsonl"], "--tree: expected at least one checkout"),
        (["--drive", "--tree", ".", "--tree", ".", "--label", "a", "--out", "x"], "--label: expected one per --tree"),
        (["--drive", "--tree", ".", "--tree", ".", "--label", "a", "--label", "a", "--out", "x"], "distinct labels"),
        (["--drive", "--tree", "tests", "--label", "a", "--out", "x"], "--tree: tests is not a checkout"),
        (["--drive", "--tree", ".", "--label", "a", "--rounds", "0", "--out", "x"], "--rounds: expected at least 1"),
        (["--tree", ".", "--label", "a", "--out", "x"], "--inputs: one round needs"),
        (["--tree", ".", "--tree", ".", "--label", "a", "--label", "b", "--out", "x"], "exactly one of each"),
    ],
)
def test_ab_trees_bad_arguments_are_one_line(ab, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert ab["main"](argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_ab_trees_interleaves_rounds(ab):
    assert ab["interleaved"](["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]


def test_ab_trees_imports_a_tree_of_the_old_layout(tmp_path):
    """A tree from before the reorganisation has `parallel.py` as a module and `compile.py` beside it: the
    lookup of `dinov3_packing.parallel.compile` must not stop the round (it raised ModuleNotFoundError on the
    H200 and the before/after run lost its first call)."""
    package = tmp_path / "old" / "dinov3_packing"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "parallel.py").write_text("def apply_fsdp(model):\n    return model\n")
    (package / "compile.py").write_text("def compile_model(model):\n    return ('old', model)\n")
    code = (
        "import runpy, sys; from pathlib import Path; "
        f"ab = runpy.run_path({str(ROOT / 'benchmarks' / 'ab_trees.py')!r}); "
        f"package, compile_model = ab['import_tree'](Path({str(package.parent)!r})); "
        "print(package.__file__, compile_model(1))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(package / "__init__.py"), "('old',", "1)"]


@pytest.mark.slow
def test_ab_trees_drive_smoke(ab, tmp_path):
    """Two trees (this checkout and a copy of its package outside git), two rounds, as subprocesses on the
    CPU: rows in A B A B order, each carrying its tree's commit, the fp32 cosine against HF, a summary."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "dinov3_packing", copy / "dinov3_packing", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "ab.jsonl"
    before = git("rev-parse", "HEAD").strip()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ab_trees.py"), "--drive", "--smoke", "--rounds", "2"]
    cmd += ["--tree", str(ROOT), "--label", "new", "--tree", str(copy), "--label", "copy", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    timed = [r for r in rows if "median_ms" in r and r.get("kind") != "summary"]
    order = [(r["round"], r["label"]) for r in timed if r["workload"] == "mixed-64"]
    assert order == [(0, "new"), (0, "copy"), (1, "new"), (1, "copy")]
    # The checkout is shared: a commit may land while the rounds run, and the rows then name it.
    heads = {before, *git("rev-list", f"{before}..HEAD").split()}
    for r in timed:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == r["repeats"]
        assert r["images"] == {"mixed-64": 4, "uniform-64x224": 2}[r["workload"]]  # the smoke inputs
        if r["label"] == "new":  # its sources may change under the run too: only the copy's digest is fixed
            assert r["git_commit"] in heads and r["tree"] == str(ROOT) and len(r["source_sha256"]) == 64
        else:
            assert r["git_commit"] is None and r["git_dirty"] is None and r["tree"] == str(copy)
            assert r["source_sha256"] == source_digest(copy / "dinov3_packing")
    cosines = {r["label"]: r["min_cos"] for r in rows if r.get("kind") == "cosine"}
    # fp32 packed against fp32 HF: the parity bar (1e-5 relative); each tree's reference once.
    assert set(cosines) == {"new", "copy"} and min(cosines.values()) > 0.99999
    summary = [r for r in rows if r.get("kind") == "summary"]
    assert {(s["label"], s["workload"]) for s in summary} == {
        (t, w) for t in ("new", "copy") for w in ("mixed-64", "uniform-64x224")
    }
    for s in summary:
        mine = [r["median_ms"] for r in timed if (r["label"], r["workload"]) == (s["label"], s["workload"])]
        assert s["rounds"] == 2 and s["round_medians_ms"] == mine
    assert "vs first" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# benchmarks/embed_throughput.py on the CPU (it broke once unnoticed: it patched a name `embed` had dropped)


@pytest.mark.slow
def test_embed_throughput_smoke_runs_every_combination(tmp_path, tiny_ckpt):  # noqa: F811
    """Two sets (loose files and tar shards) in one process, as on the GPU: every combination writes its
    JSON, with all three rates measured on the same images and a bound `embed` can report. The model is a
    tiny saved checkpoint: the script's paths do not depend on its size, and random:vits16 made this the
    suite's slowest test (25 s against 7 s on the 2-core runner, most of it the model passes it times)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "embed_throughput.py"), "--set", "small,shards", "--n", "100"]
    cmd += ["--data", str(tmp_path / "sets"), "--ckpt", tiny_ckpt, "--device", "cpu", "--max-tokens", "64"]
    cmd += ["--batch-tokens", "256", "--workers", "1", "--json", str(tmp_path / "out" / "e.json")]
    cmd += ["--decode-chunk", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("small", "shards"):
        report = json.loads((tmp_path / "out" / f"e_{name}_cpu.json").read_text())
        assert report["set"] == name and report["n"] == 100 and report["decode"] == "cpu"
        assert report["decode_chunk"] == 4 and report["pin_thread"] is True
        # the first packs are left out, and with them twice the loader's queue (1 worker x 4 chunks x 4)
        assert 0 < report["timed_images"] <= 100 - 32
        host = report["host"]
        assert host["stall_s"] >= 0 and host["compiled_at_pack"] == [] and len(host["longest_packs"]) == 5
        assert all(report["images_per_s"][stage] > 0 for stage in ("decode", "model", "embed", "embed_last_half"))
        assert 0 <= report["device_wait"] <= 1
        assert report["bound"] in ("decode", "model", "write", "host")
        assert report["meta"]["card"] and len(report["meta"]["source_sha256"]) == 64


def test_the_pin_thread_switch_reaches_the_loader(monkeypatch):
    """`job.PIN_THREAD` (`embed_throughput.py --pin-thread`) decides whether the CUDA loader pins chunks in
    its thread; on the CPU nothing is pinned either way. (Building the loader touches no device.)"""
    from dinov3_packing.apps.embed import job
    from dinov3_packing.data.preprocess import Preprocessor

    pre = Preprocessor(max_tokens=64)
    assert job.PIN_THREAD is True
    assert job.decode_loader([], pre, torch.device("cuda"), 0, gpu=False).pin_memory is True
    assert job.decode_loader([], pre, torch.device("cpu"), 0, gpu=False).pin_memory is False
    monkeypatch.setattr(job, "PIN_THREAD", False)
    assert job.decode_loader([], pre, torch.device("cuda"), 0, gpu=False).pin_memory is False


def test_embed_is_timed_after_the_warm_packs_and_twice_the_loaders_queue():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from embed_throughput import WARM_PACKS, first_timed_pack
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from dinov3_packing.apps.embed import job

    queue = 2 * job.prefetch_chunks() * job.DECODE_CHUNK  # two workers
    packs = [torch.ones(10, 3, dtype=torch.long)] * 40  # ten images each
    first = first_timed_pack(packs, workers=2)
    assert first >= WARM_PACKS and 10 * first >= 2 * queue and 10 * (first - 1) < 2 * queue
    big = [torch.ones(500, 3, dtype=torch.long)] * 5  # the queue is passed at once: the warm packs still count
    assert first_timed_pack(big, workers=2) == WARM_PACKS
    assert first_timed_pack(packs[:3], workers=2) == 3  # too few: nothing left to time


def test_device_gaps_finds_the_idle_stretches_and_the_host_calls_in_them():
    """`timing.device_gaps` on a trace's events: overlapping kernels merge, gaps under the threshold are
    not counted, each gap names the work around it and the runtime calls that overlap it."""
    from dinov3_packing.apps.bench.timing import device_gaps

    def ev(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        ev("kernel", "a", 0, 100),
        ev("kernel", "b", 50, 100),  # overlaps a: busy 0-150
        ev("gpu_memcpy", "copy", 160, 40),  # a 10 us gap: under the threshold
        ev("kernel", "c", 700, 100),  # a 500 us gap after the copy
        ev("kernel", "d", 830, 20),  # 30 us
        ev("cuda_runtime", "cudaHostAlloc", 300, 300),
        ev("cuda_runtime", "cudaLaunchKernel", 690, 5),
        ev("cuda_runtime", "cudaLaunchKernel", 900, 5),  # after the last gap: in none
        ev("cpu_op", "aten::mm", 0, 900),
        ev("cpu_op", "aten::pin_memory", 250, 400),  # inside aten::mm, around the first gap's middle (450)
        ev("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 810, 60),  # the backward from here on
        ev("cpu_op", "aten::mm", 812, 40),  # innermost at the second gap's middle (815)
        {"ph": "M", "name": "thread_name"},
    ]
    g = device_gaps(events, min_gap_us=20)
    assert g["span_us"] == 850 and g["busy_us"] == 150 + 40 + 100 + 20 and g["idle_us"] == 850 - 310
    assert g["gaps"] == 2 and g["idle_in_gaps_us"] == 530
    first, second = g["largest"]
    assert (first["gap_us"], first["before"], first["after"]) == (500, "copy", "c")
    assert first["host_calls"] == ["cudaHostAlloc", "cudaLaunchKernel"]
    assert (second["gap_us"], second["before"], second["after"], second["host_calls"]) == (30, "c", "d", [])
    assert (first["host_op"], second["host_op"]) == ("aten::pin_memory", "aten::mm")
    assert g["idle_by_phase_us"] == {"forward": 500, "backward": 30}
    assert g["idle_by_host_op_us"] == [["aten::pin_memory", 500], ["aten::mm", 30]]
    assert device_gaps([ev("cpu_op", "x", 0, 5)])["gaps"] == 0


def test_loader_receive_smoke(tmp_path):
    """benchmarks/loader_receive.py on the CPU: a row per chunk size, every image received each pass."""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "loader_receive.py"), "--chunks", "4,8", "--n", "24"]
    subprocess.run([*cmd, "--workers", "1", "--rounds", "1", "--out", str(out)], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["part"] == "meta"
    receive = [r for r in rows if r["part"] == "receive"]
    assert [r["chunk"] for r in receive] == [4, 8] and all(r["images"] == 24 for r in receive)
    assert all(r["main_cpu_ms_per_image_median"] > 0 for r in receive)
    bad = subprocess.run([*cmd[:2], "--chunks", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--chunks: expected comma-separated positive ints" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
# benchmarks/fa4_gpu_check.py: pinning quack's tiles from a quack-tiles run (CPU)


def test_fa4_gpu_check_pins_quack_tiles_from_a_tiles_file(tmp_path, monkeypatch):
    """`--pin-quack-tiles FILE` sets `ops.quack.TILES` from what the quack-tiles part wrote, and refuses a file
    that names another GEMM or an incomplete tile with a ValueError naming the option."""
    from dinov3_packing.ops import quack

    script = runpy.run_path(str(ROOT / "benchmarks" / "fa4_gpu_check.py"))
    monkeypatch.setattr(quack, "TILES", {k: dict(v) for k, v in quack.TILES.items()})
    tile = {"tile_m": 128, "tile_n": 192, "pingpong": True, "cluster_m": 1, "cluster_n": 2}
    other = {"tile_m": 256, "tile_n": 128, "pingpong": False, "cluster_m": 1, "cluster_n": 2}
    good = tmp_path / "tiles.json"
    good.write_text(json.dumps({"dact": tile}))
    before_act = dict(quack.TILES["act"])
    assert script["pin_quack_tiles"](str(good)) == {"dact": tile}
    assert quack.TILES["dact"] == tile and quack.TILES["act"] == before_act
    pinned = {k: dict(v) for k, v in quack.TILES.items()}
    wrong_type = dict(tile, tile_m="128")
    for bad in ({"gemm": tile}, {"dact": other, "act": {"tile_m": 128}}, {"act": [128, 128]}, {"act": wrong_type}, {}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="--pin-quack-tiles"):
            script["pin_quack_tiles"](str(path))
        assert quack.TILES == pinned  # nothing set from a file it refuses


def test_fa4_gpu_check_pins_the_rope_sums_launch_from_a_file(tmp_path, monkeypatch):
    """`--pin-rope-sums FILE` sets `ops.triton.rope.SUMS_LAUNCH` from what `rope_gpu_check.py --adopted-file` wrote,
    and refuses another shape of file with a ValueError naming it, leaving the launch as it was."""
    from dinov3_packing.ops.triton import rope

    script = runpy.run_path(str(ROOT / "benchmarks" / "fa4_gpu_check.py"))
    monkeypatch.setattr(rope, "SUMS_LAUNCH", dict(rope.SUMS_LAUNCH))
    launch = {"kernel": "heads", "block": 32, "num_warps": 4, "iters": 8}
    good = tmp_path / "sums.json"
    good.write_text(json.dumps(launch))
    assert script["pin_rope_sums"](str(good)) == launch and rope.SUMS_LAUNCH == launch
    other_kernel = {"kernel": "cols", "block": 32, "num_warps": 4, "iters": 8}
    not_powers = (dict(launch, block=True), dict(launch, block=48))
    for bad in (other_kernel, {"kernel": "rows"}, [1], dict(launch, iters=0), *not_powers):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"bad\.json"):
            script["pin_rope_sums"](str(path))
        assert rope.SUMS_LAUNCH == launch


def test_fa4_gpu_check_dense_systems_attend_within_each_image():
    """The `dense` part's SDPA systems (run here on the CPU in fp32, no backend pinned) attend within each image of a
    pack of equal segments, as softmax(q k^T / sqrt(d)) v computed segment by segment; a pack of mixed lengths is
    refused before anything runs."""
    script = runpy.run_path(str(ROOT / "benchmarks" / "fa4_gpu_check.py"))
    n = 5 + 37
    layout = script["layout_of"]([n] * 3, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.num_tokens, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    systems = script["_dense_systems"](q, k, v, layout)
    assert set(systems) >= {"sdpa cudnn", "fa4 dense (flash_attn_func)", "triton varlen (today's path)"}
    want = torch.cat(
        [
            torch.einsum("hij,jhd->ihd", torch.softmax(torch.einsum("ihd,jhd->hij", qs, ks) / 4, dim=-1), vs)
            for qs, ks, vs in zip(q.split(n), k.split(n), v.split(n), strict=True)
        ]
    )
    for name in ("sdpa (its own choice: the sdpa backend)", "sdpa efficient"):
        torch.testing.assert_close(systems[name][1](), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="layout: expected segments of one length"):
        script["_dense_systems"](q[:80], k[:80], v[:80], script["layout_of"]([42, 38], "cpu"))
