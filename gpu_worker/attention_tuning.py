"""How each CUDA-graph decode step cuts its attention launch, measured on the device at start-up.

The decode kernel (triton_kernels.decode_attention) runs one program per (sequence, KV head,
context split). Its key tile and pipeline depth set each program's shared memory, hence how
many programs a multiprocessor holds at once: at Llama-3.1-8B shapes a 64-key tile with two
stages takes 64 KB, three programs per H200 multiprocessor, so a batch of 64 (512 programs)
runs in 1.3 waves and the second is mostly idle. Which cut is best depends on the GPU and the
batch, not much on the context length (the programs and waves do not depend on it), and each
graph replays one fixed launch. So for every captured batch size the default launch is timed
against a few others at a mid-length context, as CUDA-graph replays over block tables that
scatter over more KV than the L2 cache holds, and another is kept only where it is faster by
device_timing.MARGIN and its output agrees with the default's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from gpu_worker.device_timing import pick, replay_seconds
from gpu_worker.triton_kernels.decode_attention import DecodeLaunch, paged_decode_attention

log = logging.getLogger(__name__)

TILES = ((64, 4, 2), (32, 4, 2), (32, 4, 3), (128, 8, 2))  # (block_n, num_warps, num_stages); first: default
TUNING_CONTEXT = 1024  # keys per sequence while timing (at most the model's context)
MAX_TUNED_BATCH = 256  # larger batches run many waves: the last one's idle share is small
CACHE_BYTES = 2**30  # the temporary keys and values together (the context shrinks to fit)
L2_DEFEAT_BYTES = 256 * 2**20  # the table sets of one timing together read at least this much KV


def candidates(default_splits: int, max_splits: int) -> list[DecodeLaunch]:
    """The default launch first, then the other tiles at the default split count and at twice
    and half of it (within 1..max_splits)."""
    splits = [default_splits] + [s for s in (2 * default_splits, default_splits // 2)
                                 if 1 <= s <= max_splits and s != default_splits]
    out = [DecodeLaunch(default_splits)]
    for n in splits:
        out += [DecodeLaunch(n, *tile) for tile in TILES if DecodeLaunch(n, *tile) not in out]
    return out


def tune_decode_attention(
    backend, sizes: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, block_size: int, max_context: int,
) -> dict[int, DecodeLaunch]:
    """For each CUDA-graph batch size up to MAX_TUNED_BATCH: the launch to capture where one
    beats the default (sets `backend.tuned_decode`, a TritonBackend's). Allocates one temporary
    cache of at most CACHE_BYTES (1 GiB: Llama-3.1-8B shapes, batch 256, 1,024 keys), freed on
    return."""
    start = time.perf_counter()
    sizes = [b for b in sizes if b <= MAX_TUNED_BATCH]
    if not sizes:
        return {}
    chosen = _time_launches(backend, sizes, num_q_heads, num_kv_heads, head_dim, dtype, block_size, max_context)
    torch.cuda.empty_cache()  # the temporary cache went with _time_launches
    backend.tuned_decode = dict(chosen)
    log.info("decode attention (batch: launch), the default elsewhere: %s (%.1f s)",
             {b: f"splits {c.num_splits}, keys {c.block_n}, warps {c.num_warps}, stages {c.num_stages}"
              for b, c in chosen.items()}, time.perf_counter() - start)
    return chosen


def device_seconds(launch: DecodeLaunch, fn: Callable[[torch.Tensor], torch.Tensor],
                   tables: list[torch.Tensor]) -> float:
    """Seconds per launch on the device: `fn` over every table set, replayed from a CUDA graph."""
    return replay_seconds(fn, tables)


def _time_launches(
    backend, sizes: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, block_size: int, max_context: int, timer=device_seconds,
) -> dict[int, DecodeLaunch]:
    """Batch size -> the launch that beat the default by the margin; `timer(launch, fn, tables)`
    gives a launch's seconds per call (on the device: device_seconds)."""
    device = backend.device
    token_bytes = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
    context = max(1, min(TUNING_CONTEXT, max_context - 1, CACHE_BYTES // (max(sizes) * token_bytes)))
    per_seq = -(-context // block_size)
    num_blocks = max(sizes) * per_seq + 1
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    scale = head_dim**-0.5
    chosen: dict[int, DecodeLaunch] = {}
    for batch in sizes:
        kv_bytes = batch * context * token_bytes
        sets = max(1, min((num_blocks - 1) // (batch * per_seq), -(-L2_DEFEAT_BYTES // kv_bytes), 32))
        order = torch.randperm(num_blocks - 1, generator=gen, device=device)[: sets * batch * per_seq] + 1
        tables = list(order.to(torch.int32).view(sets, batch, per_seq).unbind(0))
        q = torch.randn(batch, num_q_heads, head_dim, generator=gen, device=device, dtype=dtype)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        default = DecodeLaunch(backend.decode_splits(batch, max_context))

        def run(launch: DecodeLaunch, table: torch.Tensor) -> torch.Tensor:
            return paged_decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=launch.num_splits,
                                          block_n=launch.block_n, num_warps=launch.num_warps,
                                          num_stages=launch.num_stages)

        want = run(default, tables[0]).float()
        default_seconds = timer(default, lambda t: run(default, t), tables)
        timed = []
        for launch in candidates(default.num_splits, max(64, default.num_splits))[1:]:
            try:
                got = run(launch, tables[0]).float()
                if ((got - want).norm() / want.norm().clamp_min(1e-30)).item() > 1e-2:
                    continue
                timed.append((timer(launch, lambda t, launch=launch: run(launch, t), tables), launch))
            except Exception as exc:  # e.g. a tile past the device's shared memory
                log.debug("decode launch %s at batch %d failed: %r", launch, batch, exc)
        best = pick(default_seconds, timed)
        if best is not None:
            chosen[batch] = best
    return chosen
