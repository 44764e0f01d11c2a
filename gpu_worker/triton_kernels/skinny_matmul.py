"""y = x @ w.T for a few rows of x: the matrix products of a decode step, split over K.

A decode step of an 8B model multiplies a handful of rows by every weight matrix, so its cost
is reading the weights once: 15 GB per step. What matters is keeping enough loads in flight on
every multiprocessor. Each program reads a [BLOCK_N, BLOCK_K] stripe of the weight after
another along its share of K (coalesced: K is the contiguous dimension of a [N, K] weight) and
multiplies it with the same columns of x, padded to M_PAD rows for the tensor cores. When
N / BLOCK_N programs would not fill the GPU a few times, K is split over SPLIT programs; their
float32 partial sums go to a [SPLIT, M, N] buffer and a second small kernel adds them up in a
fixed order (deterministic, unlike atomics) and rounds to the output dtype.

Whether this beats the vendor library for a given (M, N, K) is measured on the device
(tests/benchmarks/gpu_gemm.py); `gpu_worker.linear` only routes the shapes where it did.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import dot_precision, pow2


@triton.jit
def _skinny_matmul_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, M_PAD)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    if not HAS_SPLIT:
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + m[:, None]) * N + n[None, :], acc, mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, M, N, stride_om, split, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(split):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + (s * M + row) * N + n, mask=n_ok, other=0.0)
    tl.store(out_ptr + row * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def skinny_matmul(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
    block_n: int = 64, block_k: int = 128, split: int = 1, num_warps: int = 4, num_stages: int = 4,
) -> torch.Tensor:
    """x: [M, K], w: [N, K] (both with a contiguous last dimension) -> [M, N] in x's dtype.

    `split` programs share each column stripe's K (rounded so every share is whole BLOCK_K
    tiles); meant for M up to a few dozen rows, where the product reads w once.
    """
    m_rows, k_dim = x.shape
    n_cols, k_w = w.shape
    if k_w != k_dim:
        raise ValueError(f"x has {k_dim} columns but w has {k_w}")
    if x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("x and w need a contiguous last dimension")
    out = torch.empty((m_rows, n_cols), dtype=x.dtype, device=x.device) if out is None else out
    if m_rows == 0:
        return out
    k_per_split = -(-k_dim // (split * block_k)) * block_k
    split = -(-k_dim // k_per_split)  # no empty share
    part = torch.empty((split, m_rows, n_cols), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n_cols, block_n), split)
    _skinny_matmul_kernel[grid](
        x, w, out, part, m_rows, n_cols, k_dim, k_per_split,
        x.stride(0), w.stride(0), out.stride(0),
        M_PAD=pow2(m_rows, 16), BLOCK_N=block_n, BLOCK_K=block_k, HAS_SPLIT=split > 1,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(m_rows, triton.cdiv(n_cols, block))](
            part, out, m_rows, n_cols, out.stride(0), split, BLOCK=block, num_warps=4,
        )
    return out
