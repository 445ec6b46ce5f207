"""flash-attn-4's dQ accumulator converted with RoPE's inverse (ops/triton/fa4_dq.py).

The accumulator is built here from a known dq by the hardware's description, not by the module's formula: thread
`t` of warpgroup `w` keeps the WGMMA m64nNk16 D-fragment registers `r` (PTX ISA: row `16 warp + lane // 4 + 8
((r % 4) // 2)`, column `8 (r // 4) + 2 (lane % 4) + r % 2` of its warpgroup's 64 rows), and flash-attn-4's SM90
postprocess reads register `r = 4 k + v` of thread `t` from float `4096 w + 512 k + 4 t + v` of the tile (16 bytes
per thread per copy). Every other float of the accumulator (padding rows, the rows of tiles past a segment's end)
is NaN, so a value read from the wrong place shows. The softmax scale of head_dim 64, 1/8, is a power of two:
without the rotation the conversion is exact in fp32. On the device, `tests/test_fa4.py` compares the conversion
with flash-attn-4's own postprocess bit for bit.

The kernel runs under Triton's CPU interpreter in a subprocess (`triton_interpreter.run_interpreted`). Tolerances
as in tests/test_rope_kernel.py: fp32 within 1e-6 of max |ref| (two products and a sum, rounded once), bf16 each
element within one bf16 ulp (the interpreter truncates where a GPU rounds to nearest).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import threading
import types

import pytest
import torch
from triton_interpreter import run_interpreted

from dinov3_packing.ops.triton import fa4_dq
from dinov3_packing.ops.triton.rope import rope_reference

SEGMENTS = [5, 130, 128, 257, 1, 64]  # lengths: under, over and at the 128-row tile, several tiles, one row
MANY = [3] * 37 + [300] + [1] * 5 + [129, 2]  # 45 segments: many one-tile ones around a three-tile one


def build_accum(dq: torch.Tensor, cu: list[int], scale: float) -> torch.Tensor:
    """flash-attn-4's fp32 accumulator holding `dq / scale` (module docstring of this file), NaN elsewhere."""
    tokens, heads, d = dq.shape
    segments = len(cu) - 1
    rows = fa4_dq.padded_rows(tokens, segments)
    accum = torch.full((heads, rows * d), float("nan"), dtype=torch.float32)
    w, warp, lane, r = torch.meshgrid(
        torch.arange(2), torch.arange(4), torch.arange(32), torch.arange(32), indexing="ij"
    )
    tile_row = 64 * w + 16 * warp + lane // 4 + 8 * ((r % 4) // 2)
    tile_col = 8 * (r // 4) + 2 * (lane % 4) + r % 2
    t = 32 * warp + lane
    flat = 4096 * w + 512 * (r // 4) + 4 * t + r % 4
    for b in range(segments):
        start, length = cu[b], cu[b + 1] - cu[b]
        first = (start + 128 * b) // 128 * 128
        for m in range((length + 127) // 128):
            keep = m * 128 + tile_row < length
            tok = start + m * 128 + tile_row[keep]
            pos = (first + m * 128) * d + flat[keep]
            accum[:, pos] = (dq[tok, :, tile_col[keep]] / scale).T.float()
    return accum


def test_hardware_layout_is_the_modules_formula():
    """`accum_index` (the module's formula, which the kernel repeats) finds every value where the hardware's
    description put it; the accumulator's other floats are NaN and never read."""
    cu = torch.tensor([0, *SEGMENTS]).cumsum(0).to(torch.int32)
    tokens, heads = int(cu[-1]), 3
    dq = torch.randn(tokens, heads, 64, generator=torch.Generator().manual_seed(0))
    accum = build_accum(dq, cu.tolist(), 0.125)
    index = fa4_dq.accum_index(cu, heads)
    assert index.shape == (tokens, heads, 64) and index.unique().numel() == index.numel()
    assert torch.equal(accum.view(-1)[index] * 0.125, dq)
    assert int(accum.isnan().logical_not().sum()) == dq.numel()


def test_torch_path_converts_rotates_and_sums():
    """Without the kernel: the conversion is exact, the rotation is rope_reference's inverse of it, the sums its
    column sums."""
    cu = torch.tensor([0, *SEGMENTS]).cumsum(0).to(torch.int32)
    tokens, heads = int(cu[-1]), 2
    gen = torch.Generator().manual_seed(1)
    dq = torch.randn(tokens, heads, 64, generator=gen)
    accum = build_accum(dq, cu.tolist(), 0.125)
    out = torch.empty(tokens, 3, heads, 64)[:, 0]
    fa4_dq.dq_rope_from_accum(accum, out, cu, 0.125, use_kernel=False)
    assert torch.equal(out, dq)
    angles = torch.rand(tokens, 32, generator=gen).mul(6.3).repeat(1, 2)
    sin = angles.sin()
    cos, sin = angles.cos(), torch.cat([-sin[:, :32], sin[:, 32:]], dim=1)
    sums = torch.full((heads, 64), float("nan"))
    fa4_dq.dq_rope_from_accum(accum, out, cu, 0.125, cos, sin, sums, use_kernel=False)
    ref = rope_reference(dq.double(), cos.double(), sin.double(), inverse=True)
    assert (out.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert (sums.double() - ref.sum(0)).abs().max() <= 1e-5 * ref.abs().sum(0).max()


CASES = [("float32", 3), ("bfloat16", 16)]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, "tests")
    from test_fa4_dq import MANY, SEGMENTS, build_accum
    from dinov3_packing.ops.triton import fa4_dq
    from dinov3_packing.ops.triton.rope import rope_reference

    out = {}
    cu = torch.tensor([0, *SEGMENTS]).cumsum(0).to(torch.int32)
    for dtype, heads in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(heads)
        tokens = int(cu[-1])
        dq = torch.randn(tokens, heads, 64, generator=gen)
        accum = build_accum(dq, cu.tolist(), 0.125)
        angles = torch.rand(tokens, 32, generator=gen, dtype=torch.float64).mul(6.3).repeat(1, 2)
        sin = angles.sin()
        cos64, sin64 = angles.cos(), torch.cat([-sin[:, :32], sin[:, 32:]], dim=1)
        cos, sin = cos64.to(dt), sin64.to(dt)
        row = {}
        qkv = torch.full((tokens, 3, heads, 64), float("nan"), dtype=dt)
        fa4_dq.dq_rope_from_accum(accum, qkv[:, 0], cu, 0.125, use_kernel=True)
        exact = dq.to(dt).double()
        err = (qkv[:, 0].double() - exact).abs()
        row["plain_max_err"] = err.max().item()
        row["plain_excess"] = (err - exact.abs() * 2.0**-7).max().item()
        row["others_untouched"] = bool(qkv[:, 1:].isnan().all())
        sums = torch.full((heads, 64), float("nan"))
        fa4_dq.dq_rope_from_accum(accum, qkv[:, 0], cu, 0.125, cos, sin, sums, use_kernel=True)
        ref = rope_reference(dq.double(), cos.double(), sin.double(), inverse=True)
        err = (qkv[:, 0].double() - ref).abs()
        row["rope_rel"] = (err.max() / ref.abs().max()).item()
        row["rope_excess"] = (err - ref.abs() * 2.0**-7 - 1e-6 * ref.abs().max()).max().item()
        row["sums_rel"] = ((sums.double() - ref.sum(0)).abs().max() / ref.abs().sum(0).max()).item()
        # Many short segments and a long one: each program finds its segment among 45 (the binary search), and
        # the kernel agrees with the torch path.
        many = torch.tensor([0, *MANY]).cumsum(0).to(torch.int32)
        n = int(many[-1])
        dq_many = torch.randn(n, heads, 64, generator=gen)
        acc_many = build_accum(dq_many, many.tolist(), 0.125)
        c, s_ = cos64[:1].repeat(n, 1).to(dt), sin64[:1].repeat(n, 1).to(dt)
        got, ref = torch.empty(n, heads, 64, dtype=dt), torch.empty(n, heads, 64, dtype=dt)
        sums_got, sums_ref = torch.empty(heads, 64), torch.empty(heads, 64)
        fa4_dq.dq_rope_from_accum(acc_many, got, many, 0.125, c, s_, sums_got, use_kernel=True)
        fa4_dq.dq_rope_from_accum(acc_many, ref, many, 0.125, c, s_, sums_ref, use_kernel=False)
        row["many_rel"] = ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
        row["many_sums_rel"] = ((sums_got - sums_ref).abs().max() / sums_ref.abs().max()).item()
        out[dtype] = row
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("triton")
    return run_interpreted(_SCRIPT, json.dumps(CASES), timeout=300)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_under_the_interpreter(results, case):
    r = results[case[0]]
    assert r["others_untouched"], r
    if case[0] == "float32":
        assert r["plain_max_err"] == 0.0, r  # a power-of-two scale: exact
        assert r["rope_rel"] <= 1e-6, r
    else:
        assert r["plain_excess"] <= 0 and r["rope_excess"] <= 0, r
    assert r["sums_rel"] <= 1e-5, r
    assert r["many_sums_rel"] <= 1e-5, r
    assert r["many_rel"] <= (1e-6 if case[0] == "float32" else 2.0**-7), r


def _sm90_call(dq: torch.Tensor, **changes) -> dict:
    call = dict(fa4_dq._LAYOUT_ARGS)
    call.update(output=dq, accum=torch.empty(1), arch=90, cu_seqlens=torch.zeros(2), fake_mode=False, scale=0.125)
    call.update(changes)
    return call


@pytest.mark.parametrize(
    "changes",
    [
        {"arch": 100},
        {"block_size": 64},
        {"hdim": 128},
        {"num_threads": 384},
        {"atom_layout": 1},
        {"swap_ab": True},
        {"use_2cta_instrs": True},
        {"cluster_size": 2},
        {"hdim_multiple_of": 64},
        {"accum_order": "row"},
        {"sink_tensors": object()},
        {"seqused": torch.zeros(1)},
        {"cu_seqlens": None},
        {"fake_mode": True},
    ],
    ids=lambda c: next(iter(c)),
)
def test_other_postprocess_configurations_are_not_taken(changes):
    """Only flash-attn-4's SM90 head_dim-64 varlen configuration has the layout the module knows; every other
    argument value (another arch, tile, warpgroup layout, a learnable sink, ...) leaves the postprocess to run."""
    dq = torch.empty(10, 3, 2, 64)[:, 0]
    assert fa4_dq.layout_matches(_sm90_call(dq), dq)
    assert not fa4_dq.layout_matches(_sm90_call(dq, **changes), dq)


def test_only_the_dq_conversion_is_taken():
    """dK or dV conversions (another output tensor), or a call missing an argument, run unchanged."""
    qkv = torch.empty(10, 3, 2, 64)
    dq = qkv[:, 0]
    assert not fa4_dq.layout_matches(_sm90_call(dq, output=qkv[:, 1]), dq)
    call = _sm90_call(dq)
    del call["accum_order"]
    assert not fa4_dq.layout_matches(call, dq)


def test_bad_shapes_are_refused_before_launch():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    dq = torch.empty(9, 2, 64)
    good = torch.empty(2, fa4_dq.padded_rows(9, 2) * 64)
    with pytest.raises(ValueError, match="accum"):
        fa4_dq.dq_rope_from_accum(good[:, :-64].contiguous(), dq, cu, 0.125)
    with pytest.raises(ValueError, match="accum"):
        fa4_dq.dq_rope_from_accum(good.double(), dq, cu, 0.125)
    with pytest.raises(ValueError, match="dq"):
        fa4_dq.dq_rope_from_accum(good, torch.empty(9, 2, 32), cu, 0.125)
    with pytest.raises(ValueError, match="cos, sin"):
        fa4_dq.dq_rope_from_accum(good, dq, cu, 0.125, torch.empty(9, 32), torch.empty(9, 32))
    with pytest.raises(ValueError, match="sums"):
        fa4_dq.dq_rope_from_accum(good, dq, cu, 0.125, sums=torch.empty(2, 64, dtype=torch.float64))


_STAND_IN = """
def _bwd_postprocess_convert(
    accum,
    output,
    scale,
    cu_seqlens,
    seqused,
    arch,
    dtype,
    hdim,
    block_size,
    num_threads,
    atom_layout,
    swap_ab,
    use_2cta_instrs=False,
    cluster_size=1,
    cu_total_m_blocks=None,
    sink_tensors=None,
    hdim_multiple_of=32,
    accum_order=None,
    *,
    fake_mode,
):
    key = (hdim, block_size)
    if key not in _bwd_postprocess_convert.compile_cache:  # as flash-attn-4's: through its module-level name
        _bwd_postprocess_convert.compile_cache[key] = "compiled"
    CALLS.append(output)
    output.fill_(1.0)


_bwd_postprocess_convert.compile_cache = {}


def with_kwargs(accum, output, *args, **kwargs):
    CALLS.append(output)
"""


def _stand_in_interface(monkeypatch, tmp_path, signature_with_kwargs: bool = False):
    """A `flash_attn.cute.interface` holding a `_bwd_postprocess_convert` with flash-attn-4 4.0.0b36's parameters,
    which, as that package's (its source, `flash_attn/cute/interface.py`), reaches its compile cache through its
    module-level name; it records the tensor it converts into and fills it with ones."""
    calls = []
    source = tmp_path / "stand_in_interface.py"
    source.write_text(_STAND_IN)
    spec = importlib.util.spec_from_file_location("flash_attn.cute.interface", source)
    interface = importlib.util.module_from_spec(spec)
    interface.CALLS = calls
    spec.loader.exec_module(interface)
    if signature_with_kwargs:
        interface._bwd_postprocess_convert = interface.with_kwargs
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    for name, module in (("flash_attn", package), ("flash_attn.cute", cute), ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    return interface, calls


def _convert(interface, accum, output, **changes):
    """A call as flash-attn-4's `_flash_attn_bwd` makes it for dQ (SM90, head_dim 64, varlen)."""
    kw = dict(use_2cta_instrs=False, cluster_size=1, accum_order=None, cu_total_m_blocks=None, sink_tensors=None)
    kw.update(fake_mode=False, hdim_multiple_of=32)
    args = [accum, output, 0.125, torch.zeros(3, dtype=torch.int32), None, 90, "bf16", 64, 128, 256, 2, False]
    args[8] = changes.pop("block_size", args[8])
    kw.update(changes)
    return interface._bwd_postprocess_convert(*args, **kw)


def test_capture_takes_only_the_dq_conversion_of_its_thread(monkeypatch, tmp_path):
    interface, calls = _stand_in_interface(monkeypatch, tmp_path)
    original = interface._bwd_postprocess_convert
    qkv = torch.zeros(5, 3, 2, 64)
    accum = torch.zeros(2, 64)
    with fa4_dq.capture_dq_accum(qkv[:, 0]) as captured:
        _convert(interface, accum, qkv[:, 0])  # dQ: taken
        _convert(interface, accum, qkv[:, 1])  # another output: runs
        _convert(interface, accum, qkv[:, 0], block_size=64)  # another tile: runs
        seen = []
        thread = threading.Thread(target=lambda: seen.append(_convert(interface, accum, qkv[:, 0])))
        thread.start()
        thread.join()  # another thread's call: runs
    assert captured.accum is accum and captured.scale == 0.125
    assert [c.data_ptr() for c in calls] == [qkv[:, 1].data_ptr(), qkv[:, 0].data_ptr(), qkv[:, 0].data_ptr()]
    calls.clear()
    _convert(interface, accum, qkv[:, 0])  # no capture open: runs
    assert len(calls) == 1
    other = torch.zeros(5, 2, 64)
    captured.run_postprocess(other)  # flash-attn-4's own conversion, into another tensor
    assert calls[-1] is other and bool((other == 1).all())
    assert interface._bwd_postprocess_convert.compile_cache == {(64, 128): "compiled", (64, 64): "compiled"}
    # installed once: the wrapper keeps the function it wraps, a second capture reuses it
    wrapper = interface._bwd_postprocess_convert
    assert getattr(wrapper, fa4_dq._WRAPS) is original
    with fa4_dq.capture_dq_accum(qkv[:, 0]) as again:
        _convert(interface, accum, qkv[:, 0])
    assert interface._bwd_postprocess_convert is wrapper and again.accum is accum


def test_capture_leaves_a_postprocess_it_cannot_call_by_name(monkeypatch, tmp_path):
    interface, calls = _stand_in_interface(monkeypatch, tmp_path, signature_with_kwargs=True)
    dq = torch.zeros(5, 2, 64)
    with fa4_dq.capture_dq_accum(dq) as captured:
        _convert(interface, torch.zeros(2, 64), dq)
    assert captured.accum is None and len(calls) == 1
    assert getattr(interface._bwd_postprocess_convert, fa4_dq._WRAPS, None) is None


def test_capture_without_flash_attn_4_takes_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with fa4_dq.capture_dq_accum(torch.zeros(5, 2, 64)) as captured:
        pass
    assert captured.accum is None
