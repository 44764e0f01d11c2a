"""Start-up measurements that choose kernels: time a launch as a CUDA-graph replay, and the rule
that turns timings into a choice. Shared by the matrix-product and decode-attention tunings
(gpu_worker.matmul_tuning, gpu_worker.attention_tuning)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
MARGIN = 0.97  # an alternative must take at most this fraction of the default's time


def replay_seconds(fn: Callable[[Any], Any], inputs: Sequence[Any], reps: int = 7) -> float:
    """Seconds per call of `fn`: one call per input (different memory, so the L2 cache does not
    serve one call what the previous read) captured in a CUDA graph, median replay. Device time
    only, as a captured decode step sees it."""
    for item in inputs:
        fn(item)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for item in inputs:
            fn(item)
    return graph_replay_seconds(graph, reps) / len(inputs)


def graph_replay_seconds(graph: torch.cuda.CUDAGraph, reps: int = 7, warmup: int = 2) -> float:
    """Median seconds of one replay of a captured graph (CUDA events), after `warmup` replays."""
    times = []
    for _ in range(reps + warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[warmup:])


def pick(default_seconds: float, timed: list[tuple[float, T]]) -> T | None:
    """The fastest of the timed alternatives if it takes at most MARGIN x the default's time,
    else None (keep the default). Ties go to the earlier candidate."""
    best = min(timed, key=lambda t: t[0], default=None)
    return best[1] if best is not None and best[0] <= MARGIN * default_seconds else None
