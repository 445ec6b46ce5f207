"""After the first autotuned launch, the Triton launchers pass the chosen config to the kernel directly
(`varlen_attention._TUNED`, `linear_gelu._TUNED_TMA`), skipping the autotuner's per-call host work.

No GPU here, so the autotuners are replaced by stand-ins that run the real kernel with one config (under
Triton's CPU interpreter, in a subprocess) and report it as their choice, as Triton's autotuner does with
`best_config`. Checked: the autotuner runs once per key, the later launch runs the kernel with the recorded
config, a new key tunes again, and every output matches its reference.
"""

from __future__ import annotations

import textwrap

import pytest
from triton_interpreter import run_interpreted

SCRIPT = textwrap.dedent(
    """
    import itertools, json
    import torch
    import torch.nn.functional as F
    import triton
    from dinov3_packing.ops.triton import linear_gelu as lg
    from dinov3_packing.ops.triton import varlen_attention as va

    class StandIn:
        # Runs `kernel` with `config` and reports it as the autotuner's choice; counts its launches.
        def __init__(self, kernel, config, extra):
            self.kernel, self.calls, self.extra = kernel, 0, extra
            meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
            self.best_config = triton.Config(meta, num_warps=config["num_warps"], num_stages=config["num_stages"])
            self.config = config

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls += 1
                return self.kernel[grid](*args, **kwargs, **self.extra(self.config, args))
            return run

    class Counting:
        # Wraps the plain kernel to count direct launches and record the config they got.
        def __init__(self, kernel):
            self.kernel, self.calls, self.seen = kernel, 0, []

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls += 1
                keys = (
                    "BLOCK_M",
                    "BLOCK_N",
                    "BLOCK_K",
                    "GROUP_M",
                    "EPI_SUBTILE",
                    "EVEN_N",
                    "STORE_PRE",
                    "num_warps",
                    "num_stages",
                )
                self.seen.append({k: kwargs[k] for k in keys if k in kwargs})
                return self.kernel[grid](*args, **kwargs)
            return run

    out = {}
    g = torch.Generator().manual_seed(0)

    # Attention.
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    va._varlen_fwd_tuned = StandIn(va._varlen_fwd_kernel, cfg, lambda c, a: dict(c))
    direct = Counting(va._varlen_fwd_kernel)
    va._varlen_fwd_kernel = direct
    lens = [3, 70, 129]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    worst = 0.0
    # head_dim 16 twice (one key), 32, then 16 with int64 cu_seqlens (the autotuner keys on dtypes too), then
    # an explicit config with its own block height.
    explicit = {"BLOCK_M": 64, "BLOCK_N": 32}
    for d, cu_dtype, config in (
        (16, torch.int32, None),
        (16, torch.int32, None),
        (32, torch.int32, None),
        (16, torch.int64, None),
        (16, torch.int32, explicit),
    ):
        cu = cu.to(cu_dtype)
        q, k, v = torch.randn(cu[-1].item(), 3, 2, d, generator=g).unbind(1)
        o = va.launch(q, k, v, cu, config=config)
        for s, e in itertools.pairwise(cu.tolist()):
            ref = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1).double() for x in (q, k, v)))
            worst = max(worst, ((o[s:e].double() - ref.transpose(0, 1)).abs().max() / ref.abs().max()).item())
    out["attention"] = dict(
        tuned=va._varlen_fwd_tuned.calls, direct=direct.calls, seen=direct.seen, keys=len(va._TUNED), rel=worst
    )

    # Fused up-projection + GELU (TMA path; the interpreter reports TMA as available).
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, EPI_SUBTILE=True, num_warps=4, num_stages=2)

    def block_shapes(c, args):
        # What the real autotuner's pre-hook and heuristic do: the descriptors follow the config, EVEN_N the
        # config's BLOCK_N.
        x_desc, w_desc, y_desc, p_desc, _bias, _m, n = args[:7]
        x_desc.block_shape = [c["BLOCK_M"], c["BLOCK_K"]]
        w_desc.block_shape = [c["BLOCK_N"], c["BLOCK_K"]]
        y_desc.block_shape = p_desc.block_shape = [c["BLOCK_M"], c["BLOCK_N"] // 2]
        return dict(c, EVEN_N=n % c["BLOCK_N"] == 0)

    lg._tma_autotuned = StandIn(lg._linear_gelu_tma_kernel, small, block_shapes)
    direct = Counting(lg._linear_gelu_tma_kernel)
    lg._linear_gelu_tma_kernel = direct
    worst = 0.0
    # (N, K) = (100, 64) at M = 40 and 7 (one key; N not a multiple of BLOCK_N, so the direct launch must
    # keep the bias mask), (64, 32), (100, 64) without a bias (another key), then (100, 64) storing the
    # pre-activation twice (another key: the training form tunes apart from the inference one).
    for m, kk, n, has_bias, store_pre in (
        (40, 64, 100, True, False),
        (7, 64, 100, True, False),
        (40, 32, 64, True, False),
        (40, 64, 100, False, False),
        (40, 64, 100, True, True),
        (9, 64, 100, True, True),
    ):
        x = torch.randn(m, kk, generator=g)
        w = torch.randn(n, kk, generator=g) / kk**0.5
        b = torch.randn(n, generator=g) if has_bias else None
        pre = torch.empty(m, n) if store_pre else None
        y = lg.launch_linear_gelu(x, w, b, pre_out=pre)
        pre_ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        ref = F.gelu(pre_ref)
        worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
        if store_pre:
            worst = max(worst, ((pre.double() - pre_ref).abs().max() / pre_ref.abs().max()).item())
    out["linear_gelu"] = dict(
        tuned=lg._tma_autotuned.calls, direct=direct.calls, seen=direct.seen, keys=len(lg._TUNED_TMA), rel=worst
    )
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("triton")
    return run_interpreted(SCRIPT, timeout=600)


def test_attention_tunes_once_per_head_dim_then_launches_the_tuned_config(results):
    r = results["attention"]
    # The second head_dim-16 launch reuses the first one's config; 32 and int64 cu_seqlens are new keys; the
    # explicit config launches as given.
    assert (r["tuned"], r["direct"], r["keys"]) == (3, 2, 3)
    assert r["seen"] == [
        {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    ]
    assert r["rel"] < 1e-6


def test_linear_gelu_tunes_once_per_shape_then_launches_the_tuned_config(results):
    r = results["linear_gelu"]
    # M = 7 reuses the M = 40 config, keeping the bias mask (N = 100); (64, 32), the bias-free launch and the
    # first launch storing the pre-activation are new keys; the second one reuses that config, still storing it.
    assert (r["tuned"], r["direct"], r["keys"]) == (4, 2, 4)
    tuned = {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_K": 32,
        "GROUP_M": 4,
        "EPI_SUBTILE": True,
        "EVEN_N": False,
        "num_warps": 4,
        "num_stages": 2,
    }
    assert r["seen"] == [{**tuned, "STORE_PRE": False}, {**tuned, "STORE_PRE": True}]
    assert r["rel"] < 1e-6
