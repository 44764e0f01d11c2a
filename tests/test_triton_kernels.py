"""The Triton kernels (gpu_worker.triton_kernels) against their torch references, on the CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels with numpy, so every kernel is
checked here without a GPU; tests/benchmarks/gpu_kernels.py repeats the checks on CUDA and times
them. The interpreter reads TRITON_INTERPRET when a kernel is decorated (at import) and again at
some calls, so the variable is set while this module imports the kernels and while its tests
run, and put back as it was otherwise: other test modules and the processes they start never
see it (it concerns only triton, which nothing else imports).

Every output is poisoned with NaN first, so an element a kernel fails to write shows. The
caches hold NaN everywhere but real keys (the null block 0, unused blocks, the tail of each
sequence's last block), so a read through a padding entry or past a context shows as well.

bfloat16 in the interpreter (triton 3.9) differs from a GPU in two ways, which the fixture
below corrects for this module's tests only: its tl.dot multiplies the raw bits of bf16
operands as integers, and it rounds float32 -> bfloat16 by truncation (biased toward zero: a
relative error near 7e-3 over the three roundings of a bf16 RMSNorm) where a GPU and torch round
to nearest even. test_the_interpreter_computes_bf16_as_a_gpu_does checks that both fixes hold.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PRIOR = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from gpu_worker import triton_kernels as tk
    from gpu_worker.triton_kernels import reference as ref
    from gpu_worker.triton_kernels.decode_attention import choose_num_splits
finally:
    if _PRIOR is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR


def _rounding_cast(original):
    """The interpreter's float32 -> bfloat16 cast, rounding to nearest even as a GPU does."""

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return TensorHandle(f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    return cast_impl


def _bf16_dot(original):
    """The interpreter's tl.dot, with bfloat16 operands read as the numbers they hold.

    It keeps bfloat16 as raw uint16 bits and hands those to numpy's matmul as integers (seen
    with triton 3.9: a bf16 x bf16 dot off by 1e10); a GPU multiplies the bf16 values exactly and
    accumulates in float32, which float32 numpy on the widened values reproduces.
    """

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = np.ascontiguousarray(h.data, dtype=np.uint16).astype(np.uint32) << 16
        return TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    return create_dot


try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder as _Builder
    from triton.runtime.interpreter import TensorHandle

    _GPU_LIKE = callable(getattr(_Builder, "cast_impl", None)) and callable(getattr(_Builder, "create_dot", None))
except ImportError:
    _GPU_LIKE = False


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _GPU_LIKE:
        monkeypatch.setattr(_Builder, "cast_impl", _rounding_cast(_Builder.cast_impl))
        monkeypatch.setattr(_Builder, "create_dot", _bf16_dot(_Builder.create_dot))


def test_the_interpreter_computes_bf16_as_a_gpu_does() -> None:
    """The two interpreter fixes above are in force: a bf16 dot and a rounding cast."""
    assert _GPU_LIKE, "this triton's interpreter has no cast_impl/create_dot to correct"

    @triton.jit
    def dot_then_round(a_ptr, b_ptr, out_ptr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
        tl.store(out_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b).to(tl.bfloat16))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).bfloat16()
    b = torch.randn(16, 16, generator=gen).bfloat16()
    out = torch.full((16, 16), float("nan"), dtype=torch.bfloat16)
    dot_then_round[(1,)](a, b, out)
    assert torch.equal(out, (a.double() @ b.double()).float().bfloat16())


PAGE = 16
KV_HEADS = 2
F32, BF16 = torch.float32, torch.bfloat16


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    return float((out - expected).norm() / expected.norm().clamp_min(1e-30))


def check_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element written (no NaN) and near: float32 tight, bf16 by relative error."""
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements unwritten (NaN)"
    if dtype == F32:
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-5, rtol=2e-5)
    else:
        err = rel_err(out, expected)
        assert err < 4e-3, f"bf16 relative error {err:.2e}"
        torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


def paged_cache(
    gen: torch.Generator, context_lens: list[int], head_dim: int, dtype: torch.dtype,
    spare_blocks: int = 6, pad_columns: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k_cache, v_cache [blocks, PAGE, KV_HEADS, D] and int32 block tables.

    Block ids are shuffled over a pool with spare blocks, so tables are neither contiguous nor
    ordered; every table has padding columns (block 0). Everything that is not a real key of
    some sequence (block 0, spare blocks, the tail past each context) is NaN.
    """
    needed = [-(-n // PAGE) for n in context_lens]
    num_blocks = 1 + sum(needed) + spare_blocks
    k = torch.randn(num_blocks, PAGE, KV_HEADS, head_dim, generator=gen)
    v = torch.randn(num_blocks, PAGE, KV_HEADS, head_dim, generator=gen)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(context_lens), max(needed) + pad_columns, dtype=torch.int32)
    real = torch.zeros(num_blocks, PAGE, dtype=torch.bool)
    for s, (n, count) in enumerate(zip(context_lens, needed)):
        blocks = [ids.pop() for _ in range(count)]
        tables[s, :count] = torch.tensor(blocks, dtype=torch.int32)
        for pos in range(n):
            real[blocks[pos // PAGE], pos % PAGE] = True
    k[~real] = float("nan")
    v[~real] = float("nan")
    return k.to(dtype), v.to(dtype), tables


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


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


# ------------------------------------------------------------------ KV-cache write


@pytest.mark.parametrize("dtype,head_dim", [(F32, 64), (BF16, 128)])
def test_write_kv_cache(dtype: torch.dtype, head_dim: int) -> None:
    """Keys and values straight from a fused QKV output (strided views), into shuffled slots of
    a NaN cache; negative slots write nothing; nothing else changes."""
    gen = torch.Generator().manual_seed(11)
    num_blocks, tokens, q_heads = 9, 30, 8
    width = (q_heads + 2 * KV_HEADS) * head_dim
    qkv = torch.randn(tokens, width, generator=gen).to(dtype)
    key = qkv[:, q_heads * head_dim : (q_heads + KV_HEADS) * head_dim].view(tokens, KV_HEADS, head_dim)
    value = qkv[:, (q_heads + KV_HEADS) * head_dim :].view(tokens, KV_HEADS, head_dim)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * PAGE, generator=gen)[:tokens]
    slots[[3, 17, 29]] = -1
    k_cache = torch.full((num_blocks, PAGE, KV_HEADS, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tk.write_kv_cache(key, value, k_cache, v_cache, slots)
    ref.write_kv_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
    assert int((~k_cache.isnan()).sum()) == (tokens - 3) * KV_HEADS * head_dim
    assert torch.equal(k_cache.nan_to_num(), k_ref.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), v_ref.nan_to_num())


def test_write_kv_cache_into_a_layer_view_of_the_full_cache() -> None:
    """The cache as the runner holds it: [layers, 2, blocks, block_size, kv_heads, D], written
    through one layer's (k, v) views; the other layer stays untouched."""
    gen = torch.Generator().manual_seed(12)
    cache = torch.zeros(2, 2, 5, PAGE, KV_HEADS, 64)
    k_view, v_view = cache[1, 0], cache[1, 1]
    key = torch.randn(7, KV_HEADS, 64, generator=gen)
    value = torch.randn(7, KV_HEADS, 64, generator=gen)
    slots = torch.tensor([16, 17, 18, 40, 79, 0, 5])
    tk.write_kv_cache(key, value, k_view, v_view, slots)
    assert torch.equal(cache[0], torch.zeros_like(cache[0]))
    assert torch.equal(cache[1, 0].view(-1, KV_HEADS, 64)[slots], key)
    assert torch.equal(cache[1, 1].view(-1, KV_HEADS, 64)[slots], value)


# ------------------------------------------------------------------ fusions


@pytest.mark.parametrize("dtype,hidden", [(F32, 576), (BF16, 576), (BF16, 128)])
def test_rms_norm_and_fused_residual_add(dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(13, hidden, generator=gen).to(dtype)
    residual = (3 * torch.randn(13, hidden, generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    eps = 1e-5

    out = tk.rms_norm(x, weight, eps, out=nan_like(x))
    check_close(out, ref.rms_norm(x, weight, eps), dtype)

    normed, summed = tk.fused_add_rms_norm(x, residual, weight, eps, out=nan_like(x), residual_out=nan_like(x))
    want_normed, want_summed = ref.fused_add_rms_norm(x, residual, weight, eps)
    check_close(normed, want_normed, dtype)
    if dtype == F32:
        check_close(summed, want_summed, dtype)
    else:  # one bf16 rounding of an exact float32 sum: at most one unit apart (interpreter)
        assert not summed.isnan().any()
        ulp = torch.finfo(BF16).eps * want_summed.float().abs().clamp_min(1e-3)
        assert bool(((summed.float() - want_summed.float()).abs() <= ulp).all())

    # in place: the residual buffer becomes the new residual
    res = residual.clone()
    normed2, summed2 = tk.fused_add_rms_norm(x, res, weight, eps, residual_out=res)
    assert summed2.data_ptr() == res.data_ptr()
    assert torch.equal(summed2, summed) and torch.equal(normed2, normed)


def _rope_tables(head_dim: int, max_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gpu_worker.rope.RotaryEmbedding's tables (default frequencies): [max_pos, head_dim]."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype,head_dim,group", [(F32, 64, 4), (BF16, 128, 8), (F32, 128, 1)])
def test_rotary_in_place_on_fused_qkv(dtype: torch.dtype, head_dim: int, group: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    tokens, q_heads = 11, group * KV_HEADS
    q_size, kv_size = q_heads * head_dim, KV_HEADS * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    before = qkv.clone()
    q = qkv[:, :q_size].view(tokens, q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, KV_HEADS, head_dim)
    positions = torch.randint(1, 4000, (tokens,), generator=gen)
    cos, sin = _rope_tables(head_dim, 4096, dtype)
    # float32 arithmetic on the same inputs: the kernel rounds once, torch's bf16 path thrice
    want_q, want_k = ref.rotary_embedding(q.float(), k.float(), positions, cos.float(), sin.float())
    tk.rotary_embedding_(q, k, positions, cos, sin)
    check_close(q, want_q, dtype)
    check_close(k, want_k, dtype)
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :])  # v untouched


@pytest.mark.parametrize("dtype,width", [(F32, 2 * 1536), (BF16, 2 * 1000)])
def test_silu_and_mul(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = (2 * torch.randn(9, width, generator=gen)).to(dtype)
    expected = ref.silu_and_mul(x.float())
    out = tk.silu_and_mul(x, out=torch.full((9, width // 2), float("nan"), dtype=dtype), block=256)
    check_close(out, expected, dtype)


# ------------------------------------------------------------------ the references are the project's


def test_references_follow_the_project() -> None:
    """The references compute what gpu_worker's torch path computes, bit for bit."""
    from gpu_worker.model import rms_norm as model_rms_norm
    from gpu_worker.rope import apply_rotary

    gen = torch.Generator().manual_seed(5)
    for dtype in (F32, BF16):
        x = torch.randn(6, 64, generator=gen).to(dtype)
        w = torch.randn(64, generator=gen).to(dtype)
        assert torch.equal(ref.rms_norm(x, w, 1e-6), model_rms_norm(x, w, 1e-6))
        q = torch.randn(6, 4, 64, generator=gen).to(dtype)
        k = torch.randn(6, 2, 64, generator=gen).to(dtype)
        pos = torch.arange(6) * 7
        cos, sin = _rope_tables(64, 64, dtype)
        rq, rk = ref.rotary_embedding(q, k, pos, cos, sin)
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        assert torch.equal(rq, apply_rotary(q, c, s)) and torch.equal(rk, apply_rotary(k, c, s))
    assert math.isclose(float(cos[0, 0]), 1.0)


def test_the_package_imports_no_service_code() -> None:
    """The device check script imports the kernels on a bare CUDA image (torch, triton, numpy):
    importing them must not pull in the protocol, sockets or msgspec."""
    code = ("import sys; import gpu_worker.triton_kernels, gpu_worker.triton_kernels.reference; "
            "print(sorted({'protocol', 'zmq', 'msgspec', 'gpu_worker.attention'} & set(sys.modules)))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
