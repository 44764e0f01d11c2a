"""Paged decode and prefill attention kernels against their torch references, on the CPU under
Triton's interpreter (tests/triton_interpreter.py), and against the project's own torch path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import triton_interpreter
from tests.triton_checks import BF16, F32, KV_HEADS, PAGE, check_close, nan_like, paged_cache
from tests.triton_interpreter import choose_num_splits, ref, tk

_interpret = triton_interpreter._interpret  # autouse: the interpreter, with its bf16 corrected


# ------------------------------------------------------------------ decode attention

DECODE_CASES = [
    # group (q heads per KV head), head_dim, dtype, sliding window, splits
    pytest.param(1, 64, F32, None, 1, id="mha-d64-f32-nosplit"),
    pytest.param(4, 128, BF16, None, 4, id="gqa4-d128-bf16-4splits"),
    pytest.param(8, 64, BF16, 40, 3, id="gqa8-d64-bf16-window-3splits"),
    pytest.param(8, 128, F32, None, 8, id="gqa8-d128-f32-8splits"),
    pytest.param(4, 64, F32, 100, 2, id="gqa4-d64-f32-window-2splits"),
]


@pytest.mark.parametrize("group,head_dim,dtype,window,splits", DECODE_CASES)
def test_decode_attention(group: int, head_dim: int, dtype: torch.dtype, window: int | None, splits: int) -> None:
    gen = torch.Generator().manual_seed(1000 * group + head_dim)
    # ragged: one key, a block exactly, mid-block, several blocks, a long one (several splits)
    context_lens = [1, 16, 45, 200, 777]
    k, v, tables = paged_cache(gen, context_lens, head_dim, dtype)
    q = torch.randn(len(context_lens), group * KV_HEADS, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    out = tk.paged_decode_attention(
        q, k, v, tables, lens, scale, sliding_window=window, num_splits=splits, out=nan_like(q),
    )
    check_close(out, ref.paged_decode_attention(q, k, v, tables, lens, scale, window), dtype)


def test_decode_split_count_does_not_change_the_result() -> None:
    """1 split, a few, and more splits than some sequences have tiles (empty splits); a sequence
    of context 0 (a padding row of a graph batch) gets zeros, not NaN."""
    gen = torch.Generator().manual_seed(7)
    context_lens = [0, 3, 70, 530]
    k, v, tables = paged_cache(gen, [max(n, 1) for n in context_lens], 64, F32)
    q = torch.randn(len(context_lens), 4 * KV_HEADS, 64, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    outs = [
        tk.paged_decode_attention(q, k, v, tables, lens, 0.125, num_splits=n, out=nan_like(q))
        for n in (1, 2, 5, 16)
    ]
    expected = ref.paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(outs[0][0], torch.zeros_like(outs[0][0]))
    for out in outs:
        check_close(out, expected, F32)


def test_choose_num_splits() -> None:
    # the H200's fastest split counts at Llama-3.1-8B shapes (see choose_num_splits)
    assert choose_num_splits(256, 8, 2048, num_sms=132) == 1  # the batch fills the GPU
    assert choose_num_splits(64, 8, 2048, num_sms=132) == 1
    assert choose_num_splits(16, 8, 2048, num_sms=132) == 4  # 264 / 128 programs = 3 -> 4
    assert choose_num_splits(1, 8, 2048, num_sms=132) == 32  # 264 / 8 = 33 -> 64, but 2048 / 64 keys
    assert choose_num_splits(1, 8, 512, num_sms=132) == 8  # one 64-key tile per split
    assert choose_num_splits(16, 8, 512, num_sms=132) == 4
    assert choose_num_splits(1, 8, 32768, num_sms=132) == 64  # at most 64
    assert choose_num_splits(4, 2, 100, num_sms=132) == 1  # shorter than two tiles: no split
    for args in [(1, 1, 10**6, 132), (3, 5, 5000, 80)]:
        n = choose_num_splits(*args)
        assert n & (n - 1) == 0 and 1 <= n <= 64


# ------------------------------------------------------------------ prefill attention

PREFILL_CASES = [
    # group, head_dim, dtype, sliding window, block_m, block_n
    pytest.param(1, 64, F32, None, 32, 32, id="mha-d64-f32"),
    pytest.param(4, 128, BF16, None, 64, 64, id="gqa4-d128-bf16"),
    pytest.param(8, 64, F32, 24, 64, 32, id="gqa8-d64-f32-window"),
    pytest.param(8, 128, BF16, None, 16, 64, id="gqa8-d128-bf16-small-tiles"),
    pytest.param(4, 64, BF16, 50, 32, 16, id="gqa4-d64-bf16-window"),
]
# (cached prefix, chunk length): a fresh prompt, a prefix hit of whole blocks, a decode token,
# a chunk starting mid-block, a sequence with nothing scheduled, a later chunk of a long prompt.
PREFILL_SEQS = [(0, 37), (48, 16), (99, 1), (5, 20), (130, 0), (171, 40)]


def _prefill_inputs(gen, group, head_dim, dtype):
    context_lens = [c + n for c, n in PREFILL_SEQS]
    q_lens = [n for _, n in PREFILL_SEQS]
    k, v, tables = paged_cache(gen, context_lens, head_dim, dtype)
    starts = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    q = torch.randn(int(starts[-1]), group * KV_HEADS, head_dim, generator=gen).to(dtype)
    return q, k, v, tables, starts, torch.tensor(context_lens, dtype=torch.int32), max(q_lens)


@pytest.mark.parametrize("group,head_dim,dtype,window,block_m,block_n", PREFILL_CASES)
def test_prefill_attention(group, head_dim, dtype, window, block_m, block_n) -> None:
    gen = torch.Generator().manual_seed(2000 * group + head_dim + (window or 0))
    q, k, v, tables, starts, lens, max_q = _prefill_inputs(gen, group, head_dim, dtype)
    scale = head_dim**-0.5
    out = tk.paged_prefill_attention(
        q, k, v, tables, starts, lens, scale, max_q, sliding_window=window, out=nan_like(q),
        block_m=block_m, block_n=block_n,
    )
    check_close(out, ref.paged_prefill_attention(q, k, v, tables, starts, lens, scale, window), dtype)


def test_prefill_work_list_holds_every_tile_that_exists() -> None:
    work = tk.prefill_work_list(np.array([37, 16, 1, 0, 40]), 16)
    assert work.dtype == np.int32
    assert work.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0], [4, 0], [4, 1], [4, 2]]
    assert tk.prefill_work_list(np.array([0, 0]), 16).shape == (0, 2)
    assert tk.query_tile_tokens(32, 8) == 16 and tk.query_tile_tokens(8, 8) == 64
    assert tk.query_tile_tokens(64, 1, block_m=16) == 1  # 64 rows of one token: tl.dot's 16 at least


@pytest.mark.parametrize("group,head_dim,dtype,window,block_m,block_n", PREFILL_CASES)
def test_prefill_attention_over_a_work_list(group, head_dim, dtype, window, block_m, block_n) -> None:
    gen = torch.Generator().manual_seed(3000 * group + head_dim + (window or 0))
    q, k, v, tables, starts, lens, max_q = _prefill_inputs(gen, group, head_dim, dtype)
    tokens = tk.query_tile_tokens(group * KV_HEADS, KV_HEADS, block_m)
    work = torch.from_numpy(tk.prefill_work_list(np.diff(starts.numpy()), tokens))
    scale = head_dim**-0.5
    out = tk.paged_prefill_attention(
        q, k, v, tables, starts, lens, scale, max_q, sliding_window=window, out=nan_like(q),
        block_m=block_m, block_n=block_n, work=work,
    )
    check_close(out, ref.paged_prefill_attention(q, k, v, tables, starts, lens, scale, window), dtype)


@pytest.mark.parametrize("window", [None, 33])
def test_attention_kernels_match_the_projects_torch_path(window: int | None) -> None:
    """A mixed step through gpu_worker.attention (metadata, slot mapping, SDPA) and through the
    kernels (write, prefill chunks, decode tokens): the conventions agree."""
    from gpu_worker.attention import build_attention_metadata, paged_attention, write_kv

    gen = torch.Generator().manual_seed(3)
    group, head_dim = 4, 64
    num_computed = np.array([0, 40, 77, 16, 200], dtype=np.int64)
    num_scheduled = np.array([25, 1, 9, 1, 1], dtype=np.int64)
    context = num_computed + num_scheduled
    num_blocks = 60
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = np.zeros((len(context), 16), dtype=np.int64)
    for s, n in enumerate(context):
        count = -(-int(n) // PAGE)
        tables[s, :count] = [perm.pop() for _ in range(count)]
    k_cache = torch.randn(num_blocks, PAGE, KV_HEADS, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, PAGE, KV_HEADS, head_dim, generator=gen)
    meta, positions = build_attention_metadata(
        num_computed, num_scheduled, tables, PAGE, group, window, torch.device("cpu"),
    )
    total = int(num_scheduled.sum())
    q = torch.randn(total, group * KV_HEADS, head_dim, generator=gen)
    new_k = torch.randn(total, KV_HEADS, head_dim, generator=gen)
    new_v = torch.randn(total, KV_HEADS, head_dim, generator=gen)

    torch_k, torch_v = k_cache.clone(), v_cache.clone()
    write_kv(torch_k, torch_v, new_k, new_v, meta.slot_mapping)
    expected = paged_attention(q, torch_k, torch_v, meta, head_dim**-0.5)

    tk.write_kv_cache(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, torch_k) and torch.equal(v_cache, torch_v)
    t32 = torch.from_numpy(tables.astype(np.int32))
    starts = torch.tensor(np.concatenate([[0], np.cumsum(num_scheduled)]), dtype=torch.int32)
    lens = torch.from_numpy(context.astype(np.int32))
    out = tk.paged_prefill_attention(
        q, k_cache, v_cache, t32, starts, lens, head_dim**-0.5, int(num_scheduled.max()),
        sliding_window=window, out=nan_like(q),
    )
    check_close(out, expected, F32)
    decode = np.nonzero(num_scheduled == 1)[0]
    rows = torch.from_numpy(starts[:-1].numpy()[decode].astype(np.int64))
    dec = tk.paged_decode_attention(
        q[rows], k_cache, v_cache, t32[decode], lens[decode], head_dim**-0.5,
        sliding_window=window, num_splits=2, out=nan_like(q[rows]),
    )
    check_close(dec, expected[rows], F32)
    assert np.array_equal(positions[-1:], [200])
