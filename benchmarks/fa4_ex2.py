"""Experiment (issue 14): flash-attn-4's SM90 forward with every `every`-th softmax exponential of a row computed by
a polynomial on the FMA pipe instead of the MUFU unit.

At head_dim 64 a score costs 256 tensor-core FLOPs and one `ex2`; an H100 SM does 4,096 dense bf16 FLOPs but 16
`ex2` a clock, so the forward is bounded by MUFU as much as by the tensor cores. flash-attn-4 moves part of the
exponentials to the FMA units on SM100 (`ex2_emu_freq` in its config); its SM90 forward does not. This module
swaps the SM90 kernel's `Softmax` for a subclass whose `online_softmax` sends every `every`-th column of a thread's
row through `flash_attn.cute.utils.ex2_emulation` (a degree-3 polynomial of the fractional part, exact power of two
for the integer part), the rest through `exp2` as before. Numbers change: the polynomial's relative error is at most
8.8e-5 on [0, 1) (numpy, 1e6 points) against `ex2.approx`'s ~2**-22, before P is rounded to bf16 (2**-9).

Only for `benchmarks/fa4_gpu_check.py --parts fa4-ex2` (and `--ex2-every`): nothing in the package imports it.

Checked without a GPU (`python benchmarks/fa4_ex2.py`, see its `__main__`; 2026-12-08, flash-attn-4 4.0.0b36,
nvidia-cutlass-dsl 4.8.1, Python 3.11 wheels): every variant compiles for sm_90a (4 x 2048 px lengths); the PTX's
`ex2.approx` count goes from 130 (stock, and the explicit loop without emulation, whose PTX differs from the stock
only in the operand order of commutative `fma`s) to 122 / 114 / 98 for every 16th / 8th / 4th, each replaced
exponential an `add.rm` + two `sub` + three `fma` + a shift and an integer add; `ptxas -arch=sm_90a -v` (CUDA 13.0,
after lowering the PTX `.version` from 9.4 to 9.0) reports no spills for any of them (0 bytes spill stores/loads),
and `nvdisasm` shows 130 / 114 / 98 `MUFU.EX2` for the stock / 8th / 4th. Whether it is faster is for the GPU.
"""

import contextlib

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr
from flash_attn.cute import utils
from flash_attn.cute.softmax import Softmax
from quack import layout_utils


class EmulatedSoftmax(Softmax):
    """flash-attn-4's `Softmax` whose online softmax computes every `EVERY`-th exponential of each thread's row by
    the polynomial (`EVERY` 0: none, the stock work in an explicit loop). Module-level, with its names global: the
    DSL re-executes the jitted method's rewritten source."""

    EVERY = 0

    @classmethod
    def create(
        cls, scale_log2, num_rows: cutlass.Constexpr[int], arch: cutlass.Constexpr[int] = 80, softmax_scale=None
    ):
        row_max = cute.make_rmem_tensor(num_rows, Float32)
        row_sum = cute.make_rmem_tensor(num_rows, Float32)
        return cls(scale_log2, num_rows, row_max, row_sum, arch, softmax_scale)

    @cute.jit
    def online_softmax(
        self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool] = False, check_inf: cutlass.Constexpr[bool] = True
    ) -> cute.Tensor:
        every = self.EVERY
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        row_scale = cute.make_fragment_like(self.row_max, Float32)
        row_max, row_sum, scale_log2, arch = self.row_max, self.row_sum, self.scale_log2, self.arch
        for r in cutlass.range(cute.size(row_max), unroll_full=True):
            acc_S_row = acc_S_mn[r, None].load()
            row_max_cur = utils.fmax_reduce(
                acc_S_row, init_val=row_max[r] if const_expr(not is_first) else None, arch=arch
            )
            row_max_cur = cute.arch.warp_reduction_max(row_max_cur, threads_in_group=4)
            row_max_prev = row_max[r]
            row_max[r] = row_max_cur
            if const_expr(check_inf):
                row_max_cur = 0.0 if row_max_cur == -Float32.inf else row_max_cur
            row_max_cur_scaled = row_max_cur * scale_log2
            acc_S_mn[r, None].store(acc_S_row * scale_log2 - row_max_cur_scaled)
            for c in cutlass.range_constexpr(cute.size(acc_S_mn, mode=[1])):
                if const_expr(c % max(every, 1) == every - 1):  # (never for 0; no `and`: the DSL rewrites it)
                    acc_S_mn[r, c] = utils.ex2_emulation(acc_S_mn[r, c])
                else:
                    acc_S_mn[r, c] = cute.math.exp2(acc_S_mn[r, c], fastmath=True)
            acc_S_row_exp = acc_S_mn[r, None].load()
            if const_expr(is_first):
                row_sum[r] = utils.fadd_reduce(acc_S_row_exp, init_val=None, arch=arch)
                row_scale[r] = 1.0
            else:
                row_scale[r] = cute.math.exp2((row_max_prev - row_max_cur) * scale_log2, fastmath=True)
                row_sum[r] = utils.fadd_reduce(acc_S_row_exp, init_val=row_sum[r] * row_scale[r], arch=arch)
        return row_scale


def emulated_softmax(every: int) -> type:
    """`EmulatedSoftmax` with `EVERY = every`."""
    return type(f"EmulatedSoftmax{every}", (EmulatedSoftmax,), {"EVERY": every})


_VARIANTS: dict = {}
"""Per `every` (None: the stock class), `(softmax class, compile cache)`: the forward's compile key does not name the
softmax class, so each variant keeps its kernels in a cache of its own and compiles once per process."""


@contextlib.contextmanager
def forward_softmax(every: int | None):
    """flash-attn-4's SM90 forward compiled with `emulated_softmax(every)` inside the block (None: the stock
    class), from that variant's own compile cache (`_VARIANTS`)."""
    from flash_attn.cute import flash_fwd_sm90
    from flash_attn.cute.cache_utils import JITCache
    from flash_attn.cute.interface import _flash_attn_fwd

    stock = flash_fwd_sm90.Softmax, _flash_attn_fwd.compile_cache
    if every not in _VARIANTS:
        _VARIANTS[every] = stock if every is None else (emulated_softmax(every), JITCache())
    flash_fwd_sm90.Softmax, _flash_attn_fwd.compile_cache = _VARIANTS[every]
    try:
        yield
    finally:
        flash_fwd_sm90.Softmax, _flash_attn_fwd.compile_cache = stock


def offline_ptx(every: int | None, dump_dir: str, lengths: tuple[int, ...] = (5 + 128 * 128,) * 4) -> str:
    """The PTX of flash-attn-4's SM90 forward (ViT-L heads, bf16, varlen over `lengths`) with `emulated_softmax(every)`
    (None: stock), compiled without a GPU: fake CUDA tensors (flash-attn-4 compiles but does not launch under torch's
    FakeTensorMode), `_arch=90`. Needs `CUTE_DSL_ARCH=sm_90a`, `FLASH_ATTENTION_NUM_SMS` (132 for an H100 SXM) and
    `CUTE_DSL_KEEP=ptx` with `CUTE_DSL_DUMP_DIR=dump_dir` in the environment before cutlass is imported."""
    import glob
    import os
    import time

    import torch
    from flash_attn.cute.interface import _flash_attn_fwd
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.time()
    n, longest = sum(lengths), max(lengths)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(n, 16, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        cu = torch.empty(len(lengths) + 1, dtype=torch.int32, device="cuda")
        with forward_softmax(every):
            _flash_attn_fwd(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                softmax_scale=0.125, causal=False, return_lse=True, _arch=90,
            )  # fmt: skip
    # (the same kernel name for every variant: the file of this compile is the one written since it started)
    new = sorted(
        (p for p in glob.glob(os.path.join(dump_dir, "*.ptx")) if os.path.getmtime(p) >= started), key=os.path.getmtime
    )
    if not new:
        raise RuntimeError(
            f"no PTX written to {dump_dir}: set CUTE_DSL_KEEP=ptx and CUTE_DSL_DUMP_DIR before importing"
        )
    with open(new[-1]) as f:
        return f.read()


if __name__ == "__main__":
    # Offline check (no GPU): each variant's forward compiles, and the emulation replaces `ex2.approx` instructions.
    #   CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132 CUTE_DSL_KEEP=ptx CUTE_DSL_DUMP_DIR=/tmp/ptx \
    #     python benchmarks/fa4_ex2.py
    import os

    for every in (None, 0, 16, 8, 4):
        ptx = offline_ptx(every, os.environ.get("CUTE_DSL_DUMP_DIR", "."))
        counts = {op: ptx.count(op) for op in ("ex2.approx", "add.rm.ftz.f32", "wgmma.mma_async")}
        print(f"every={every}: {counts}")
