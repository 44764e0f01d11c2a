"""Paged decode attention: one query token per sequence, keys read straight from the paged cache.

Decode attention is bound by memory traffic: its whole cost is reading each sequence's keys and
values once. Two choices follow from that.

- One program serves every query head that shares a KV head (grouped-query attention), so a
  key row is read once for the whole group instead of once per query head. The group's queries
  are the rows of a small matrix product (padded to 16, the tensor cores' minimum), which keeps
  the arithmetic off the critical path.
- A long context is split over several programs ("split-K" / flash-decoding): with batch 1 and
  8 KV heads there would otherwise be 8 programs on a GPU with 132 multiprocessors. Each split
  keeps its own running max, softmax denominator and unnormalised output; a second, tiny kernel
  combines the splits exactly (log-sum-exp rescaling). With one split the first kernel writes
  the output itself and the second launch is skipped.

Each program computes its own key range from `context_lens` on the device, so the launch
depends only on (num_seqs, num_splits): the same launch can be captured once in a CUDA graph and
replayed for any context lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import dot_precision, pow2, require_unit_last_stride

@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width changes step to step
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2, window,
    stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_os, stride_oh,
    num_q_heads,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    # Every split gets a whole number of BLOCK_N tiles; trailing splits may be empty.
    per_split = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :], other=0.0,
    )

    # The running max starts finite, so an empty split (or context 0) never computes inf - inf.
    m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq * stride_bt
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs
        t_ok = t < end
        block = tl.load(table + t // PAGE, mask=t_ok, other=0).to(tl.int64)
        slot = t % PAGE
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
            mask=kv_mask, other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        # The denominator sums the same (rounded) weights the numerator's product uses.
        p = tl.exp2(s - m_new[:, None]).to(v_ptr.dtype.element_ty)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        v = tl.load(
            v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
            mask=kv_mask, other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLITS == 1:
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        out = acc / safe_l[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials are [num_seqs, num_q_heads, SPLITS] (+ [HEAD_DIM]) float32, contiguous.
        row = (seq * num_q_heads + heads) * SPLITS + split
        tl.store(part_m_ptr + row, m_i, mask=g_ok)
        tl.store(part_l_ptr + row, l_i, mask=g_ok)
        tl.store(
            part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc,
            mask=g_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_os, stride_oh, num_q_heads,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    s_ok = s < SPLITS
    row = (seq * num_q_heads + head) * SPLITS + s
    m = tl.load(part_m_ptr + row, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.exp2(m - m_all)  # an empty split has l == 0 and adds nothing
    denom = tl.sum(w * l, 0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
        mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@dataclass(frozen=True)
class DecodeLaunch:
    """How one decode-attention launch is cut: context splits, keys per tile, warps per program
    and software-pipeline stages. The tiles set each program's shared memory (stages x 2 x
    block_n x head_dim elements), hence how many programs a multiprocessor holds at once and how
    many waves a batch takes; the best cut depends on the GPU, so start-up timings may replace
    the default per CUDA-graph batch size (gpu_worker.attention_tuning)."""

    num_splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int,
    min_tokens_per_split: int = 64, max_splits: int = 64,
) -> int:
    """Splits so that (seqs x kv heads x splits) fills the GPU about twice, a power of two.

    No split when the batch alone fills it, and no split shorter than one key tile. Tuned on
    device time (CUDA-graph replays, as decode steps will run) on an H200 at Llama-3.1-8B shapes
    (tests/benchmarks/gpu_kernels.py): batch 1 x 512 keys took 6.6 us in 8 splits against 17 us
    in one; batch 1 x 2048, 9.6 us in 32 against 61 us; batch 16 x 2048, 40 us in 4 (8: 42,
    1: 71); from batch 64 up one split was fastest. Called eagerly, the second launch costs the
    host more than that (an eager batch-1 call is bound by launch overhead either way).
    """
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-2 * num_sms // programs)
    useful = max(1, max_context // min_tokens_per_split)
    want_pow2 = 1 << (want - 1).bit_length()  # round up: 3 -> 4
    useful_pow2 = 1 << (useful.bit_length() - 1)  # round down: 5 -> 4
    return max(1, min(want_pow2, useful_pow2, max_splits))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q: [num_seqs, num_q_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads,
    head_dim]; block_tables: int32 [num_seqs, max_blocks] (padding: block 0); context_lens: int32
    [num_seqs], the number of keys each query sees (its own included, already written). The query
    sits at position context_len - 1; with `sliding_window` W it sees the last W keys. A sequence
    with context 0 gets zeros. `num_splits` None picks one from the largest possible context
    (max_blocks * block_size, no device sync); pass it explicitly for CUDA-graph capture.
    Returns `out` ([num_seqs, num_q_heads, head_dim], q's dtype).
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        require_unit_last_stride(name, t)
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * page, num_sms)
    dim_pad = pow2(head_dim, 16)
    if num_splits > 1:  # one allocation for the three partial arrays
        rows = num_seqs * num_q_heads * num_splits
        parts = torch.empty(rows * (head_dim + 2), device=q.device, dtype=torch.float32)
        part_acc, part_m, part_l = parts[: rows * head_dim], parts[rows * head_dim : -rows], parts[-rows:]
    else:
        part_acc = part_m = part_l = out  # unused: SPLITS == 1 writes `out` directly
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_acc, part_m, part_l,
        scale * math.log2(math.e), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_q_heads,
        GROUP=group, GROUP_PAD=pow2(group, 16),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        PAGE=page, BLOCK_N=block_n,
        SPLITS=num_splits, USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_m, part_l,
            out.stride(0), out.stride(1), num_q_heads,
            HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS=num_splits, SPLITS_PAD=pow2(num_splits),
            num_warps=1 if dim_pad <= 64 else 2,
        )
    return out
