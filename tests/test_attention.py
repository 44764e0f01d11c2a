"""Paged attention over block tables equals plain causal attention per sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.attention import bucket_by_cost, build_attention_metadata, paged_attention, write_kv
from gpu_worker.cpu_kernels.build import compiler
from gpu_worker.cpu_kernels.paged_decode import PagedDecodeKernel

needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler for the CPU kernel")


def test_bucket_by_cost_groups_similar_lengths():
    members = np.arange(8)
    q = np.ones(8, dtype=np.int64)
    ctx = np.array([40, 600, 45, 50, 610, 300, 42, 320])
    groups = [sorted(g.tolist()) for g in bucket_by_cost(members, q, ctx)]
    assert groups == [[0, 2, 3, 6], [5, 7], [1, 4]]
    assert bucket_by_cost(np.array([], dtype=np.int64), q[:0], ctx[:0]) == []


def _reference(q, k, v, scale, window=None):
    """q: [Q, H, D] at the last Q positions of k/v: [L, KVH, D]; causal (and sliding window)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    q_len, total = q.shape[0], k.shape[0]
    q_pos = torch.arange(total - q_len, total)[:, None]
    k_pos = torch.arange(total)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu-c", marks=needs_cc)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prefill_and_decode_match_reference(backend, dtype, tmp_path):
    torch.manual_seed(0)
    heads, kv_heads, dim, bs, num_blocks = 6, 2, 8, 4, 64
    k_cache = torch.zeros(num_blocks, bs, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    # (already computed, scheduled now): decodes of very different contexts and two prefills
    seqs = [(3, 1), (40, 1), (0, 9), (5, 1), (12, 7), (41, 1)]
    rng = np.random.default_rng(1)
    free = list(rng.permutation(np.arange(1, num_blocks)))
    tables, full_k, full_v = [], [], []
    for done, new in seqs:
        n_blocks = -(-(done + new) // bs)
        tables.append([int(free.pop()) for _ in range(n_blocks)])
        full_k.append(torch.randn(done + new, kv_heads, dim))
        full_v.append(torch.randn(done + new, kv_heads, dim))
    # the already-computed part is in the cache before the step
    for (done, _), table, k, v in zip(seqs, tables, full_k, full_v):
        for pos in range(done):
            k_cache[table[pos // bs], pos % bs] = k[pos]
            v_cache[table[pos // bs], pos % bs] = v[pos]
    block_tables = np.zeros((len(seqs), max(map(len, tables))), dtype=np.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = t
    computed = np.array([d for d, _ in seqs], dtype=np.int64)
    scheduled = np.array([n for _, n in seqs], dtype=np.int64)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    full_k, full_v = [k.to(dtype) for k in full_k], [v.to(dtype) for v in full_v]
    for window in (None, 6):
        kernel = PagedDecodeKernel(tmp_path, window) if backend == "cpu-c" else None
        meta, positions = build_attention_metadata(
            computed, scheduled, block_tables, bs, heads // kv_heads, window, torch.device("cpu"),
            decode_kernel=kernel)
        if kernel is None:
            assert len(meta.groups) >= 3  # decodes split by length, prefills apart
        else:  # the four decodes go to the kernel, the two prefills to SDPA
            assert meta.decode.token_index.tolist() == [0, 1, 11, 19]
            assert meta.decode.context_lens.tolist() == [4, 41, 6, 42]
            assert sum(g.token_index.shape[0] for g in meta.groups) == 2
        new_k = torch.cat([k[d:] for (d, _), k in zip(seqs, full_k)])
        new_v = torch.cat([v[d:] for (d, _), v in zip(seqs, full_v)])
        q = torch.randn(int(scheduled.sum()), heads, dim).to(dtype)
        write_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
        start = 0
        for (done, new), k, v in zip(seqs, full_k, full_v):
            ref = _reference(q[start : start + new].float(), k.float(), v.float(), dim**-0.5, window)
            torch.testing.assert_close(out[start : start + new].float(), ref, **tol)
            assert positions[start : start + new].tolist() == list(range(done, done + new))
            start += new
