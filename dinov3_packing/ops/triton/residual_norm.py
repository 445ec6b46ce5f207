"""The backward of a residual add + LayerNorm with the column sums of its gradients, in one Triton pass.

`residual_norm_backward(g_s, g_y, s, weight, mean, rstd)` is the backward of `s = x + h (+ biases)`,
`y = layer_norm(s)` given the gradient `g_s` that reaches `s` from the residual stream and `g_y` that reaches `y`:

    x_hat = (s - mean) rstd,   g_w = g_y weight
    g = g_s + rstd (g_w - x_hat mean_j(g_w x_hat) - mean_j(g_w))       (the gradient of x and of h)

and four sums over the tokens (rows), fp32 `[4, D]`: of `g` (a bias added into `s`), of `g_s` (a bias added after
`s` on the residual stream, whose gradient reaches `s` unchanged: see `ops.norm`), of `g_y x_hat` (the LayerNorm
weight) and of `g_y` (its bias). Everything in fp32, `g` rounded once to `g_y`'s dtype.

Why a kernel of its own: torch.compile computed `g` in one kernel and each sum in a pass of its own over the
`[tokens, D]` tensors (the two bias gradients were column sums of 0.048 ms a layer each on the H100, ViT-L mixed-64,
seventeenth session's profile); here each program accumulates the four sums over its rows while it computes `g`,
and writes one partial row of each, which a small reduction adds.

Without CUDA (or triton) `residual_norm_backward` computes the same with torch ops (`residual_norm_reference`);
under Triton's CPU interpreter (`TRITON_INTERPRET=1`) `use_kernel=True` runs the kernel on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

LAUNCH: dict = {"rows": 2, "num_warps": 4, "programs_per_sm": 4}
"""Rows a program handles per step (`rows`), its warps, and how many programs per SM share the tokens (each writes
one partial row of each sum). On the H100 (nineteenth session, `benchmarks/fa4_gpu_check.py --parts train-kernels`,
60,038 x 1024 bf16) this launch took 0.201 ms, the best of eight: 4 rows on 8 warps at two programs an SM (the
first choice, from register counts read offline) 0.633 ms, one row on 2 warps at 16 an SM 0.234, inductor's
compiled torch ops for the same outputs 0.451."""


def residual_norm_reference(g_s, g_y, s, weight, mean, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_norm_backward` with torch ops: `(g, sums [4, D] fp32)`."""
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    gy, x, mean, rstd = g_y.to(dt), s.to(dt), mean.to(dt), rstd.to(dt)
    x_hat = (x - mean.view(-1, 1)) * rstd.view(-1, 1)
    gw = gy * weight.to(dt)
    d = s.shape[-1]
    c1 = (gw * x_hat).sum(-1, keepdim=True) / d
    c2 = gw.sum(-1, keepdim=True) / d
    gs = g_s.to(dt) if g_s is not None else torch.zeros_like(gy)
    g = gs + rstd.view(-1, 1) * (gw - x_hat * c1 - c2)
    sums = torch.stack([g.sum(0), gs.sum(0), (gy * x_hat).sum(0), gy.sum(0)])
    return g.to(g_y.dtype), sums


def check_shapes(g_s, g_y, s, weight, mean, rstd) -> None:
    """The shapes `residual_norm_backward` takes; raises ValueError naming the argument."""
    if s.ndim != 2:
        raise ValueError(f"s: expected [tokens, D], got shape {tuple(s.shape)}")
    tokens, d = s.shape
    for name, t in (("g_s", g_s), ("g_y", g_y)):
        if t is not None and (t.shape != s.shape or t.stride(-1) != 1):
            raise ValueError(f"{name}: expected s's shape {tuple(s.shape)} with a unit stride, got {tuple(t.shape)}")
    if s.stride(-1) != 1:
        raise ValueError(f"s: expected a unit stride in D, got strides {s.stride()}")
    if weight.shape != (d,):
        raise ValueError(f"weight: expected [D] = [{d}], got {tuple(weight.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != tokens or t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: expected {tokens} float32 values (one a token), got {tuple(t.shape)} {t.dtype}")


if triton is not None:

    @triton.jit
    def _residual_norm_bwd_kernel(
        GS,
        GY,
        S,
        W,
        MEAN,
        RSTD,
        G,
        PART,
        num_rows,
        rows_per_program,
        stride_gs,
        stride_gy,
        stride_s,
        stride_g,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        HAS_GS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        sum_g = tl.zeros([BLOCK_D], dtype=tl.float32)
        sum_gs = tl.zeros([BLOCK_D], dtype=tl.float32)
        sum_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        sum_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for start in range(0, rows_per_program, ROWS):
            step = start + tl.arange(0, ROWS)
            rows = first + step
            row_mask = (rows < num_rows) & (step < rows_per_program)
            mask = row_mask[:, None] & col_mask[None, :]
            r = rows[:, None]
            gy = tl.load(GY + r * stride_gy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(S + r * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            gw = gy * w[None, :]
            c1 = tl.sum(gw * x_hat, axis=1) / D
            c2 = tl.sum(gw, axis=1) / D
            g = rstd[:, None] * (gw - x_hat * c1[:, None] - c2[:, None])
            if HAS_GS:
                gs = tl.load(GS + r * stride_gs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g += gs
                sum_gs += tl.sum(gs, axis=0)
            g = tl.where(mask, g, 0.0)
            tl.store(G + r * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=mask)
            sum_g += tl.sum(g, axis=0)
            sum_w += tl.sum(gy * x_hat, axis=0)
            sum_b += tl.sum(gy, axis=0)
        part = PART + pid.to(tl.int64) * 4 * D + cols
        tl.store(part, sum_g, mask=col_mask)
        tl.store(part + D, sum_gs, mask=col_mask)
        tl.store(part + 2 * D, sum_w, mask=col_mask)
        tl.store(part + 3 * D, sum_b, mask=col_mask)


def residual_norm_backward(
    g_s: torch.Tensor | None,
    g_y: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(g, sums)` of the module docstring for `s`, `g_y`, `g_s` `[tokens, D]` (`g_s` None: zero), the LayerNorm
    `weight [D]` and the forward's `mean`, `rstd` (one a token; fp32, or fp64 for fp64 inputs, which take torch ops).
    `use_kernel`: None runs the Triton kernel on CUDA tensors and torch ops elsewhere; True forces the kernel (CPU
    tensors only under Triton's interpreter)."""
    check_shapes(g_s, g_y, s, weight, mean, rstd)
    if use_kernel is None:
        use_kernel = s.is_cuda and triton is not None and s.dtype != torch.float64 and mean.dtype == torch.float32
    if not use_kernel:
        return residual_norm_reference(g_s, g_y, s, weight, mean, rstd)
    tokens, d = s.shape
    g = torch.empty_like(g_y)
    if tokens == 0:
        return g, s.new_zeros((4, d), dtype=torch.float32)
    launch = LAUNCH
    sms = torch.cuda.get_device_properties(s.device).multi_processor_count if s.is_cuda else 4
    programs = max(1, min(triton.cdiv(tokens, launch["rows"]), launch["programs_per_sm"] * sms))
    rows_per_program = triton.cdiv(triton.cdiv(tokens, programs), launch["rows"]) * launch["rows"]
    programs = triton.cdiv(tokens, rows_per_program)
    part = s.new_empty((programs, 4, d), dtype=torch.float32)
    _residual_norm_bwd_kernel[(programs,)](
        g_s if g_s is not None else g_y,
        g_y,
        s,
        weight,
        mean,
        rstd,
        g,
        part,
        tokens,
        rows_per_program,
        g_s.stride(0) if g_s is not None else 0,
        g_y.stride(0),
        s.stride(0),
        g.stride(0),
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        ROWS=launch["rows"],
        HAS_GS=g_s is not None,
        num_warps=launch["num_warps"],
    )
    return g, part.sum(0)
