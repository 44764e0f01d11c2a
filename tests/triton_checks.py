"""Paged caches, tolerances and RoPE tables for the Triton kernel tests (tests/test_triton_kernels*.py).

Every output is poisoned with NaN first, so an element a kernel fails to write shows. The
caches hold NaN everywhere but real keys (the null block 0, unused blocks, the tail of each
sequence's last block), so a read through a padding entry or past a context shows as well.
"""

from __future__ import annotations

import torch


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


def rope_tables(head_dim: int, max_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gpu_worker.rope.RotaryEmbedding's tables (default frequencies): [max_pos, head_dim]."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
