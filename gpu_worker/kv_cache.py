"""Sizing and allocating the paged KV cache from measured free memory.

Layout: one tensor [layers, 2 (k/v), num_blocks, block_size, kv_heads, head_dim]. Each layer's K
and V are contiguous [num_blocks, block_size, kv_heads, head_dim] views (what attention kernels
want), and all of a block's data is addressable with one index on dim 2, which is how a later
issue gathers blocks to send them to another worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.model_files.model_config import ModelConfig

DEFAULT_UTILIZATION = {"cuda": 0.9, "cpu": 0.1}


class KVCacheSizeError(ValueError):
    """There is not enough memory for even a minimal cache."""


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def activation_reserve_bytes(cfg: ModelConfig, max_tokens: int, max_seqs: int, dtype: torch.dtype) -> int:
    """A generous bound on one step's transient memory: layer activations and float32 logits."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (cfg.hidden_size * 4 + cfg.q_size + 2 * cfg.kv_size + cfg.intermediate_size * 3) * elem
    logits = max_seqs * cfg.vocab_size * 4 * 4  # logits, softmax, sort buffers
    return max_tokens * per_token + logits


def available_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: CUDA from the driver, CPU from /proc/meminfo."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    return info.get("MemAvailable", info.get("MemFree", 0)), info["MemTotal"]


def graph_reserve_bytes(cfg: ModelConfig, max_batch: int, dtype: torch.dtype) -> int:
    """A bound on the CUDA-graph pool: one decode step's activations at the largest bucket, and
    every bucket's float32 logits output (kept alive per graph; they sum to < 2x the largest)."""
    return activation_reserve_bytes(cfg, max_batch, 0, dtype) + 2 * max_batch * cfg.vocab_size * 4


def measure_peak_bytes(device: torch.device, run) -> int:
    """Peak CUDA memory `run()` allocates beyond what is already allocated; its caches are
    returned to the driver afterwards, so the free memory the cache is sized from is true."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return int(peak)


@dataclass
class KVCachePlan:
    num_blocks: int
    block_bytes: int
    budget_bytes: int


def plan_kv_cache(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    utilization: float | None,
    num_blocks_override: int | None,
    reserve_bytes: int,
) -> KVCachePlan:
    """How many blocks fit. Called after the weights are loaded, so they are already counted.

    CUDA: utilization * total - memory already in use - reserve (vLLM's meaning); the runner's
    reserve there is a measured forward of a full token budget plus the sampler and the CUDA
    graphs' pool (captured after the cache exists, so it is reserved ahead).
    CPU: utilization * available RAM - reserve (the weights are outside `available` already).
    """
    block_bytes = bytes_per_block(cfg, block_size, dtype)
    if num_blocks_override is not None:
        return KVCachePlan(num_blocks_override, block_bytes, num_blocks_override * block_bytes)
    util = utilization if utilization is not None else DEFAULT_UTILIZATION[device.type]
    free, total = available_memory(device)
    if device.type == "cuda":
        budget = int(util * total) - (total - free) - reserve_bytes
    else:
        budget = int(util * free) - reserve_bytes
    num_blocks = budget // block_bytes
    if num_blocks < 2:
        raise KVCacheSizeError(
            f"no room for the KV cache on {device}: budget {budget / 2**20:.0f} MiB "
            f"(free {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB, utilization {util}); "
            "raise --memory-utilization or set --num-kv-blocks"
        )
    return KVCachePlan(int(num_blocks), block_bytes, budget)


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The cache tensor and per-layer (k, v) views."""
    cache = torch.zeros(
        cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
        device=device, dtype=dtype,
    )
    return cache, [(cache[i, 0], cache[i, 1]) for i in range(cfg.num_hidden_layers)]
