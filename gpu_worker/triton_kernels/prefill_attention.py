"""Attention for prefill chunks over the paged cache, with an already-cached prefix.

A step packs the query tokens of several sequences back to back (`query_start`, cu_seqlens
style). Sequence s has context_lens[s] keys in the cache, its own chunk's keys included (they
are written first), and its q_len = query_start[s+1] - query_start[s] queries are the last
q_len positions: context_len - q_len .. context_len - 1. That one rule covers a fresh prompt
(no prefix), a later chunk of a chunked prefill, a prompt whose prefix came from the prefix
cache, and a decode token (q_len 1).

Each program takes a tile of a sequence's query tokens for one KV head, and with it every query
head of that KV head (grouped-query attention): the tile's rows are (token, head-in-group)
pairs, so every key row read from the cache serves TOKENS x GROUP query rows of one matrix
product. Keys are read through the block table a token at a time (any block size, any block
order), only up to the tile's last query position (causal) and, with a sliding window, only from
the first key the tile's earliest query can see; key tiles that every query of the tile sees
whole (the cached prefix, mostly) skip the masking. Softmax is the online (flash) form in
float32. Default tiles (64 query rows, 64 keys, 4 warps) were the fastest of a sweep of 64/128
rows x 32/64 keys x 4/8 warps on an H200 at Llama-3.1-8B shapes (tests/benchmarks/gpu_kernels.py):
153 us for a 2048-token prompt, 222 us for 4 chunks of 512 after 1536 cached tokens.

The grid is either dense, (sequence, query tile, KV head) sized by the longest query, or a work
list of the (sequence, query tile) pairs that exist (`prefill_work_list`, built on the host from
the query lengths). A mixed step of a thousand decode tokens and one 2,000-token prompt chunk
needs ~1,000 + 125 tiles; the dense grid would launch 1,000 x 125 programs per KV head, almost
all of which exit at once, in every layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import dot_precision, pow2, require_unit_last_stride


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, t0, hi, q_pos, window, table, k_ptr, v_ptr, kv_head, d, d_ok, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile [t0, t0 + BLOCK_N) folded into the running softmax of the query rows."""
    t = t0 + tl.arange(0, BLOCK_N)
    if MASKED:
        block = tl.load(table + t // PAGE, mask=t < hi, other=0).to(tl.int64)
        kv_mask = (t < hi)[:, None] & d_ok[None, :]
    else:  # the caller guarantees t < hi
        block = tl.load(table + t // PAGE).to(tl.int64)
        kv_mask = d_ok[None, :]
    slot = t % PAGE
    k_ptrs = k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
    v_ptrs = v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        seen = (t[None, :] <= q_pos[:, None]) & (t < hi)[None, :]
        if USE_WINDOW:
            seen = seen & (t[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
    # A row that sees nothing in this tile keeps m_i (finite): p = 0, alpha = 1.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    # The denominator sums the same (rounded) weights the numerator's product uses.
    p = tl.exp2(s - m_new[:, None]).to(v_ptr.dtype.element_ty)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes step to step
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr,
    scale_log2, window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    work_ptr, WORK_LIST: tl.constexpr,
):
    if WORK_LIST:  # grid (work items, KV heads): item i is (sequence, query tile)
        seq = tl.load(work_ptr + 2 * tl.program_id(0))
        tile = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
        kv_head = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        tile = tl.program_id(1)
        kv_head = tl.program_id(2)
    BLOCK_M: tl.constexpr = TOKENS * GROUP_PAD

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    first_pos = ctx - q_len  # position of the sequence's first query token

    r = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + r // GROUP_PAD  # query token index within the sequence
    g = r % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    d = tl.arange(0, DIM_PAD)
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=q_mask, other=0.0,
    )
    q_pos = first_pos + tok

    tile_first = tile * TOKENS
    tile_last = tl.minimum(tile_first + TOKENS, q_len) - 1
    hi = first_pos + tile_last + 1  # keys past the tile's last query are never seen
    hi = tl.where(tile_first < q_len, hi, 0)  # a tile past a short sequence's queries: no work
    lo = 0
    # Keys before the tile's first query position are seen by every row of the tile: those
    # whole tiles need no mask (most of the work when a long prefix is cached).
    full_end = tl.minimum(first_pos + tile_first, hi)
    if USE_WINDOW:
        lo = tl.maximum(first_pos + tile_first - window + 1, 0)
        full_end = lo  # the window bounds every row differently: mask every tile
    hi = tl.maximum(hi, lo)
    full_end = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for t0 in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, t0, hi, q_pos, window, table, k_ptr, v_ptr, kv_head, d, d_ok, scale_log2,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            PAGE, BLOCK_N, False, USE_WINDOW, DOT_PRECISION,
        )
    for t0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, t0, hi, q_pos, window, table, k_ptr, v_ptr, kv_head, d, d_ok, scale_log2,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            PAGE, BLOCK_N, True, USE_WINDOW, DOT_PRECISION,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=q_mask,
    )


def query_tile_tokens(num_q_heads: int, num_kv_heads: int, block_m: int = 64) -> int:
    """Query tokens per program: block_m rows of (token, head-in-group), at least 16 rows."""
    group_pad = pow2(num_q_heads // num_kv_heads)
    tokens = max(1, block_m // group_pad)
    return 16 // group_pad if tokens * group_pad < 16 else tokens


def prefill_work_list(query_lens: np.ndarray, tokens: int) -> np.ndarray:
    """int32 [W, 2]: (sequence, query tile) for every tile that holds a query token."""
    tiles = -(-np.asarray(query_lens, dtype=np.int64) // tokens)
    seqs = np.repeat(np.arange(len(tiles)), tiles)
    first = np.cumsum(tiles) - tiles
    return np.stack([seqs, np.arange(int(tiles.sum())) - np.repeat(first, tiles)], axis=1).astype(np.int32)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over their sequences' paged keys.

    q: [num_tokens, num_q_heads, head_dim], sequence s's queries at rows
    query_start[s]:query_start[s+1]; query_start: int32 [num_seqs + 1]; context_lens: int32
    [num_seqs] (cached prefix + this chunk); block_tables: int32 [num_seqs, max_blocks] padded
    with block 0; caches [num_blocks, block_size, kv_heads, head_dim]. `max_query_len` (known on
    the host, no sync) sizes the dense grid; `work` (int32 [W, 2] on the device, from
    `prefill_work_list` with `query_tile_tokens(..., block_m)`) replaces it with only the tiles
    that exist. Returns `out` [num_tokens, num_q_heads, head_dim].
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        require_unit_last_stride(name, t)
    group = num_q_heads // num_kv_heads
    group_pad = pow2(group)
    tokens = query_tile_tokens(num_q_heads, num_kv_heads, block_m)  # tl.dot needs >= 16 rows
    if out is None:
        out = torch.empty_like(q)
    num_seqs = query_start.shape[0] - 1
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0 or (work is not None and work.shape[0] == 0):
        return out
    if work is not None:
        grid: tuple[int, ...] = (work.shape[0], num_kv_heads)
    else:
        grid = (num_seqs, triton.cdiv(max_query_len, tokens), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, context_lens,
        scale * math.log2(math.e), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, TOKENS=tokens,
        HEAD_DIM=head_dim, DIM_PAD=pow2(head_dim, 16),
        PAGE=page, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        work_ptr=work if work is not None else query_start, WORK_LIST=work is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
