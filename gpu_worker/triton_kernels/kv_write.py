"""The KV-cache write: this step's keys and values into their cache slots, one launch for both.

The torch path does two index_copy_ calls over flattened views of the caches, which need the
new keys and values as contiguous tensors first. Here one program per token reads its key and
value rows wherever they are (e.g. straight out of the fused QKV projection's output, a strided
view) and stores both into block slot // block_size, offset slot % block_size. A negative slot
skips the token: padding rows of a CUDA-graph batch write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import pow2, require_unit_last_stride


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PAGE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    block = slot // PAGE
    offset = slot % PAGE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, DIM_PAD)
    keep = (h < NUM_HEADS) & (h * 0 + slot >= 0)  # slot broadcast to a vector: a scalar mask
    mask = keep[:, None] & (d < HEAD_DIM)[None, :]  # does not combine in the interpreter
    k = tl.load(key_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(
        k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :],
        k.to(k_cache_ptr.dtype.element_ty), mask=mask,
    )
    tl.store(
        v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :],
        v.to(v_cache_ptr.dtype.element_ty), mask=mask,
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: [num_tokens, kv_heads, head_dim] (any row strides); caches: [num_blocks,
    block_size, kv_heads, head_dim]; slot_mapping: int64 [num_tokens], negative = skip."""
    num_tokens, num_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"shapes differ: key {tuple(key.shape)} value {tuple(value.shape)}, "
                         f"caches {tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != (num_heads, head_dim):
        raise ValueError(f"cache {tuple(k_cache.shape)} does not hold [.., {num_heads}, {head_dim}] rows")
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        require_unit_last_stride(name, t)
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_PAD=pow2(num_heads),
        HEAD_DIM=head_dim, DIM_PAD=pow2(head_dim), PAGE=k_cache.shape[1],
        num_warps=1 if num_heads * head_dim <= 512 else 4,
    )
