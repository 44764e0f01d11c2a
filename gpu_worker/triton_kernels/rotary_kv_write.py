"""Rotary embedding and the KV-cache write in one launch.

Separately, a layer rotates q and k in place (rotary.py) and then reads k and v again to store
them in their cache slots (kv_write.py): two launches per layer and a second pass over the new
keys. Attention reads keys only from the cache, so the rotated keys need not go back to the QKV
output at all. Here one program per token reads its cos/sin row once, rotates its query heads in
place, rotates its key heads straight into the key cache slot and copies its value heads into
the value cache slot. A negative slot (a padding row of a CUDA-graph batch) writes no cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import pow2, require_unit_last_stride
from gpu_worker.triton_kernels.rotary import _cos_sin, _rotate_heads


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, slot_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_ptr, sin_ptr, tok, stride_cos, stride_sin, HALF, HALF_PAD)
    q_rows = q_ptr + tok * stride_qt
    _rotate_heads(q_rows, stride_qh, q_rows, stride_qh, cos, sin, tl.full([Q_HEADS_PAD], 1, tl.int1),
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)

    slot = tl.load(slot_ptr + tok).to(tl.int64)
    block = slot // PAGE
    offset = slot % PAGE
    h = tl.arange(0, KV_HEADS_PAD)
    keep = (h * 0 + slot) >= 0  # the slot as a vector (see _rotate_heads)
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh,
                  k_cache_ptr + block * stride_kcb + offset * stride_kcs, stride_kch,
                  cos, sin, keep, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)
    d = tl.arange(0, DIM_PAD)
    mask = (keep & (h < NUM_KV_HEADS))[:, None] & (d < HEAD_DIM)[None, :]
    v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(
        v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :],
        v.to(v_cache_ptr.dtype.element_ty), mask=mask,
    )


def rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    positions: torch.Tensor, slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> None:
    """Rotate q [T, q_heads, D] in place; rotate k [T, kv_heads, D] into k_cache and copy v into
    v_cache ([num_blocks, block_size, kv_heads, D] each) at `slot_mapping` (int64 [T], negative =
    skip). k itself is left as it was. positions: int [T]; cos, sin: [max_positions, D] tables
    with equal halves (gpu_worker.rope). q, k, v may be strided views of the fused QKV output."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "a rotary of even head_dim")
    if k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"caches {tuple(k_cache.shape)} {tuple(v_cache.shape)} do not hold "
                         f"[.., {num_kv_heads}, {head_dim}] rows")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("cos", cos), ("sin", sin)):
        require_unit_last_stride(name, t)
    if num_tokens == 0:
        return
    _rotary_kv_write_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, positions, slot_mapping, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=pow2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=pow2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_PAD=pow2(head_dim),
        HALF=head_dim // 2, HALF_PAD=pow2(head_dim // 2), PAGE=k_cache.shape[1],
        num_warps=4 if num_q_heads * head_dim >= 2048 else 1,
    )
