"""Which kernel each decode-sized matrix product runs, measured on the device at start-up.

A decode step multiplies a few rows by every weight; its cost is reading the weights. The vendor
library is not equally good at every shape, nor are its two front ends: on an H200 at
Llama-3.1-8B shapes (tests/benchmarks/gpu_gemm.py) cuBLAS's M = 16 gate/up product took 61.5 us
where the Triton split-K kernel (triton_kernels.skinny_matmul) took 57.4, and its M = 64 down
product 36.3 us where cuBLASLt's heuristics picked a kernel that took 31.6, while other
(shape, M) pairs favour plain cuBLAS. So each distinct weight shape and each batch bucket up to
MAX_ROWS is timed once: torch's F.linear (cuBLAS) against F.linear through cuBLASLt and a few
skinny-kernel configs, as CUDA-graph replays over several layers' weights (no L2 reuse, as in a
real step), and another choice is kept only where it is faster by device_timing.MARGIN and agrees with
F.linear. Larger M stays with cuBLAS, which is compute-bound there and good at it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker.device_timing import pick, replay_seconds

log = logging.getLogger(__name__)

MAX_ROWS = 64
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# (block_n, block_k, num_warps, num_stages, split): the configs that won some shape on the H200
CONFIGS = ((64, 128, 4, 5, 1), (32, 128, 4, 3, 1), (32, 256, 4, 5, 1), (64, 128, 4, 3, 4), (64, 128, 4, 5, 2))


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split: int

    def run(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from gpu_worker.triton_kernels.skinny_matmul import skinny_matmul

        return skinny_matmul(x, w, block_n=self.block_n, block_k=self.block_k, split=self.split,
                             num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class CublasLt:
    """F.linear through cuBLASLt (torch's preferred BLAS library, set for this call only; a CUDA
    graph captured around it keeps the kernel that was chosen)."""

    def run(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return F.linear(x, w)
        finally:
            torch.backends.cuda.preferred_blas_library(before)


MatmulChoice = SkinnyConfig | CublasLt


def bucket_of(rows: int) -> int | None:
    """The smallest bucket holding `rows` (None past MAX_ROWS)."""
    return next((b for b in BUCKETS if b >= rows), None)


def choose(weights: list[torch.Tensor]) -> dict[int, MatmulChoice]:
    """For one weight shape (several layers' copies): bucket -> what to run there instead of
    cuBLAS (buckets missing from the result stay with F.linear)."""
    n, k = weights[0].shape
    chosen: dict[int, MatmulChoice] = {}
    candidates: list[MatmulChoice] = [CublasLt()]
    candidates += [SkinnyConfig(*values) for values in CONFIGS if values[4] * values[1] <= k]
    for rows in BUCKETS:
        x = torch.randn(rows, k, device=weights[0].device, dtype=weights[0].dtype)
        want = F.linear(x, weights[0]).float()
        cublas = replay_seconds(lambda w: F.linear(x, w), weights)
        timed = []
        for choice in candidates:
            try:
                got = choice.run(x, weights[0]).float()
                if ((got - want).norm() / want.norm().clamp_min(1e-30)).item() > 1e-2:
                    continue
                timed.append((replay_seconds(lambda w, c=choice: c.run(x, w), weights), choice))
            except Exception as exc:  # e.g. a config past the device's shared memory, no cuBLASLt
                log.debug("matmul choice %s at %dx%dx%d failed: %r", choice, rows, n, k, exc)
        best = pick(cublas, timed)
        if best is not None:
            chosen[rows] = best
    return chosen


def tune_linears(linears: list, max_copies: int = 8) -> dict[tuple[int, int], dict[int, MatmulChoice]]:
    """Measure every distinct weight shape among `linears` (gpu_worker.linear.Linear on CUDA,
    unbiased, bf16/fp16) and hand each its choices. Returns them by (N, K) for the log."""
    start = time.perf_counter()
    by_shape: dict[tuple[int, int], list] = {}
    for op in linears:
        if op.weight.is_cuda and op.bias is None and op.weight.dtype in (torch.bfloat16, torch.float16):
            by_shape.setdefault(tuple(op.weight.shape), []).append(op)
    result = {}
    for shape, ops in by_shape.items():
        result[shape] = choose([op.weight for op in ops[:max_copies]])
        for op in ops:
            op.small_batch = result[shape]
    log.info("decode matrix products (shape: {rows bucket: choice}), cuBLAS elsewhere: %s (%.1f s)",
             {f"{n}x{k}": {rows: describe(c) for rows, c in sorted(choices.items())}
              for (n, k), choices in result.items()}, time.perf_counter() - start)
    return result


def describe(choice: MatmulChoice) -> str:
    if isinstance(choice, CublasLt):
        return "cublaslt"
    return (f"skinny(n{choice.block_n},k{choice.block_k},w{choice.num_warps},s{choice.num_stages},"
            f"split{choice.split})")
