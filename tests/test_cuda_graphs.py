"""CUDA graphs of the inference block stack (parallel/graphs.py).

On the CPU: the bucket arithmetic; the padding itself, through the real Triton attention kernel under Triton's
CPU interpreter (a subprocess, as in test_triton_attention.py): the real tokens of a padded pack (one segment
of zero tokens, then empty segments) come out of the tiny model's blocks as without padding; when a graph
is taken and the argument errors. On CUDA (the device runs): graph replays against the launched kernels, bf16,
packs of several shapes, no recompilation, and a weight change recording again.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import assert_close
from triton_interpreter import run_interpreted

from dinov3_packing.model.modeling import DINOv3ViTPackingModel
from dinov3_packing.packing import PackedLayout
from dinov3_packing.parallel.graphs import (
    StackGraphs,
    bucket_segments,
    bucket_tokens,
    disable_cuda_graphs,
    enable_cuda_graphs,
    padded_stack_inputs,
)


def test_buckets():
    assert [bucket_tokens(t, 512) for t in (1, 511, 512, 513, 16384)] == [512, 512, 512, 1024, 16384]
    assert bucket_tokens(0, 512) == 512
    # room for the padding segment, at the Triton kernel's search width (at least 64)
    assert [bucket_segments(n) for n in (1, 16, 63, 64, 100)] == [64, 64, 64, 128, 128]


def test_padded_inputs_layout(tiny):
    model = DINOv3ViTPackingModel(tiny_cfg := tiny()).eval()
    layout = PackedLayout.build([(1, 2, 3), (1, 1, 1), (1, 2, 2)], model.num_prefix_tokens, "cpu")
    batch = model.packed_batch(layout)
    x = torch.randn(layout.num_tokens, tiny_cfg.hidden_size)
    p = padded_stack_inputs(x, batch, 64, 8)
    t = layout.num_tokens  # 11 + 6 + 9 = 26
    assert p.x.shape == (64, tiny_cfg.hidden_size) and torch.equal(p.x[:t], x) and not p.x[t:].any()
    assert p.batch.layout.cu_seqlens_host.tolist() == [0, 11, 17, 26, 64, 64, 64, 64, 64]
    assert torch.equal(p.batch.layout.cu_seqlens, p.batch.layout.cu_seqlens_host)
    runs = [[0, 1, 11], [11, 1, 6], [17, 1, 9], [26, 1, 38], [64, 4, 0]]
    assert p.batch.layout.equal_runs_host.view(-1, 3).tolist() == runs
    assert torch.equal(p.batch.cos[t:], torch.ones(64 - t, p.batch.cos.shape[1]))
    assert not p.batch.sin[t:].any()
    assert p.batch.layout.token_segment[t:].eq(3).all()
    with pytest.raises(ValueError, match="do not fit"):
        padded_stack_inputs(x, batch, 16, 8)
    with pytest.raises(ValueError, match="do not fit"):
        padded_stack_inputs(x, batch, 64, 3)


PADDED_STACK = textwrap.dedent(
    """
    import json, sys
    from dataclasses import replace
    import torch
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from dinov3_packing.model.modeling import DINOv3ViTPackingModel
    from dinov3_packing.packing import PackedLayout
    from dinov3_packing.ops.triton import varlen_attention
    from dinov3_packing.parallel.graphs import bucket_segments, bucket_tokens, padded_stack_inputs

    torch.manual_seed(0)
    model = DINOv3ViTPackingModel(tiny_config(num_hidden_layers=3, num_attention_heads=2)).eval()
    # the config the autotuner would pick on a GPU; the interpreter cannot time configs
    config = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    f32, cpu = torch.float32, torch.device("cpu")
    varlen_attention._TUNED[(16, f32, f32, f32, torch.int32, cpu)] = config
    results = []
    for grid in ([(1, 2, 3), (1, 1, 1), (1, 4, 5)], [(1, 7, 9)], [(1, 1, 2)] * 5):
        layout = PackedLayout.build(grid, model.num_prefix_tokens, "cpu")
        batch = replace(model.packed_batch(layout), attention="triton")
        x = torch.randn(layout.num_tokens, model.config.hidden_size)
        with torch.no_grad():
            plain, _ = model.model(x, batch)
            tokens, segments = bucket_tokens(layout.num_tokens, 64), bucket_segments(layout.num_segments)
            p = padded_stack_inputs(x, batch, tokens, segments)
            padded, _ = model.model(p.x, p.batch)
        t = layout.num_tokens
        results.append({
            "tokens": t, "padded": tokens, "segments": segments,
            "plain": plain.tolist(), "real": padded[:t].tolist(), "pad_finite": bool(padded[t:].isfinite().all()),
        })
    print("RESULT" + json.dumps(results))
    """
)


def test_padded_pack_gives_the_real_tokens_unchanged_through_the_triton_kernel():
    pytest.importorskip("triton")
    results = run_interpreted(PADDED_STACK, timeout=300)
    assert len(results) == 3
    for r in results:
        assert r["padded"] > r["tokens"] and r["segments"] == 64
        assert_close(torch.tensor(r["real"]), torch.tensor(r["plain"]), rel_tol=1e-6, min_cos=0.9999999)
        assert r["pad_finite"]


def test_graphs_are_not_taken_on_the_cpu_and_the_forward_is_unchanged(tiny):
    model = DINOv3ViTPackingModel(tiny()).eval()
    rows = torch.randn(6 + 4, model.patch_dim)
    grid = torch.tensor([[1, 2, 3], [1, 2, 2]])
    with torch.no_grad():
        ref = model(rows, grid).last_hidden_state
        graphs = enable_cuda_graphs(model)
        got = model(rows, grid).last_hidden_state
    assert isinstance(graphs, StackGraphs) and model.stack_graphs is graphs
    assert graphs.recorded == 0 and not graphs.graphs
    assert torch.equal(got, ref)
    disable_cuda_graphs(model)
    assert model.stack_graphs is None


def test_the_weights_key_sees_every_kind_of_weight_change(tiny):
    """The graphs are recorded against the stack's weights where they are: `_weights_key` (read every call,
    the modules walked once) changes with an in-place update, a new `.data`, a Parameter assigned or put
    straight into a module's dict, a replaced submodule, and a new fused q/k/v cache; it stays put otherwise."""
    model = DINOv3ViTPackingModel(tiny()).eval()
    graphs = StackGraphs(model)
    stack = model.model
    keys = [graphs._weights_key()]

    def changed() -> bool:
        keys.append(graphs._weights_key())
        return keys[-1] != keys[-2]

    assert not changed()
    up = stack.layer[0].mlp.up_proj
    with torch.no_grad():
        up.weight.mul_(0.5)
    assert changed()
    up.weight.data = up.weight.data.clone()
    assert changed()
    up.weight = torch.nn.Parameter(up.weight.detach().clone())
    assert changed()
    up._parameters["bias"] = torch.nn.Parameter(up.bias.detach().clone())
    assert changed()
    stack.layer[1].mlp.down_proj = torch.nn.Linear(up.out_features, up.in_features)
    assert changed()
    new = stack.layer[1].mlp.down_proj
    new.weight = torch.nn.Parameter(new.weight.detach().clone())  # a tensor of the new submodule is watched too
    assert changed()
    with torch.inference_mode():
        model.packed_batch(PackedLayout.build(torch.tensor([[1, 2, 2]]), model.num_prefix_tokens, "cpu"))
    assert changed()  # the fused q/k/v caches were made
    with torch.inference_mode():
        model.packed_batch(PackedLayout.build(torch.tensor([[1, 2, 2]]), model.num_prefix_tokens, "cpu"))
    assert not changed()  # and kept


def test_enable_cuda_graphs_checks_its_arguments(tiny):
    with pytest.raises(TypeError, match="model: expected a DINOv3ViTPackingModel"):
        enable_cuda_graphs(torch.nn.Linear(2, 2))
    for bad in (0, -512, 1.5, True):
        with pytest.raises(ValueError, match="token_bucket"):
            enable_cuda_graphs(DINOv3ViTPackingModel(tiny()), token_bucket=bad)


def test_embed_refuses_cuda_graphs_off_cuda(tmp_path):
    from dinov3_packing.apps.embed import embed

    (tmp_path / "src").mkdir()
    with pytest.raises(TypeError, match="cuda_graphs: expected True, False or None"):
        embed(tmp_path / "src", tmp_path / "out", "random:vits16", device="cpu", cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_match_the_launched_kernels_on_cuda():
    from dinov3_packing.parallel.compile import compile_model, compile_stats
    from dinov3_packing.weights.load import load_checkpoint

    model = load_checkpoint("random:vits16", "cuda", torch.bfloat16).model
    compile_model(model)
    g = torch.Generator().manual_seed(0)
    packs = []
    for n in (3, 17, 40, 17, 3):  # three shapes, two of them met again
        hw = torch.randint(4, 40, (n, 2), generator=g)
        grid = torch.cat([torch.ones(n, 1, dtype=torch.long), hw], 1)
        rows = torch.randn(int((hw[:, 0] * hw[:, 1]).sum()), model.patch_dim, generator=g).cuda()
        packs.append((rows, grid))
    with torch.inference_mode():
        ref = [model(r, gr).last_hidden_state.float() for r, gr in packs]
        graphs = enable_cuda_graphs(model)
        got = [model(r, gr).last_hidden_state.float() for r, gr in packs]
        before = compile_stats()["unique_graphs"]
        again = [model(r, gr).last_hidden_state.float() for r, gr in packs]
        assert compile_stats()["unique_graphs"] == before  # replays only
        assert 1 <= graphs.recorded <= 5
        for a, b, c in zip(got, again, ref, strict=True):
            assert torch.equal(a, b)
            # bf16 against bf16 with other GEMM shapes (the padding): a bf16 rounding apart, not more
            assert_close(a, c, rel_tol=2e-2, min_cos=0.9999)
        recorded = graphs.recorded
        with torch.no_grad():
            model.model.layer[0].mlp.up_proj.weight.mul_(0.5)  # in place: a new version, the graphs record again
        changed = model(*packs[0]).last_hidden_state.float()
        disable_cuda_graphs(model)
        launched = model(*packs[0]).last_hidden_state.float()
    assert graphs.recorded == recorded + 1
    assert_close(changed, launched, rel_tol=2e-2, min_cos=0.9999)


def _device_work_during_capture(model, errors: list) -> list:
    """Runs 3 pack shapes through `model` with CUDA graphs on while, in the middle of each shape's capture,
    another thread allocates new device memory on a stream of its own (cudaMalloc), synchronizes that
    stream and pins host memory (cudaHostAlloc): what embed's GPU decoding and pin-memory threads do at any
    time. A hook on the first block hands over to that thread while the capture is under way and waits for
    it. Returns the thread's rounds done during captures; its exceptions go to `errors`."""
    import threading

    go, done, stop = threading.Event(), threading.Event(), threading.Event()
    rounds = []

    def other_thread():
        stream = torch.cuda.Stream()
        size = 64 << 20
        while not stop.is_set():
            if not go.wait(timeout=0.05):
                continue
            go.clear()
            try:
                with torch.cuda.stream(stream):
                    size += 1 << 20  # a size the allocator has not cached: a cudaMalloc
                    torch.empty(size, dtype=torch.uint8, device="cuda").fill_(1)
                    stream.synchronize()
                    torch.empty(size >> 8, dtype=torch.uint8).pin_memory()
                rounds.append(size)
            except Exception as e:
                errors.append(e)
            finally:
                done.set()

    def during_capture(module, args):
        if torch.cuda.is_current_stream_capturing():
            done.clear()
            go.set()
            assert done.wait(timeout=30), "the other thread did not answer"

    thread = threading.Thread(target=other_thread, daemon=True)
    thread.start()
    hook = model.model.layer[0].register_forward_pre_hook(during_capture)
    g = torch.Generator().manual_seed(1)
    outs = []
    try:
        with torch.inference_mode():
            graphs = enable_cuda_graphs(model)
            for n in (3, 17, 40):
                hw = torch.randint(4, 40, (n, 2), generator=g)
                grid = torch.cat([torch.ones(n, 1, dtype=torch.long), hw], 1)
                rows = torch.randn(int((hw[:, 0] * hw[:, 1]).sum()), model.patch_dim, generator=g).cuda()
                outs.append((model(rows, grid).last_hidden_state.float(), rows, grid))
            assert graphs.recorded == 3
            hook.remove()
            disable_cuda_graphs(model)
            for got, rows, grid in outs:
                assert_close(got, model(rows, grid).last_hidden_state.float(), rel_tol=2e-2, min_cos=0.9999)
    finally:
        hook.remove()
        stop.set()
        thread.join(timeout=30)
    return rounds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_shape_records_while_another_thread_works_on_the_device():
    """A capture is not broken by another thread's device calls (`graphs.CAPTURE_ERROR_MODE`), and that
    thread's calls succeed; the replays equal the launched kernels (bf16)."""
    from dinov3_packing.weights.load import load_checkpoint

    model = load_checkpoint("random:vits16", "cuda", torch.bfloat16).model
    errors: list = []
    rounds = _device_work_during_capture(model, errors)
    assert not errors
    assert len(rounds) == 3  # the other thread worked during each of the three captures
