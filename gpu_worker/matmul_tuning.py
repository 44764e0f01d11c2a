"""Which kernel each decode-sized matrix product runs, measured on the device at start-up.

A decode step multiplies a few rows by every weight; its cost is reading the weights. The vendor
library is not equally good at every shape: on an H200 at Llama-3.1-8B shapes its M = 16
gate/up product took 61.5 us where the Triton split-K kernel (triton_kernels.skinny_matmul)
took 57.4, and its O and down products lose 1-1.5 us each, while other (shape, M) pairs favour
it (tests/benchmarks/gpu_gemm.py). So each distinct weight shape and each batch bucket up to
MAX_ROWS is timed once: torch's F.linear against a few skinny-kernel configs, as CUDA-graph
replays over several layers' weights (no L2 reuse, as in a real step), and the skinny kernel is
kept only where it is faster by MARGIN and agrees with F.linear. Larger M stays with the vendor
library, which is compute-bound there and good at it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 64
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MARGIN = 0.97  # the skinny kernel must take at most this fraction of the vendor's time
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


def bucket_of(rows: int) -> int | None:
    """The smallest bucket holding `rows` (None past MAX_ROWS)."""
    return next((b for b in BUCKETS if b >= rows), None)


def replay_seconds(fn: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor], reps: int = 7) -> float:
    """Seconds per product: one product per weight captured in a CUDA graph, median replay."""
    for w in weights:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[2:]) / len(weights)


def choose(weights: list[torch.Tensor]) -> dict[int, SkinnyConfig]:
    """For one weight shape (several layers' copies): bucket -> the skinny config to use there
    (buckets missing from the result stay with F.linear)."""
    n, k = weights[0].shape
    chosen: dict[int, SkinnyConfig] = {}
    for rows in BUCKETS:
        x = torch.randn(rows, k, device=weights[0].device, dtype=weights[0].dtype)
        want = F.linear(x, weights[0]).float()
        vendor = replay_seconds(lambda w: F.linear(x, w), weights)
        best: tuple[float, SkinnyConfig] | None = None
        for values in CONFIGS:
            cfg = SkinnyConfig(*values)
            if cfg.split * cfg.block_k > k:
                continue
            try:
                got = cfg.run(x, weights[0]).float()
                if ((got - want).norm() / want.norm().clamp_min(1e-30)).item() > 1e-2:
                    continue
                seconds = replay_seconds(lambda w, cfg=cfg: cfg.run(x, w), weights)
            except Exception as exc:  # e.g. a config past the device's shared memory
                log.debug("skinny config %s at %dx%dx%d failed: %r", values, rows, n, k, exc)
                continue
            if best is None or seconds < best[0]:
                best = (seconds, cfg)
        if best is not None and best[0] <= MARGIN * vendor:
            chosen[rows] = best[1]
    return chosen


def tune_linears(linears: list, max_copies: int = 8) -> dict[tuple[int, int], dict[int, SkinnyConfig]]:
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
            op.skinny = result[shape]
    log.info("decode matrix products: the Triton skinny kernel at %s, the vendor library elsewhere (%.1f s)",
             {f"{n}x{k}": sorted(c) for (n, k), c in result.items()} or "no shape", time.perf_counter() - start)
    return result
