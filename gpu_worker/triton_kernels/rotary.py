"""Rotary position embedding applied in place to the query and key heads of a step.

gpu_worker.rope applies HF's rotate-half form, x * cos + rotate_half(x) * sin, which in torch is
a gather of cos and sin per token, a concatenation and three elementwise kernels per tensor,
each a full pass over q or k. Here one program per token reads its position, the cos/sin row,
and rotates every query and key head in place: out[:h] = x1 cos - x2 sin, out[h:] = x2 cos +
x1 sin, with x1, x2 the two halves of the head. The tables are the project's [max_positions,
head_dim] ones, whose two halves are equal (cat(freqs, freqs)), so only the first half is read.
q and k may be strided views (the fused QKV output), rotated where they lie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import pow2, require_unit_last_stride


@triton.jit
def _rotate_heads(src_ptr, src_stride_h, dst_ptr, dst_stride_h, cos, sin, rows_ok,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate one token's heads from `src` into `dst` (the same place, or a cache slot).
    rows_ok: bool [HEADS_PAD], False skips a head (a vector: a scalar mask does not combine
    with a vector one in the interpreter)."""
    h = tl.arange(0, HEADS_PAD)
    j = tl.arange(0, HALF_PAD)
    mask = (rows_ok & (h < NUM_HEADS))[:, None] & (j < HALF)[None, :]
    first = src_ptr + h[:, None] * src_stride_h + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out = dst_ptr + h[:, None] * dst_stride_h + j[None, :]
    tl.store(out, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(positions_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin,
             HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """The first halves of token `tok`'s cos and sin rows, as [1, HALF_PAD] float32."""
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin, HALF, HALF_PAD)
    q_rows = q_ptr + tok * stride_qt
    k_rows = k_ptr + tok * stride_kt
    _rotate_heads(q_rows, stride_qh, q_rows, stride_qh, cos, sin, tl.full([Q_HEADS_PAD], 1, tl.int1),
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_rows, stride_kh, k_rows, stride_kh, cos, sin, tl.full([K_HEADS_PAD], 1, tl.int1),
                  NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD)


def rotary_embedding_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> None:
    """Rotate q [T, q_heads, head_dim] and k [T, kv_heads, head_dim] in place.

    positions: int [T]; cos, sin: [max_positions, head_dim] (gpu_worker.rope.RotaryEmbedding's
    tables, halves equal).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit a rotary of even head_dim")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        require_unit_last_stride(name, t)
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=pow2(num_q_heads),
        NUM_K_HEADS=num_k_heads, K_HEADS_PAD=pow2(num_k_heads),
        HALF=half, HALF_PAD=pow2(half),
        num_warps=4 if num_q_heads * head_dim >= 2048 else 1,
    )
