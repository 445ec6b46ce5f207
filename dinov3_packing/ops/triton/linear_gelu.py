"""Fused ``gelu(x @ weight.T + bias)``: one Triton matmul with bias and exact (erf) GELU in the epilogue.

The MLP's first projection (``fc1`` then GELU) is one GEMM followed by an elementwise kernel that reads and
writes the whole ``[M, 4*D]`` activation once more. Here the GEMM accumulates in fp32 and applies the bias and
the exact erf GELU (``F.gelu(..., approximate="none")``, not the tanh approximation) to the fp32 accumulator
before the single store in ``x.dtype``, so the pre-activation never touches device memory.

Kernels (both grouped tile order for L2 reuse, fp32 accumulation, fp32 epilogue):

- ``_linear_gelu_tma_kernel``: persistent (one program per SM), TMA descriptors for x / weight / y, the loop over
  tiles flattened with the K loop so the next tile's loads are in flight during the epilogue, epilogue split in
  two column halves. Hopper (sm_90) and newer; needs 16-byte aligned rows (K and N multiples of 8 for 2-byte
  dtypes) and base pointers. Tails in M, N and K are handled by the descriptors (zero fill, clipped stores).
- ``_linear_gelu_ptr_kernel``: plain pointer loads with masks; any strides / tails; pre-Hopper GPUs.

The erf is a branch-free polynomial, ``erf(u) = sign(u) * (1 - 2**(-t * Q(t)))``, ``t = min(|u|, 4)``, ``Q`` of
degree 8 fitted for absolute error: |error| < 1e-7 in exact arithmetic, ~2.5e-7 with the GPU's ``ex2.approx``,
the size of fp32 ``erff``'s own rounding near 1 (GELU's ``1 + erf`` makes absolute error the one that matters; the
resulting GELU is within 5e-7 absolute of the fp64 truth, as is torch's fp32 ``F.gelu``). It replaced
``tl.math.erf`` (libdevice ``erff``, two divergent branches), which measured 0.13 ms slower on the
M=60038, K=1024, N=4096 bf16 shape, nearly all of the gain over cuBLAS + ``F.gelu`` (0.135 ms); ``erf="libdevice"`` in
:func:`launch_linear_gelu` still selects it.

The default (``erf="fold"``) folds the 1/sqrt(2) and the 1/2 into the same polynomial's coefficients and
exponent: ``gelu(v) = relu(v) - t' * 2**-(t' * Q'(t') + 1)``, ``t' = min(|v|, 4 * sqrt(2))``. Per element that is
10 FMAs, 2 min/max and one ex2 with no compare, select or extra multiplies (13 fp32 instructions and one ex2
against 18 and one for ``erf="poly"``, read from the sm_90 SASS), and it lands closer to the fp64 truth (2.4e-7
against 4.5e-7 absolute over [-14, 14] and out to +-1e4). On the H100 it took the fused kernel from 0.191 to
0.177 ms at ViT-S's shape and from 0.555 to 0.536 ms at ViT-B's; at ViT-L's the two forms were within that run's
spread (0.86-0.95 ms across configs), and end to end it took the compiled ViT-L mixed-64 forward from 92.05 to
90.63 ms, medians of 40 interleaved calls (``benchmarks/results/kernel_variants_h100.jsonl``; timed with ``|v|``
as the last factor, which compiles to the same instructions). A rerun of the committed form on another H100
(``kernel_variants_h100_gemm_0399248.jsonl``) had it ahead at ViT-L's shape in all three configs, by 3-9%. Bias
loads are unmasked when ``N`` is a multiple of the block width.

Measured with :func:`benchmark_linear_gelu` (one H100 80GB HBM3, torch 2.11, Triton 3.6, bf16, medians in ms;
cuBLAS alone varied 0.65-0.78 ms across runs on the first shape):

=====================  ========  ======  ==============  =====  =======
M, K, N                F.linear  F.gelu  linear + gelu   fused  speedup
=====================  ========  ======  ==============  =====  =======
60038, 1024, 4096      0.776     0.348   1.068           0.933  1.14
60038, 384, 1536       0.127     0.134   0.258           0.243  1.06
60038, 768, 3072       0.451     0.264   0.691           0.572  1.21
60038, 1280, 5120      1.151     0.442   1.543           1.530  1.01
30000, 4096, 16384     5.837     0.691   6.530           5.840  1.12
10007, 1024, 4096      0.121     0.062   0.180           0.156  1.15
=====================  ========  ======  ==============  =====  =======

Public API:

- :func:`linear_gelu` ``(x, weight, bias=None)``: the fused kernel on CUDA fp16/bf16 inference, else
  ``F.gelu(F.linear(x, weight, bias))`` (CPU, other dtypes, or autograd needed).
- :func:`linear_gelu_supported` ``(x, weight, bias=None)``: whether :func:`linear_gelu` takes the kernel path.
- ``torch.ops.dinov3_packing.linear_gelu``: the same as an opaque custom op (no autograd) that ``torch.compile``
  keeps as one call; its fake implementation only allocates the output.
- :func:`launch_linear_gelu`: the raw launcher (explicit config or autotune; also runs under ``TRITON_INTERPRET=1``).
- :func:`benchmark_linear_gelu`: cuBLAS + GELU against the fused kernel on a CUDA device, with errors.

Triton versions: only APIs present in both Triton 3.6 and 3.8 (``tl.dot``, ``tl.range(..., flatten=True)``,
tensor-descriptor ``load`` / ``store`` with host-side ``triton.tools.tensor_descriptor.TensorDescriptor``,
``tl.exp2``, ``tl.math.erf``, ``triton.autotune`` with ``pre_hook``); no ``libdevice`` import. Measured on an
H100 with torch 2.11 / Triton 3.6; interpreter-tested with Triton 3.8.
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
    "CONFIGS",
    "PTR_CONFIGS",
    "benchmark_linear_gelu",
    "launch_linear_gelu",
    "linear_gelu",
    "linear_gelu_reference",
    "linear_gelu_supported",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)

# TMA persistent kernel, measured on H100 (bf16, M=60038): 128x256x64 with a split epilogue leads for K=1024
# (0.86-0.93 ms, 4 stages; GROUP_M 4 or 16 and 3 stages within the run-to-run spread) and K=384 (0.18 ms);
# 128x128x64 is the alternative for narrow N (benchmarks/results/kernel_variants_h100.jsonl). Keyed on (N, K)
# only: the token count M varies per batch and must not trigger a re-tune. 128x256x64 at 4 stages = 192 KB of
# shared memory.
CONFIGS: list[dict] = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=False, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, EPI_SUBTILE=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, EPI_SUBTILE=True, num_warps=8, num_stages=4),
]
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
    def _erf_poly(u):
        """erf(u) = sign(u) * (1 - 2**(-t * Q(t))), t = min(|u|, 4); |error| < 1e-7 (fit for absolute error)."""
        t = tl.minimum(tl.abs(u), 4.0)
        q = -1.1604264727793634e-05
        q = q * t + 0.00015295868797693402
        q = q * t - 0.0008482105331495404
        q = q * t + 0.002274733269587159
        q = q * t - 8.474061178276315e-05
        q = q * t - 0.02772452123463154
        q = q * t + 0.1483079344034195
        q = q * t + 0.9184429049491882
        q = q * t + 1.6279072761535645
        r = 1.0 - tl.exp2(-t * q)
        return tl.where(u < 0, -r, r)

    @triton.jit
    def _gelu_folded(v):
        """Exact GELU of an fp32 tensor with the erf polynomial folded in (``erf="fold"``).

        With E = 2**(-t * Q(t)) (the polynomial of :func:`_erf_poly`, 1 - |erf|), GELU is v - v * E / 2 for
        v >= 0 and v * E / 2 below, i.e. ``relu(v) - t' * 2**(-(t' * Q'(t') + 1))`` with ``t' = min(|v|, 4 * sqrt(2))``
        and ``Q'_k = Q_k * 2**(-(k + 1) / 2)`` (the 1/sqrt(2) and the 1/2 moved into the polynomial and the
        exponent): one min, 8 FMAs, one more FMA, one ex2, one max and one FMA per element, no compare or
        select. The last factor is t', not |v|: equal up to 4 * sqrt(2), and beyond it E has stopped at
        ~7.9e-9, so |v| * E would grow without bound in the negative tail (-7.9e-5 at v = -1e4, and NaN at
        v = +inf) while t' * E stays below 4.5e-8.
        """
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
        e = tl.exp2(-(q * t + 1.0))
        return tl.maximum(v, 0.0) - t * e

    @triton.jit
    def _gelu_f32(v, GELU: tl.constexpr):
        """Exact GELU 0.5 * v * (1 + erf(v / sqrt(2))) of an fp32 tensor; GELU: 0 libdevice erf, 1 erf
        polynomial, 2 the folded form."""
        if GELU == 2:
            return _gelu_folded(v)
        u = v * 0.7071067811865476
        if GELU == 1:
            e = _erf_poly(u)
        else:
            e = tl.math.erf(u)
        return 0.5 * v * (1.0 + e)

    @triton.jit
    def _bias_gelu(acc, b_ptr, offs_n, N, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EVEN_N: tl.constexpr):
        if HAS_BIAS:
            if EVEN_N:  # no column tail: unmasked loads (no per-element compare and predicate)
                bias = tl.load(b_ptr + offs_n).to(tl.float32)
            else:
                bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        return _gelu_f32(acc, GELU)

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
    def _linear_gelu_tma_kernel(
        x_desc,
        w_desc,
        y_desc,
        b_ptr,
        M,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EPI_SUBTILE: tl.constexpr,
        NUM_SMS: tl.constexpr,
    ):
        """Persistent: program p handles tiles p, p + NUM_SMS, ...; y = gelu(x @ w^T + b) through TMA."""
        start_pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        num_pid_in_group = GROUP_M * num_pid_n
        # The epilogue recomputes its tile from its own counter (the flattened loop pipelines the loads of the
        # next tile across this one's epilogue).
        tile_id_c = start_pid - NUM_SMS
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_desc.load([off_m, ki * BLOCK_K])
                b = w_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc)

            tile_id_c += NUM_SMS
            pid_m, pid_n = _tile_pid(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if EPI_SUBTILE:
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                offs0 = off_n + tl.arange(0, BLOCK_N // 2)
                y0 = _bias_gelu(acc0, b_ptr, offs0, N, HAS_BIAS, GELU, EVEN_N)
                y_desc.store([off_m, off_n], y0.to(y_desc.dtype))
                y1 = _bias_gelu(acc1, b_ptr, offs0 + BLOCK_N // 2, N, HAS_BIAS, GELU, EVEN_N)
                y_desc.store([off_m, off_n + BLOCK_N // 2], y1.to(y_desc.dtype))
            else:
                y = _bias_gelu(acc, b_ptr, off_n + tl.arange(0, BLOCK_N), N, HAS_BIAS, GELU, EVEN_N)
                y_desc.store([off_m, off_n], y.to(y_desc.dtype))

    @triton.jit
    def _linear_gelu_ptr_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """y[M, N] = gelu(x[M, K] @ w[N, K]^T + b[N]); unit stride along K for x and w, along N for y."""
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

        acc = _bias_gelu(acc, b_ptr, offs_n, N, HAS_BIAS, GELU, False)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _set_desc_blocks(nargs: dict) -> None:
        """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]
        nargs["y_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SUBTILE"] else bn]

    def _triton_config(c: dict, pre_hook=None) -> triton.Config:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=pre_hook)

    _tma_autotuned = triton.autotune(configs=[_triton_config(c, _set_desc_blocks) for c in CONFIGS], key=["N", "K"])(
        triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})(_linear_gelu_tma_kernel)
    )
    _ptr_autotuned = triton.autotune(configs=[_triton_config(c) for c in PTR_CONFIGS], key=["N", "K"])(
        triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_linear_gelu_ptr_kernel)
    )


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
# directly, which skips the autotuner's per-call bookkeeping (25 us of host time per call on the H100's host,
# benchmarks/results/host_overhead_h100.json). The key holds everything the autotuner keys on (N, K and the
# dtype of every tensor argument) plus the bias flag, erf form and device, so the choice is the one it would
# make. The pointer kernel (unaligned or pre-Hopper) keeps the autotuner.
_TUNED_TMA: dict[tuple, dict] = {}
_TUNING_LOCK = threading.Lock()


# The `erf` argument of the launcher: the kernel's GELU constexpr.
_GELU_FORMS = {"libdevice": 0, "poly": 1, "fold": 2}
DEFAULT_ERF = "fold"


def _tma_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, erf: str) -> tuple:
    bias_dtype = None if bias is None else bias.dtype
    return (weight.shape[0], x.shape[1], x.dtype, weight.dtype, bias_dtype, erf, x.device)


def launch_linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    *,
    kernel: str = "auto",
    erf: str | None = None,
) -> torch.Tensor:
    """Run the Triton kernel on a 2-D ``x [M, K]``, ``weight [N, K]``, ``bias [N]`` or None; returns ``[M, N]``.

    ``kernel``: "tma" (persistent TMA kernel), "ptr" (pointer kernel) or "auto" (TMA when the device has it and
    the tensors are 16-byte aligned, else pointer). ``config``: one entry of :data:`CONFIGS` (TMA) or
    :data:`PTR_CONFIGS` (pointer; BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, optional num_warps / num_stages) runs that
    configuration; None autotunes over the list (keyed on N and K). ``erf``: "fold" (the default,
    :data:`DEFAULT_ERF`), "poly" or "libdevice" (``tl.math.erf``); see the module docstring. No dtype / device
    policy here: callers go through :func:`linear_gelu` or the custom op. Under ``TRITON_INTERPRET=1`` this runs on
    CPU tensors (pass ``config``).
    """
    if triton is None:
        raise RuntimeError("linear_gelu kernel needs Triton, which is not installed")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    erf = DEFAULT_ERF if erf is None else erf
    if kernel not in ("auto", "tma", "ptr") or erf not in _GELU_FORMS:
        raise ValueError(f"linear_gelu: kernel={kernel!r}, erf={erf!r}")
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
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(linear_gelu_reference(x, weight, bias))
    b_arg = bias if bias is not None else y  # never read when HAS_BIAS is False
    flags = dict(HAS_BIAS=bias is not None, GELU=_GELU_FORMS[erf])

    num_sms, has_tma = _device_info(x.device)
    use_tma = TensorDescriptor is not None and has_tma and _tma_compatible(x, weight, y)
    if kernel == "tma" and not use_tma:
        raise ValueError("linear_gelu: the TMA kernel needs Triton >= 3.4, sm_90+ and 16-byte aligned rows")
    if kernel == "ptr":
        use_tma = False

    if use_tma:
        key = _tma_key(x, weight, bias, erf)
        if config is None and key in _TUNED_TMA:
            config = _TUNED_TMA[key]
        c = dict(config or CONFIGS[0])  # block shapes for the descriptors; the autotuner's pre-hook resets them
        bn_store = c["BLOCK_N"] // 2 if c.get("EPI_SUBTILE") else c["BLOCK_N"]
        x_desc = TensorDescriptor.from_tensor(x, [c["BLOCK_M"], c["BLOCK_K"]])
        w_desc = TensorDescriptor.from_tensor(weight, [c["BLOCK_N"], c["BLOCK_K"]])
        y_desc = TensorDescriptor.from_tensor(y, [c["BLOCK_M"], bn_store])

        def grid(meta):
            return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

        args = (x_desc, w_desc, y_desc, b_arg, M, N, K)
        if config is None:
            with _TUNING_LOCK:  # `best_config` is the autotuner's last choice: read it before another launch
                _tma_autotuned[grid](*args, **flags, NUM_SMS=num_sms)
                best = _tma_autotuned.best_config
                _TUNED_TMA[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        else:
            _linear_gelu_tma_kernel[grid](*args, **flags, EVEN_N=N % c["BLOCK_N"] == 0, NUM_SMS=num_sms, **c)
        return y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (x, weight, b_arg, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0))
    if config is None:
        _ptr_autotuned[grid](*args, **flags)
    else:
        c = {k: v for k, v in config.items() if k != "EPI_SUBTILE"}
        _linear_gelu_ptr_kernel[grid](*args, **flags, EVEN_K=K % c["BLOCK_K"] == 0, **c)
    return y


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when :func:`linear_gelu` runs the Triton kernel for these tensors (else it runs the torch fallback).

    Needs Triton (not the interpreter), CUDA tensors on one device, fp16 or bf16 for both ``x`` and ``weight``,
    ``weight`` 2-D with ``weight.shape[1] == x.shape[-1]``, and ``bias`` (if any) 1-D of length ``weight.shape[0]``
    on that device. Autograd is not considered here; :func:`linear_gelu` checks it separately.
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
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` over any leading dims of ``x``; the Triton kernel where supported."""
    if not linear_gelu_supported(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    lead = x.shape[:-1]
    y = launch_linear_gelu(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*lead, weight.shape[0])


@_linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU), fused into one Triton GEMM where it can be.

    Takes the custom op ``torch.ops.dinov3_packing.linear_gelu`` (opaque to ``torch.compile``) for CUDA fp16/bf16
    inference; falls back to the torch ops when autograd would need a graph (grad enabled and any input
    requiring grad: the op has no backward), or when :func:`linear_gelu_supported` is False.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad or not linear_gelu_supported(x, weight, bias):
        return linear_gelu_reference(x, weight, bias)
    return torch.ops.dinov3_packing.linear_gelu(x, weight, bias)


def benchmark_linear_gelu(
    M: int = 60038, K: int = 1024, N: int = 4096, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """Time cuBLAS ``F.linear``, ``F.gelu``, both in sequence, and the fused kernel; report the kernel's error.

    Medians of ``triton.testing.do_bench`` in ms; TFLOP/s of the GEMM (2*M*N*K) for the linear and fused
    timings; the autotuned config, also timed with ``erf="libdevice"``. Errors: max abs and max relative (to
    max |ref|) difference of the kernel against the fp32 reference ``F.gelu(F.linear(x.float(), w.float(),
    b.float()))`` and against the unfused ``dtype`` torch path (whose own error against fp32 is reported
    alongside). Needs a CUDA device. The first kernel call autotunes.
    """
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("benchmark_linear_gelu needs CUDA and Triton")
    from triton.testing import do_bench

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    # nn.Linear-like scale: unit-variance activations, weights and bias ~ U(-1/sqrt(K), 1/sqrt(K)).
    x = torch.randn(M, K, device=dev, dtype=torch.float32, generator=gen).to(dtype)
    w = ((torch.rand(N, K, device=dev, dtype=torch.float32, generator=gen) * 2 - 1) / K**0.5).to(dtype)
    b = ((torch.rand(N, device=dev, dtype=torch.float32, generator=gen) * 2 - 1) / K**0.5).to(dtype)

    with torch.inference_mode():
        out = linear_gelu(x, w, b)  # autotunes once
        torch.cuda.synchronize()
        use_tma = TensorDescriptor is not None and _device_info(dev)[1] and _tma_compatible(x, w, out)
        if use_tma:
            # The config this shape launches (the autotuner's `best_config` belongs to whichever shape it
            # tuned last, and a cached key does not run the autotuner at all).
            best_cfg = dict(_TUNED_TMA[_tma_key(x, w, b, DEFAULT_ERF)])
        else:
            best = _ptr_autotuned.best_config
            best_cfg = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        h = F.linear(x, w, b)
        ms_linear = do_bench(lambda: F.linear(x, w, b), return_mode="median")
        ms_gelu = do_bench(lambda: F.gelu(h), return_mode="median")
        ms_unfused = do_bench(lambda: linear_gelu_reference(x, w, b), return_mode="median")
        ms_fused = do_bench(lambda: linear_gelu(x, w, b), return_mode="median")
        ms_libdevice = do_bench(lambda: launch_linear_gelu(x, w, b, best_cfg, erf="libdevice"), return_mode="median")

        ref32 = linear_gelu_reference(x.float(), w.float(), b.float())
        ref_lp = linear_gelu_reference(x, w, b)

    def errs(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        d = (got.float() - ref.float()).abs().max().item()
        return d, d / ref.float().abs().max().item()

    abs32, rel32 = errs(out, ref32)
    abs_lp, rel_lp = errs(out, ref_lp)
    torch_abs32, torch_rel32 = errs(ref_lp, ref32)
    flops = 2.0 * M * N * K
    return {
        "shape_MKN": (M, K, N),
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ms_cublas_linear": ms_linear,
        "ms_gelu": ms_gelu,
        "ms_linear_then_gelu": ms_unfused,
        "ms_fused": ms_fused,
        "ms_fused_libdevice_erf": ms_libdevice,
        "tflops_cublas_linear": flops / ms_linear * 1e-9,
        "tflops_fused": flops / ms_fused * 1e-9,
        "speedup_vs_unfused": ms_unfused / ms_fused,
        "fused_vs_fp32_max_abs": abs32,
        "fused_vs_fp32_max_rel": rel32,
        "fused_vs_torch_max_abs": abs_lp,
        "fused_vs_torch_max_rel": rel_lp,
        "torch_vs_fp32_max_abs": torch_abs32,
        "torch_vs_fp32_max_rel": torch_rel32,
        "best_config": best_cfg,
    }
