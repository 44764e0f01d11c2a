"""Paged attention over the scheduler's block tables, in plain PyTorch (CPU and CUDA).

The packed batch mixes decode tokens (one query per sequence) and prefill chunks (many). The
metadata splits them into a few groups of similar size (decode and prefill apart, then bucketed
so padding stays small), each served by ONE batched SDPA call over keys gathered from the paged
cache through padded block tables, so no Python loop runs over individual sequences. Grouped-query attention folds the query heads that share a KV head into the query
axis ([B, kv_heads, group*Q, D]), so keys are never repeated. The metadata is built once per
step (numpy for index arithmetic) and shared by every layer.

On CPU the decode sequences can instead go to a C kernel that reads keys and values straight
from the paged cache (gpu_worker.cpu_kernels.paged_decode): decode attention is memory-bound, and
the gather-then-SDPA path moves the context three times. This module is the torch and cpu-c
backends' metadata (gpu_worker.backends.torch_backend); the Triton backend has its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpu_worker.cpu_kernels.paged_decode import DecodeBatch, PagedDecodeKernel
from gpu_worker.step_inputs import TokenLayout, token_layout


@dataclass
class AttentionGroup:
    """Sequences attended together: token_index [B, Q] into the packed batch."""

    token_index: torch.Tensor  # int64 [B, Q] (padding repeats a valid index)
    valid: torch.Tensor | None  # bool [B, Q]; None when every query is valid (decode)
    block_tables: torch.Tensor  # int64 [B, num_blocks]
    mask: torch.Tensor  # bool [B, 1, group*Q, L], True = attend
    out_index: torch.Tensor  # int64 [n_valid]: packed positions of the valid queries


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset) per token
    groups: list[AttentionGroup]
    num_tokens: int
    decode: DecodeBatch | None = None  # decode sequences left to the C kernel, not in groups


def build_attention_metadata(
    num_computed: np.ndarray,
    num_scheduled: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    heads_per_kv: int,
    sliding_window: int | None,
    device: torch.device,
    decode_kernel: PagedDecodeKernel | None = None,
) -> tuple[AttentionMetadata, np.ndarray]:
    """Index arithmetic for one step. Returns the metadata and each token's position.

    num_computed/num_scheduled: int64 [S]; block_tables: int64 [S, max_blocks] padded with 0
    (the null block). Tokens of sequence s occupy a contiguous range of the packed batch.
    With `decode_kernel`, single-token sequences are left to it instead of SDPA groups.
    """
    layout = token_layout(num_computed, num_scheduled, block_tables, block_size)
    meta = metadata_from_layout(
        layout, num_computed, num_scheduled, block_tables, block_size, heads_per_kv,
        sliding_window, device, decode_kernel,
    )
    return meta, layout.positions


def metadata_from_layout(
    layout: TokenLayout,
    num_computed: np.ndarray,
    num_scheduled: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    heads_per_kv: int,
    sliding_window: int | None,
    device: torch.device,
    decode_kernel: PagedDecodeKernel | None = None,
) -> AttentionMetadata:
    """The SDPA groups (and the C kernel's decode batch) of a step whose layout is known."""
    starts = layout.starts
    groups = []
    decode = np.nonzero(num_scheduled == 1)[0]
    prefill = np.nonzero(num_scheduled > 1)[0]
    context = num_computed + num_scheduled
    decode_batch = None
    if decode_kernel is not None and len(decode):
        decode_batch = DecodeBatch.build(decode_kernel, starts[decode], context[decode], block_tables[decode])
    for kind in (prefill,) if decode_batch is not None else (decode, prefill):
        for members in bucket_by_cost(kind, num_scheduled[kind], context[kind]):
            groups.append(
                _group(
                    members, starts, num_computed, num_scheduled, block_tables, block_size,
                    heads_per_kv, sliding_window, device,
                )
            )
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(layout.slot_mapping).to(device, non_blocking=True),
        groups=groups,
        num_tokens=len(layout.positions),
        decode=decode_batch,
    )


def bucket_by_cost(
    members: np.ndarray, q_lens: np.ndarray, ctx_lens: np.ndarray, max_waste: float = 0.3
) -> list[np.ndarray]:
    """Split sequences into groups whose padding wastes at most `max_waste` of the work.

    A group is padded to its longest query and context, so one 600-token context among
    40-token ones would make every sequence pay for 600; sorting by cost and cutting where
    padding would exceed the budget keeps the work near the real sum with few SDPA calls.
    """
    if len(members) == 0:
        return []
    order = np.argsort(q_lens * ctx_lens, kind="stable")
    groups: list[list[int]] = []
    real = max_q = max_ctx = 0
    for i in order:
        q, c = int(q_lens[i]), int(ctx_lens[i])
        new_q, new_ctx = max(max_q, q), max(max_ctx, c)
        padded = (len(groups[-1]) + 1) * new_q * new_ctx if groups else 0
        if groups and padded <= (1 + max_waste) * (real + q * c):
            groups[-1].append(i)
            real, max_q, max_ctx = real + q * c, new_q, new_ctx
        else:
            groups.append([i])
            real, max_q, max_ctx = q * c, q, c
    return [members[np.asarray(g)] for g in groups]


def _group(
    members: np.ndarray,
    starts: np.ndarray,
    num_computed: np.ndarray,
    num_scheduled: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    heads_per_kv: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionGroup:
    n = num_scheduled[members]
    ctx = num_computed[members] + n
    q_len = int(n.max())
    num_blocks = int(-(-int(ctx.max()) // block_size))
    kv_len = num_blocks * block_size
    q_offsets = np.arange(q_len)
    valid = q_offsets[None, :] < n[:, None]
    token_index = starts[members][:, None] + np.minimum(q_offsets[None, :], n[:, None] - 1)
    q_pos = num_computed[members][:, None] + q_offsets[None, :]  # [B, Q]
    k_pos = np.arange(kv_len)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # causal, also hides padding keys
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask |= ~valid[:, :, None]  # padded queries attend everywhere (their output is dropped)
    mask = np.tile(mask, (1, heads_per_kv, 1))[:, None]  # [B, 1, group*Q, L]
    all_valid = bool(valid.all())
    return AttentionGroup(
        token_index=torch.from_numpy(token_index).to(device, non_blocking=True),
        valid=None if all_valid else torch.from_numpy(valid).to(device, non_blocking=True),
        block_tables=torch.from_numpy(
            np.ascontiguousarray(block_tables[members, :num_blocks])
        ).to(device, non_blocking=True),
        mask=torch.from_numpy(mask).to(device, non_blocking=True),
        out_index=torch.from_numpy(token_index[valid]).to(device, non_blocking=True),
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values ([T, kv_heads, D]) into their cache slots."""
    kv_heads, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, D]; caches: [num_blocks, block_size, kv_heads, D]. Returns [T, heads, D]."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group_size = heads // kv_heads
    out = torch.empty_like(q)
    if meta.decode is not None:
        meta.decode.attend(q, k_cache, v_cache, scale, out)
    for g in meta.groups:
        b, q_len = g.token_index.shape
        # index_select copies whole rows; advanced indexing was 5x slower here (per element).
        qg = q.index_select(0, g.token_index.view(-1)).view(b, q_len, kv_heads, group_size, dim)
        # [B, Q, KVH, G, D] -> [B, KVH, G*Q, D]: the G query heads of one KV head share its keys.
        qg = qg.permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group_size * q_len, dim)
        keys = _gather_blocks(k_cache, g.block_tables).transpose(1, 2)  # [B, KVH, L, D]
        values = _gather_blocks(v_cache, g.block_tables).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask, scale=scale)
        o = o.view(b, kv_heads, group_size, q_len, dim).permute(0, 3, 1, 2, 4)  # [B, Q, KVH, G, D]
        o = o.reshape(b, q_len, heads, dim)
        o = o.reshape(b * q_len, heads, dim) if g.valid is None else o[g.valid]
        out.index_copy_(0, g.out_index, o)
    return out


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, D] gathered by [B, n] block ids -> [B, n*block_size, kv_heads, D]."""
    b, n = block_tables.shape
    rows = torch.index_select(cache.view(cache.shape[0], -1), 0, block_tables.view(-1))
    return rows.view(b, n * cache.shape[1], cache.shape[2], cache.shape[3])
