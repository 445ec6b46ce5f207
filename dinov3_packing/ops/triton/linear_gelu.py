"""Fused ``gelu(x @ weight.T + bias)``: one Triton GEMM with the bias and the exact (erf) GELU in its epilogue.

The MLP's first projection (``fc1`` then GELU) is one GEMM followed by an elementwise kernel that reads and
writes the whole ``[M, 4*D]`` activation once more. Here the GEMM accumulates in fp32 and applies the bias and
the exact erf GELU (``F.gelu(..., approximate="none")``, not the tanh approximation) to the fp32 accumulator
before the single store in ``x.dtype``, so in inference the pre-activation never touches device memory (training
stores it from the same epilogue, for the backward).

Kernels (both grouped tile order for L2 reuse, fp32 accumulation, fp32 epilogue):

- ``_linear_gelu_tma_kernel``: persistent (one program per SM), TMA descriptors for x / weight / y / pre, the loop over
  tiles flattened with the K loop so the next tile's loads are in flight during the epilogue, epilogue split in
  two column halves. Hopper (sm_90) and newer; needs 16-byte aligned rows (K and N multiples of 8 for 2-byte
  dtypes) and base pointers. Tails in M, N and K are handled by the descriptors (zero fill, clipped stores).
  Bias loads are unmasked when ``N`` is a multiple of the block width.
- ``_linear_gelu_ptr_kernel``: plain pointer loads with masks; any strides / tails; pre-Hopper GPUs.

The GELU is branch-free: ``gelu(v) = relu(v) - t * 2**-(t * Q(t) + 1)``, ``t = min(|v|, 4 * sqrt(2))``, ``Q`` a
degree-8 polynomial (:func:`_gelu_folded`): within 3e-7 absolute of the fp64 GELU of the fp32 input (tested over
[-14, 14] and out to +-1e4), ``gelu(+inf) = +inf`` and ``gelu(-inf) = 0``. Why the kernels take this shape, with
the measurements: ``docs/kernels.md``.

Public API:

- :func:`linear_gelu` ``(x, weight, bias=None)``: the fused kernel on CUDA fp16/bf16, in inference and in
  training, else ``F.gelu(F.linear(x, weight, bias))`` (CPU, other dtypes).
- :func:`linear_gelu_supported` ``(x, weight, bias=None)``: whether :func:`linear_gelu` takes the kernel path.
- ``torch.ops.dinov3_packing.linear_gelu(x, weight, bias, save_pre) -> (y, pre)``: the same as a custom op that
  ``torch.compile`` keeps as one call; its fake implementation only allocates the outputs. With ``save_pre`` the
  kernel also stores the pre-activation (x's dtype; one more store in the same epilogue, no second GEMM), and the
  registered backward computes ``grad_pre = grad_y * gelu'(pre)`` (exact erf derivative) and the input, weight
  and bias gradients with torch matmuls (cuBLAS on the GPU).
- :func:`launch_linear_gelu`: the raw launcher (explicit config or autotune; also runs under ``TRITON_INTERPRET=1``).
- :func:`pin_linear_gelu_config`, :func:`pin_gelu_grad_config`: make later launches of one shape and dtype run a
  given config (an entry of :data:`CONFIGS` or :data:`CANDIDATE_CONFIGS`, the other schedules not yet in the
  autotuner's lists) instead of the autotuner's choice; for benchmarks.

Triton versions: only APIs present in both Triton 3.6 and 3.8 (``tl.dot``, ``tl.range(..., flatten=True)``,
tensor-descriptor ``load`` / ``store`` with host-side ``triton.tools.tensor_descriptor.TensorDescriptor``,
``tl.exp2``, ``triton.autotune`` with ``pre_hook``); no ``libdevice`` import.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton take the torch fallback
    triton = None
    tl = None

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.4: pointer kernel only
    TensorDescriptor = None

__all__ = [
    "CANDIDATE_CONFIGS",
    "CONFIGS",
    "GRAD_CANDIDATE_CONFIGS",
    "GRAD_CONFIGS",
    "PTR_CONFIGS",
    "dgelu_path_runs",
    "gelu_grad_supported",
    "launch_gelu_grad",
    "launch_linear_gelu",
    "linear_gelu",
    "linear_gelu_reference",
    "linear_gelu_supported",
    "pin_gelu_grad_config",
    "pin_linear_gelu_config",
    "tuned_configs",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)

# TMA persistent kernel; docs/kernels.md has the timings that chose this list. Keyed on (N, K) only: the token
# count M varies per batch and must not trigger a re-tune. 128x256x64 at 4 stages = 192 KB of shared memory.
CONFIGS: list[dict] = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=False, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, EPI_SUBTILE=True, num_warps=8, num_stages=4),
]
# The GELU-backward GEMM (GRAD): its epilogue also reads a pre-activation tile through TMA, so 128x256 tiles take 3
# stages (4 would pass the 227 KB of shared memory with the epilogue's buffers).
GRAD_CONFIGS: list[dict] = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=False, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, EPI_SUBTILE=True, num_warps=8, num_stages=3),
]
# Schedules of the same TMA kernel not yet in the autotuner's lists (the same tiles and sums; only the overlap of
# one tile's epilogue with GEMM work differs): two persistent programs per SM (OCC=2: tiles small enough that two
# fit an SM's shared memory and registers, so the warp scheduler runs one's epilogue during the other's MMAs,
# a ping-pong left to the hardware) and the unflattened loop. Triton 3.6's warp specialization does not apply to
# this Hopper kernel (an offline sm_90a compile with `tl.range(..., warp_specialize=True)` gives the same single
# partition), so it is not among them. `benchmarks/fa4_gpu_check.py --parts mlp-configs` times them against the
# lists above on a GPU; one moves into a list only when it measures faster there. Residency of two programs
# (offline sm_90a compile, Triton 3.6; an H100 SM has 228 KiB of shared memory and 64 Ki registers): 128 x 128
# at 8 warps, 114,712 bytes and 100-105 registers forward, 81,936 bytes GRAD where 132 registers would leave
# room for one program only, so `maxnreg` caps them at 128 (no spills); at 4 warps up to 255 registers (two
# programs use the whole file); 64 x 256 at 2 stages, 98,320 bytes.
_SCHEDULES: dict[str, dict] = {
    "128x256 unflattened": dict(BLOCK_M=128, BLOCK_N=256, EPI_SUBTILE=True, num_warps=8, FLATTEN=False),
    "128x128 w8 2/SM": dict(BLOCK_M=128, BLOCK_N=128, EPI_SUBTILE=True, num_warps=8, OCC=2, FLATTEN=False, maxnreg=128),
    "128x128 w4 2/SM": dict(BLOCK_M=128, BLOCK_N=128, EPI_SUBTILE=True, num_warps=4, OCC=2, FLATTEN=False),
    "128x128 w8 2/SM flat": dict(
        BLOCK_M=128, BLOCK_N=128, EPI_SUBTILE=True, num_warps=8, OCC=2, FLATTEN=True, maxnreg=128
    ),
    "64x256 w4 2/SM": dict(BLOCK_M=64, BLOCK_N=256, EPI_SUBTILE=True, num_warps=4, OCC=2, FLATTEN=False),
}
_STAGES = {  # (forward, GRAD) pipeline depths: 2/SM tiles must leave half the shared memory to the other program
    "128x256 unflattened": (4, 3),
    "128x128 w8 2/SM": (3, 2),
    "128x128 w4 2/SM": (3, 2),
    "128x128 w8 2/SM flat": (3, 2),
    "64x256 w4 2/SM": (2, 2),
}
CANDIDATE_CONFIGS: dict[str, dict] = {
    name: dict(BLOCK_K=64, GROUP_M=8, **c, num_stages=_STAGES[name][0]) for name, c in _SCHEDULES.items()
}
GRAD_CANDIDATE_CONFIGS: dict[str, dict] = {
    name: dict(BLOCK_K=64, GROUP_M=8, **c, num_stages=_STAGES[name][1]) for name, c in _SCHEDULES.items()
}
# Pointer kernel (unaligned shapes, pre-Hopper GPUs).
PTR_CONFIGS: list[dict] = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
]


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused computation the kernel replaces: ``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU)."""
    return F.gelu(F.linear(x, weight, bias), approximate="none")


if triton is not None:

    @triton.jit
    def _normal_tail(v):
        """``(t', E / 2)`` for an fp32 tensor: ``t' = min(|v|, 4 * sqrt(2))`` and the standard normal tail
        ``1 - Phi(|v|) = 2**(-(t' * Q'(t') + 1))`` (floored past 4 * sqrt(2)), the shared term of the GELU and its
        derivative (see :func:`_gelu_folded` for the polynomial)."""
        t = tl.minimum(tl.abs(v), 5.656854249492381)
        q = -5.128408924816711e-07
        q = q * t + 9.55991799855837e-06
        q = q * t - 7.497192748298707e-05
        q = q * t + 0.00028434165869839473
        q = q * t - 1.4980165308372113e-05
        q = q * t - 0.006931130308657882
        q = q * t + 0.05243477306021378
        q = q * t + 0.459221452474594
        q = q * t + 1.151104274111107
        return t, tl.exp2(-(q * t + 1.0))

    @triton.jit
    def _gelu_folded(v):
        """Exact GELU ``0.5 * v * (1 + erf(v / sqrt(2)))`` of an fp32 tensor, within 3e-7 absolute (module docstring).

        From ``erf(u) = sign(u) * (1 - E)``, ``E = 2**(-t * Q(t))``, ``t = min(|u|, 4)`` with ``Q`` of degree 8 fitted
        for absolute error (< 1e-7), GELU is v - v * E / 2 for v >= 0 and v * E / 2 below, i.e.
        ``relu(v) - t' * 2**(-(t' * Q'(t') + 1))`` with ``t' = min(|v|, 4 * sqrt(2))`` and
        ``Q'_k = Q_k * 2**(-(k + 1) / 2)``: the 1/sqrt(2) and the 1/2 live in the coefficients and the exponent, so
        there is no compare or select. The last factor is t', not |v|: the two are equal up to 4 * sqrt(2), where
        E has reached its floor, and t' keeps the negative tail bounded (|v| * E would grow with |v| and give NaN
        at +inf).
        """
        t, e = _normal_tail(v)
        return tl.maximum(v, 0.0) - t * e

    @triton.jit
    def _add_bias(acc, b_ptr, offs_n, N, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr):
        if HAS_BIAS:
            if EVEN_N:  # no column tail: unmasked loads (no per-element compare and predicate)
                bias = tl.load(b_ptr + offs_n).to(tl.float32)
            else:
                bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        return acc

    @triton.jit
    def _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
        """Grouped ("swizzled") order: GROUP_M row blocks sweep the column blocks together (L2 reuse)."""
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile_id % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _gelu_grad(v):
        """Exact GELU derivative ``Phi(v) + v * phi(v)`` of an fp32 tensor (normal CDF and density).

        The CDF comes from the tail ``e`` of :func:`_normal_tail` (``e`` is ``1 - Phi(|v|)``):
        ``Phi(v) = 1 - e`` for v >= 0 and ``e`` below. The density term is clamped to |v| <= 16, where it has long
        underflowed to 0, so that +-inf give 1 and 0 instead of ``inf * 0``.
        """
        _, e = _normal_tail(v)
        cdf = tl.where(v >= 0.0, 1.0 - e, e)
        vc = tl.minimum(tl.maximum(v, -16.0), 16.0)
        # 1/sqrt(2*pi) * 2**(-v^2 * log2(e) / 2)
        return cdf + vc * 0.3989422804014327 * tl.exp2(vc * vc * -0.7213475204444817)

    @triton.jit
    def _epilogue(
        acc,
        off_m,
        off_n,
        y_desc,
        p_desc,
        b_ptr,
        N,
        HAS_BIAS: tl.constexpr,
        STORE_PRE: tl.constexpr,
        EVEN_N: tl.constexpr,
        GRAD: tl.constexpr,
        WIDTH: tl.constexpr,
        DERIV: tl.constexpr,
    ):
        """Store one [BLOCK_M, WIDTH] accumulator tile at (off_m, off_n).

        Forward: y = gelu(acc + bias), and, when STORE_PRE, the pre-activation v = acc + bias or, with DERIV, the
        GELU's derivative gelu'(v) at it. GRAD: y = acc * gelu'(pre) with `pre` read through `p_desc` (with DERIV,
        `p_desc` holds gelu'(pre) itself: a product only), and, when HAS_BIAS, the tile's column sums of y (fp32,
        before rounding) added atomically to the fp32 bias gradient at `b_ptr`. Rows past M were loaded as zeros
        (TMA fill), so they add nothing to the sums.
        """
        offs_n = off_n + tl.arange(0, WIDTH)
        if GRAD:
            p = p_desc.load([off_m, off_n]).to(tl.float32)
            if DERIV:
                g = acc * p
            else:
                g = acc * _gelu_grad(p)
            if HAS_BIAS:
                if EVEN_N:
                    tl.atomic_add(b_ptr + offs_n, tl.sum(g, axis=0))
                else:
                    tl.atomic_add(b_ptr + offs_n, tl.sum(g, axis=0), mask=offs_n < N)
            y_desc.store([off_m, off_n], g.to(y_desc.dtype))
        else:
            v = _add_bias(acc, b_ptr, offs_n, N, HAS_BIAS, EVEN_N)
            if STORE_PRE:
                if DERIV:
                    p_desc.store([off_m, off_n], _gelu_grad(v).to(p_desc.dtype))
                else:
                    p_desc.store([off_m, off_n], v.to(p_desc.dtype))
            y_desc.store([off_m, off_n], _gelu_folded(v).to(y_desc.dtype))

    @triton.jit
    def _linear_gelu_tma_kernel(
        x_desc,
        w_desc,
        y_desc,
        p_desc,
        b_ptr,
        M,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        STORE_PRE: tl.constexpr,
        EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EPI_SUBTILE: tl.constexpr,
        NUM_SMS: tl.constexpr,
        GRAD: tl.constexpr = False,
        DERIV: tl.constexpr = False,
        OCC: tl.constexpr = 1,
        FLATTEN: tl.constexpr = True,
    ):
        """Persistent: program p handles tiles p, p + P, ... with P = NUM_SMS * OCC programs (OCC programs per SM
        share it, so one's epilogue can overlap another's GEMM loop where their shared memory and registers fit).
        FLATTEN: the tile and K loops form one software pipeline (the next tile's loads in flight during this one's
        epilogue); off, each tile's K loop is pipelined alone.

        Forward (GRAD False): y = gelu(x @ w^T + b) with w [N, K], and the pre-activation through `p_desc` when
        STORE_PRE. GRAD: y = (x @ w) * gelu'(pre) with w [K, N] (the down-projection's weight as it is stored) and
        the bias gradient into `b_ptr` when HAS_BIAS; DERIV: `p_desc` holds gelu'(pre) (see `_epilogue`).
        """
        start_pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        num_pid_in_group = GROUP_M * num_pid_n
        # The epilogue recomputes its tile from its own counter (the flattened loop pipelines the loads of the
        # next tile across this one's epilogue).
        num_programs = NUM_SMS * OCC
        tile_id_c = start_pid - num_programs
        for tile_id in tl.range(start_pid, num_tiles, num_programs, flatten=FLATTEN):
            pid_m, pid_n = _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_desc.load([off_m, ki * BLOCK_K])
                if GRAD:
                    acc = tl.dot(a, w_desc.load([ki * BLOCK_K, off_n]), acc)
                else:
                    acc = tl.dot(a, w_desc.load([off_n, ki * BLOCK_K]).T, acc)

            tile_id_c += num_programs
            pid_m, pid_n = _tile_pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if EPI_SUBTILE:
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                off_n1 = off_n + BLOCK_N // 2
                _epilogue(
                    acc0, off_m, off_n, y_desc, p_desc, b_ptr, N, HAS_BIAS, STORE_PRE, EVEN_N, GRAD, BLOCK_N // 2, DERIV
                )
                _epilogue(
                    acc1,
                    off_m,
                    off_n1,
                    y_desc,
                    p_desc,
                    b_ptr,
                    N,
                    HAS_BIAS,
                    STORE_PRE,
                    EVEN_N,
                    GRAD,
                    BLOCK_N // 2,
                    DERIV,
                )
            else:
                _epilogue(
                    acc, off_m, off_n, y_desc, p_desc, b_ptr, N, HAS_BIAS, STORE_PRE, EVEN_N, GRAD, BLOCK_N, DERIV
                )

    @triton.jit
    def _linear_gelu_ptr_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        p_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        STORE_PRE: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DERIV: tl.constexpr = False,
    ):
        """y[M, N] = gelu(x[M, K] @ w[N, K]^T + b[N]), and the pre-activation (with DERIV the GELU's derivative
        there) into p (laid out as y) when STORE_PRE; unit stride along K for x and w, along N for y."""
        pid_m, pid_n = _tile_pid(tl.program_id(0), GROUP_M * tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows / columns wrap onto valid ones for the loads (no masks in the main loop); their
        # results are masked off at the store.
        rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        # 64-bit row offsets: M * stride can pass 2**31 (130k tokens x 16384 columns).
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w^T

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        v = _add_bias(acc, b_ptr, offs_n, N, HAS_BIAS, False)
        out_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if STORE_PRE:
            if DERIV:
                tl.store(p_ptr + out_offs, _gelu_grad(v).to(p_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(p_ptr + out_offs, v.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + out_offs, _gelu_folded(v).to(y_ptr.dtype.element_ty), mask=mask)

    def _set_desc_blocks(nargs: dict) -> None:
        """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bk, bn] if nargs.get("GRAD") else [bn, bk]
        nargs["y_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SUBTILE"] else bn]
        nargs["p_desc"].block_shape = nargs["y_desc"].block_shape

    def _triton_config(c: dict, pre_hook=None) -> triton.Config:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        options = dict(num_warps=c["num_warps"], num_stages=c["num_stages"], maxnreg=c.get("maxnreg"))
        return triton.Config(meta, **options, pre_hook=pre_hook)

    # STORE_PRE is part of the key: the second store changes the epilogue's cost and shared memory.
    _even_n = triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})(_linear_gelu_tma_kernel)
    _tma_autotuned = triton.autotune(
        configs=[_triton_config(c, _set_desc_blocks) for c in CONFIGS], key=["N", "K", "STORE_PRE", "DERIV"]
    )(_even_n)
    # The backward's kernel (GRAD) loads the pre-activation in its epilogue: its own list, shallower pipelines.
    _grad_autotuned = triton.autotune(
        configs=[_triton_config(c, _set_desc_blocks) for c in GRAD_CONFIGS], key=["N", "K", "HAS_BIAS", "DERIV"]
    )(_even_n)
    _ptr_autotuned = triton.autotune(
        configs=[_triton_config(c) for c in PTR_CONFIGS], key=["N", "K", "STORE_PRE", "DERIV"]
    )(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_linear_gelu_ptr_kernel))


@functools.cache
def _device_info(device: torch.device) -> tuple[int, bool]:
    """(programs of the persistent grid, whether TMA is available) for a device."""
    if device.type != "cuda":  # the Triton interpreter: a few programs, so each loops over several tiles
        return 4, True
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major >= 9


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs unit inner stride and 16-byte aligned base pointers and row strides."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


# The config the TMA autotuner chose for each key of `_tma_key`: later launches pass it to the kernel
# directly, which skips the autotuner's per-call host bookkeeping (docs/kernels.md). The key holds everything
# the autotuner keys on (N, K, STORE_PRE and the dtype of every tensor argument) plus the bias flag and device, so
# the choice is the one it would make. The pointer kernel (unaligned or pre-Hopper) keeps the autotuner.
_TUNED_TMA: dict[tuple, dict] = {}
_TUNING_LOCK = threading.Lock()


def tuned_configs() -> dict[str, dict]:
    """The configs the TMA autotuner chose so far, by key (`str` of the shape, flag, dtype and device key), for
    benchmark records."""
    return {str(k): dict(v) for k, v in _TUNED_TMA.items()}


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPI_SUBTILE", "num_warps", "num_stages"}
_SCHEDULE_KEYS = {"OCC", "FLATTEN", "maxnreg"}


def _checked_config(config: dict) -> dict:
    if not isinstance(config, dict) or not _CONFIG_KEYS <= set(config) <= _CONFIG_KEYS | _SCHEDULE_KEYS:
        raise ValueError(
            f"config: expected a dict with keys {sorted(_CONFIG_KEYS)} and optionally {sorted(_SCHEDULE_KEYS)} "
            f"(an entry of CONFIGS / CANDIDATE_CONFIGS), got {config!r}"
        )
    return dict(config)


def pin_linear_gelu_config(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store: str | None, config: dict
) -> None:
    """Make later TMA launches of :func:`launch_linear_gelu` with tensors like these (shapes N and K, dtypes,
    device) run ``config`` instead of the autotuner's choice; ``store``: None (inference), "pre" or "deriv" (what
    ``pre_out`` receives). For benchmarks that time other schedules (``CANDIDATE_CONFIGS``) inside a whole step."""
    if store not in (None, "pre", "deriv"):
        raise ValueError(f"store: expected None, 'pre' or 'deriv', got {store!r}")
    _TUNED_TMA[_tma_key(x, weight, bias, store)] = _checked_config(config)


def pin_gelu_grad_config(
    grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, bias_grad: bool, deriv: bool, config: dict
) -> None:
    """As :func:`pin_linear_gelu_config`, for :func:`launch_gelu_grad` with these arguments' shapes and dtypes."""
    _TUNED_TMA[_grad_key(grad_out, weight, pre, bias_grad, deriv)] = _checked_config(config)


def _tma_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store: str | None) -> tuple:
    """`store`: None, "pre" or "deriv" (what the kernel stores besides y)."""
    bias_dtype = None if bias is None else bias.dtype
    return (weight.shape[0], x.shape[1], store, x.dtype, weight.dtype, bias_dtype, x.device)


def _grad_key(grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, bias_grad: bool, deriv: bool) -> tuple:
    """The `_TUNED_TMA` key of a :func:`launch_gelu_grad` call."""
    return (
        "grad",
        weight.shape[1],
        grad_out.shape[1],
        bias_grad,
        deriv,
        grad_out.dtype,
        weight.dtype,
        pre.dtype,
        pre.device,
    )


def _launch_tma(x, weight, y, p, b, flags: dict, config: dict | None, key: tuple, grad: bool) -> None:
    """Launch the persistent TMA kernel: `config`, else the config tuned earlier for `key`, else the autotuner
    (whose choice is kept under `key`). `weight` is [N, K] for the forward and [K, N] for `grad`."""
    M, K = x.shape
    N = y.shape[1]
    num_sms = _device_info(x.device)[0]
    if config is None and key in _TUNED_TMA:
        config = _TUNED_TMA[key]
    c = dict(config or (GRAD_CONFIGS if grad else CONFIGS)[0])  # the descriptors' blocks; the pre-hook resets them
    bn_store = c["BLOCK_N"] // 2 if c.get("EPI_SUBTILE") else c["BLOCK_N"]
    x_desc = TensorDescriptor.from_tensor(x, [c["BLOCK_M"], c["BLOCK_K"]])
    w_desc = TensorDescriptor.from_tensor(
        weight, [c["BLOCK_K"], c["BLOCK_N"]] if grad else [c["BLOCK_N"], c["BLOCK_K"]]
    )
    y_desc = TensorDescriptor.from_tensor(y, [c["BLOCK_M"], bn_store])
    p_desc = TensorDescriptor.from_tensor(p, [c["BLOCK_M"], bn_store]) if p is not y else y_desc

    def grid(meta):
        return (min(num_sms * meta.get("OCC", 1), triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    args = (x_desc, w_desc, y_desc, p_desc, b, M, N, K)
    if config is None:
        tuner = _grad_autotuned if grad else _tma_autotuned
        with _TUNING_LOCK:  # `best_config` is the autotuner's last choice: read it before another launch
            tuner[grid](*args, **flags, NUM_SMS=num_sms, GRAD=grad)
            best = tuner.best_config
            chosen = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            _TUNED_TMA[key] = chosen | ({"maxnreg": best.maxnreg} if best.maxnreg else {})
        if not (grad and flags["HAS_BIAS"]):
            return
        # The autotuner ran the kernel once per config and timing repeat on these arguments: the outputs it
        # stores are the same every time, but the bias gradient's atomic sums piled up. Start it again.
        b.zero_()
        c = dict(_TUNED_TMA[key])
        _set_desc_blocks(dict(x_desc=x_desc, w_desc=w_desc, y_desc=y_desc, p_desc=p_desc, GRAD=grad, **c))
    even_n = N % c["BLOCK_N"] == 0
    _linear_gelu_tma_kernel[grid](*args, **flags, EVEN_N=even_n, NUM_SMS=num_sms, GRAD=grad, **c)


def launch_linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    *,
    kernel: str = "auto",
    pre_out: torch.Tensor | None = None,
    deriv: bool = False,
) -> torch.Tensor:
    """Run the Triton kernel on a 2-D ``x [M, K]``, ``weight [N, K]``, ``bias [N]`` or None; returns ``[M, N]``.

    ``pre_out``: a contiguous ``[M, N]`` tensor of x's dtype and device that the same kernel also fills with the
    pre-activation ``x @ weight.T + bias`` (rounded once from fp32), for the backward; with ``deriv``, the exact
    GELU's derivative at the fp32 pre-activation instead (rounded once), what :func:`launch_gelu_grad` with
    ``deriv`` multiplies by. ``kernel``: "tma"
    (persistent TMA kernel), "ptr" (pointer kernel) or "auto" (TMA when the device has it and the tensors are
    16-byte aligned, else pointer). ``config``: one entry of :data:`CONFIGS` or :data:`CANDIDATE_CONFIGS` (TMA) or
    :data:`PTR_CONFIGS` (pointer; BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, optional num_warps / num_stages) runs that
    configuration; None runs the config pinned for this shape (:func:`pin_linear_gelu_config`) or tuned earlier,
    else autotunes over the list (keyed on N and K). No dtype / device policy here: callers go
    through :func:`linear_gelu` or the custom op. Under ``TRITON_INTERPRET=1`` this runs on CPU tensors (pass
    ``config``).
    """
    if triton is None:
        raise RuntimeError("linear_gelu kernel needs Triton, which is not installed")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    if kernel not in ("auto", "tma", "ptr"):
        raise ValueError(f"linear_gelu: kernel must be 'auto', 'tma' or 'ptr', got {kernel!r}")
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"linear_gelu: bias {tuple(bias.shape)} != ({N},)")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if pre_out is not None and (
        pre_out.shape != (M, N) or pre_out.dtype != x.dtype or pre_out.device != x.device or not pre_out.is_contiguous()
    ):
        raise ValueError(
            f"linear_gelu: pre_out must be a contiguous ({M}, {N}) {x.dtype} tensor on {x.device}, got "
            f"{tuple(pre_out.shape)} {pre_out.dtype} on {pre_out.device}"
        )
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        v = F.linear(x, weight, bias)
        if pre_out is not None:
            pre_out.copy_(torch.ops.aten.gelu_backward(torch.ones_like(v), v) if deriv else v)
        return y.copy_(F.gelu(v))
    b_arg = bias if bias is not None else y  # never read when HAS_BIAS is False
    store_pre = pre_out is not None
    p_arg = pre_out if store_pre else y  # never written when STORE_PRE is False
    flags = dict(HAS_BIAS=bias is not None, STORE_PRE=store_pre, DERIV=deriv and store_pre)

    has_tma = _device_info(x.device)[1]
    use_tma = TensorDescriptor is not None and has_tma and _tma_compatible(x, weight, y, p_arg)
    if kernel == "tma" and not use_tma:
        raise ValueError("linear_gelu: the TMA kernel needs Triton >= 3.4, sm_90+ and 16-byte aligned rows")
    if kernel == "ptr":
        use_tma = False

    if use_tma:
        _launch_tma(
            x,
            weight,
            y,
            p_arg,
            b_arg,
            flags,
            config,
            _tma_key(x, weight, bias, ("deriv" if deriv else "pre") if store_pre else None),
            grad=False,
        )
        return y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (x, weight, b_arg, y, p_arg, M, N, K, x.stride(0), weight.stride(0), y.stride(0))
    if config is None:
        _ptr_autotuned[grid](*args, **flags)
    else:
        c = {k: v for k, v in config.items() if k not in ("EPI_SUBTILE", "OCC", "FLATTEN")}  # TMA-kernel keys
        _linear_gelu_ptr_kernel[grid](*args, **flags, EVEN_K=K % c["BLOCK_K"] == 0, **c)
    return y


def launch_gelu_grad(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    pre: torch.Tensor,
    bias_grad: bool,
    config: dict | None = None,
    *,
    deriv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GELU MLP's backward through its activation, one TMA GEMM: ``grad_pre = (grad_out @ weight) *
    gelu'(pre)`` (exact erf derivative, one rounding from fp32) and, with ``bias_grad``, the up-projection's bias
    gradient ``grad_pre.sum(0)`` summed in fp32 from the unrounded products (atomic adds per tile, so its last bits
    may differ between runs), in ``pre``'s dtype.

    ``grad_out`` ``[M, K]`` (the MLP output's gradient), ``weight`` ``[K, N]`` (the down-projection's weight as
    ``nn.Linear`` stores it), ``pre`` ``[M, N]`` (the saved pre-activation; with ``deriv``, the GELU's derivative
    there as :func:`launch_linear_gelu` with ``deriv`` stored it, and the epilogue only multiplies). Needs what
    the forward's TMA kernel needs (sm_90+, Triton's TensorDescriptor, 16-byte aligned rows); ``config``: one entry of
    :data:`GRAD_CONFIGS` or :data:`GRAD_CANDIDATE_CONFIGS`, else the pinned (:func:`pin_gelu_grad_config`) or
    earlier tuned config, else autotuned. Runs under ``TRITON_INTERPRET=1`` on CPU tensors (pass ``config``).
    """
    if triton is None or TensorDescriptor is None:
        raise RuntimeError("gelu_grad kernel needs Triton >= 3.4, which is not installed")
    M, K = grad_out.shape
    N = weight.shape[1]
    if weight.shape[0] != K or pre.shape != (M, N):
        raise ValueError(
            f"gelu_grad: grad_out {tuple(grad_out.shape)}, weight {tuple(weight.shape)} and pre {tuple(pre.shape)} "
            "do not match ([M, K], [K, N], [M, N])"
        )
    grad_out, weight, pre = grad_out.contiguous(), weight.contiguous(), pre.contiguous()
    grad_pre = torch.empty_like(pre)
    if not (_device_info(grad_out.device)[1] and _tma_compatible(grad_out, weight, pre, grad_pre)):
        raise ValueError("gelu_grad: the TMA kernel needs sm_90+ and 16-byte aligned rows")
    grad_b = torch.zeros(N, device=pre.device, dtype=torch.float32) if bias_grad else None
    if M and N:
        if K == 0:
            grad_pre.zero_()
        else:
            key = _grad_key(grad_out, weight, pre, bias_grad, deriv)
            flags = dict(HAS_BIAS=bias_grad, STORE_PRE=False, DERIV=deriv)
            b_arg = grad_b if bias_grad else grad_pre  # never written without bias_grad
            _launch_tma(grad_out, weight, grad_pre, pre, b_arg, flags, config, key, grad=True)
    return grad_pre, None if grad_b is None else grad_b.to(pre.dtype)


def gelu_grad_supported(grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> bool:
    """True when :func:`gelu_grad` runs the Triton kernel: CUDA tensors of one fp16/bf16 dtype on one sm_90+
    device (the kernel is TMA-only), 2-D shapes that match, 16-byte aligned rows; not under the interpreter."""
    if triton is None or TensorDescriptor is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    tensors = (grad_out, weight, pre)
    if not all(t.is_cuda and t.device == pre.device and t.dtype == pre.dtype for t in tensors):
        return False
    if pre.dtype not in _KERNEL_DTYPES or not all(t.dim() == 2 for t in tensors):
        return False
    M, K = grad_out.shape
    if weight.shape[0] != K or pre.shape != (M, weight.shape[1]) or not _device_info(pre.device)[1]:
        return False
    return all((t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def dgelu_path_runs(
    x: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor | None, down_weight: torch.Tensor
) -> bool:
    """Whether a GELU MLP's training forward and backward both run their Triton kernels, the backward's TMA one
    included (``linear_gelu_dgelu`` then ``dgelu_grad``): :func:`linear_gelu_supported` for the up-projection, and
    what :func:`gelu_grad_supported` asks of the down-projection's weight ``[d, hidden]`` and of the tensors the
    backward will have (sm_90+ with Triton's TensorDescriptor, one dtype and device, 16-byte aligned rows). The
    training op stores the GELU's derivative only then; where a torch fallback would multiply by it, it stores
    the pre-activation, so that the fallback stays ATen's own ``gelu_backward``."""
    if not (x.is_cuda and linear_gelu_supported(x, up_weight, up_bias)) or TensorDescriptor is None:
        return False
    if down_weight.dim() != 2 or down_weight.device != x.device or down_weight.dtype != x.dtype:
        return False
    if down_weight.shape != (x.shape[-1], up_weight.shape[0]) or not _device_info(x.device)[1]:
        return False
    return all((n * x.element_size()) % 16 == 0 for n in down_weight.shape)


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when :func:`linear_gelu` runs the Triton kernel for these tensors (else it runs the torch fallback).

    Needs Triton (not the interpreter), CUDA tensors on one device, fp16 or bf16 for both ``x`` and ``weight``,
    ``weight`` 2-D with ``weight.shape[1] == x.shape[-1]``, and ``bias`` (if any) 1-D of length ``weight.shape[0]``
    on that device. Grad mode does not matter: the kernel path has a backward.
    """
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if not (x.is_cuda and weight.is_cuda and x.device == weight.device):
        return False
    if x.dtype not in _KERNEL_DTYPES or weight.dtype != x.dtype:
        return False
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return False
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.device != x.device):
        return False
    return True


@torch.library.custom_op("dinov3_packing::linear_gelu", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(x @ weight.T + bias), pre)`` over any leading dims of ``x``; ``pre`` is the pre-activation
    ``x @ weight.T + bias`` in x's dtype when ``save_pre`` (the backward's input), else an empty tensor. The Triton
    kernel where :func:`linear_gelu_supported` (one launch writes both), else the torch ops."""
    out_shape = (*x.shape[:-1], weight.shape[0])
    if not linear_gelu_supported(x, weight, bias):
        pre = F.linear(x, weight, bias)
        return F.gelu(pre), pre if save_pre else x.new_empty(0)
    pre = x.new_empty(out_shape) if save_pre else x.new_empty(0)
    pre_out = pre.view(-1, weight.shape[0]) if save_pre else None
    y = launch_linear_gelu(x.reshape(-1, x.shape[-1]), weight, bias, pre_out=pre_out)
    return y.reshape(out_shape), pre


@_linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, save_pre: bool):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, torch.empty_like(y) if save_pre else x.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, save_pre = inputs
    ctx.save_pre, ctx.has_bias = save_pre, bias is not None
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y: torch.Tensor, _grad_pre: torch.Tensor | None):
    """Gradients from the saved pre-activation: ``grad_pre = grad_y * gelu'(pre)`` with the exact erf derivative
    (ATen's ``gelu_backward``, what ``F.gelu``'s own autograd runs), then the linear's three products."""
    if not ctx.save_pre:
        raise RuntimeError(
            "dinov3_packing::linear_gelu was called with save_pre=False, so it kept no pre-activation for the "
            "backward; call linear_gelu(), which sets it when autograd records"
        )
    x, weight, pre = ctx.saved_tensors
    grad_pre = torch.ops.aten.gelu_backward(grad_y, pre)
    flat = grad_pre.reshape(-1, grad_pre.shape[-1])
    grad_x = grad_pre @ weight if ctx.needs_input_grad[0] else None
    grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dinov3_packing::gelu_grad", mutates_args=())
def _gelu_grad_op(
    grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_pre, grad_bias)``: ``grad_pre = (grad_out @ weight) * gelu'(pre)`` for 2-D ``grad_out [M, K]``,
    ``weight [K, N]``, ``pre [M, N]``, and ``grad_pre.sum(0)`` when ``bias_grad`` (else an empty tensor). The Triton
    kernel (:func:`launch_gelu_grad`) where :func:`gelu_grad_supported`, else the torch ops (a matmul, ATen's
    ``gelu_backward``, a sum: what autograd through the unfused MLP runs)."""
    if gelu_grad_supported(grad_out, weight, pre):
        grad_pre, grad_b = launch_gelu_grad(grad_out, weight, pre, bias_grad)
    else:
        grad_pre = torch.ops.aten.gelu_backward(grad_out @ weight, pre)
        grad_b = grad_pre.sum(0) if bias_grad else None
    return grad_pre, pre.new_empty(0) if grad_b is None else grad_b


@_gelu_grad_op.register_fake
def _(grad_out: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, bias_grad: bool):
    return torch.empty_like(pre), pre.new_empty(pre.shape[1] if bias_grad else 0)


@torch.library.custom_op("dinov3_packing::linear_gelu_dgelu", mutates_args=())
def _linear_gelu_dgelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(v), gelu'(v))`` for the pre-activation ``v = x @ weight.T + bias`` (exact erf GELU and derivative,
    both rounded once to x's dtype from fp32), over any leading dims of ``x``: the training forward of the MLP's
    up-projection whose backward (``dgelu_grad``) then only multiplies by the stored derivative. One launch of the
    Triton kernel where :func:`linear_gelu_supported`, else the torch ops (``F.gelu`` and ATen's ``gelu_backward``
    of a unit gradient, which times a gradient is bit for bit ``gelu_backward`` of that gradient). No autograd of
    its own: the training op ``gelu_mlp`` (``ops/mlp.py``) calls it inside its forward."""
    if not linear_gelu_supported(x, weight, bias):
        pre = F.linear(x, weight, bias)
        return F.gelu(pre), torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
    out_shape = (*x.shape[:-1], weight.shape[0])
    dgelu = x.new_empty(out_shape)
    y = launch_linear_gelu(
        x.reshape(-1, x.shape[-1]), weight, bias, pre_out=dgelu.view(-1, weight.shape[0]), deriv=True
    )
    return y.reshape(out_shape), dgelu


@_linear_gelu_dgelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, torch.empty_like(y)


@torch.library.custom_op("dinov3_packing::dgelu_grad", mutates_args=())
def _dgelu_grad_op(
    grad_out: torch.Tensor, weight: torch.Tensor, dgelu: torch.Tensor, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_pre, grad_bias)`` as ``gelu_grad`` computes them, from the stored derivative ``dgelu = gelu'(pre)``
    (``linear_gelu_dgelu``) instead of the pre-activation: ``grad_pre = (grad_out @ weight) * dgelu``, whose
    epilogue is a product (no erf), and ``grad_pre.sum(0)`` when ``bias_grad`` (else an empty tensor). The Triton
    kernel (:func:`launch_gelu_grad` with ``deriv``) where :func:`gelu_grad_supported`, else the torch ops."""
    if gelu_grad_supported(grad_out, weight, dgelu):
        grad_pre, grad_b = launch_gelu_grad(grad_out, weight, dgelu, bias_grad, deriv=True)
    else:
        grad_pre = (grad_out @ weight) * dgelu
        grad_b = grad_pre.sum(0) if bias_grad else None
    return grad_pre, dgelu.new_empty(0) if grad_b is None else grad_b


@_dgelu_grad_op.register_fake
def _(grad_out: torch.Tensor, weight: torch.Tensor, dgelu: torch.Tensor, bias_grad: bool):
    return torch.empty_like(dgelu), dgelu.new_empty(dgelu.shape[1] if bias_grad else 0)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU), fused into one Triton GEMM where it can be.

    Takes the custom op ``torch.ops.dinov3_packing.linear_gelu`` (opaque to ``torch.compile``, with a backward) for
    CUDA fp16/bf16; when autograd records, the kernel also stores the pre-activation for the backward. Falls back to
    the torch ops when :func:`linear_gelu_supported` is False.
    """
    if not linear_gelu_supported(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return torch.ops.dinov3_packing.linear_gelu(x, weight, bias, needs_grad)[0]
