"""The KV-cache write and the fused small kernels (RMSNorm with residual add, rotary, SiLU-and-mul)
against their torch references, on the CPU under Triton's interpreter (tests/triton_interpreter.py).
"""

from __future__ import annotations

import pytest
import torch

from tests import triton_interpreter
from tests.triton_checks import BF16, F32, KV_HEADS, PAGE, check_close, nan_like
from tests.triton_checks import rope_tables as _rope_tables
from tests.triton_interpreter import ref, tk

_interpret = triton_interpreter._interpret  # autouse: the interpreter, with its bf16 corrected


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


@pytest.mark.parametrize("dtype,head_dim,group", [(F32, 64, 3), (BF16, 128, 4)])
def test_rotary_and_kv_write_in_one_launch(dtype: torch.dtype, head_dim: int, group: int) -> None:
    """q rotated in place, rotated k and plain v into shuffled slots of a NaN cache (negative
    slots: nothing), straight from the fused QKV output; k and v themselves stay as they were."""
    gen = torch.Generator().manual_seed(head_dim * group)
    tokens, q_heads, num_blocks = 23, group * KV_HEADS, 7
    q_size, kv_size = q_heads * head_dim, KV_HEADS * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    before = qkv.clone()
    q = qkv[:, :q_size].view(tokens, q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, KV_HEADS, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, KV_HEADS, head_dim)
    positions = torch.randint(1, 4000, (tokens,), generator=gen)
    slots = torch.randperm(num_blocks * PAGE, generator=gen)[:tokens]
    slots[[0, 9, 22]] = -1
    cos, sin = _rope_tables(head_dim, 4096, dtype)
    want_q, want_k = ref.rotary_embedding(q.float(), k.float(), positions, cos.float(), sin.float())
    k_want = torch.full((num_blocks, PAGE, KV_HEADS, head_dim), float("nan"), dtype=torch.float32)
    v_want = k_want.clone()
    ref.write_kv_cache(want_k, v.float(), k_want, v_want, slots)
    k_cache = torch.full((num_blocks, PAGE, KV_HEADS, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tk.rotary_and_write_kv(q, k, v, k_cache, v_cache, positions, slots, cos, sin)
    check_close(q, want_q, dtype)
    assert torch.equal(qkv[:, q_size:], before[:, q_size:])  # k and v untouched
    for got, want in ((k_cache, k_want), (v_cache, v_want)):
        assert torch.equal(got.isnan(), want.isnan())  # exactly the valid tokens' slots written
        assert int((~got.isnan()).sum()) == (tokens - 3) * KV_HEADS * head_dim
        check_close(got.nan_to_num(), want.nan_to_num(), dtype)


def test_rotary_and_kv_write_refuses_mismatched_caches() -> None:
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    cache = torch.zeros(3, PAGE, 2, 16)
    with pytest.raises(ValueError, match="caches"):
        tk.rotary_and_write_kv(q, k, k, cache, cache, torch.zeros(2, dtype=torch.long),
                               torch.zeros(2, dtype=torch.long), torch.zeros(9, 8), torch.zeros(9, 8))


@pytest.mark.parametrize("dtype,width", [(F32, 2 * 1536), (BF16, 2 * 1000)])
def test_silu_and_mul(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = (2 * torch.randn(9, width, generator=gen)).to(dtype)
    expected = ref.silu_and_mul(x.float())
    out = tk.silu_and_mul(x, out=torch.full((9, width // 2), float("nan"), dtype=dtype), block=256)
    check_close(out, expected, dtype)
