"""Plain-torch definitions of every Triton kernel here: what the kernels must compute.

Written for clarity, a Python loop over sequences where that reads best, math in float32 (or
float64 when asked). The tests and the device check compare the kernels with these, and these
follow the project's own torch path (gpu_worker.attention, gpu_worker.model, gpu_worker.rope),
which the CPU tests check as well. `gather_sdpa_decode` is the fast torch path for decode (the
blocks gathered, one batched SDPA call, as gpu_worker.attention does it), the baseline the
device benchmark times the kernels against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _seq_keys(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` rows [length, kv_heads, D] of one sequence, through its block table."""
    page = cache.shape[1]
    blocks = table[: -(-length // page)].long()
    return cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:length]


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
    scale: float, sliding_window: int | None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q [Q, Hq, D] at positions q_pos [Q] over keys/values [L, Hkv, D] at positions 0..L-1."""
    group = q.shape[1] // keys.shape[1]
    k = keys.to(dtype).repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), k) * scale
    k_pos = torch.arange(keys.shape[0], device=q.device)
    seen = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        seen &= k_pos[None, :] > q_pos[:, None] - sliding_window
    scores = scores.masked_fill(~seen[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees nothing gets 0
    return torch.einsum("hqk,khd->qhd", probs, v)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[num_seqs, Hq, D] in `dtype`: each query at position context_len - 1."""
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for s, length in enumerate(context_lens.tolist()):
        if length == 0:
            continue
        keys = _seq_keys(k_cache, block_tables[s], length)
        values = _seq_keys(v_cache, block_tables[s], length)
        pos = torch.tensor([length - 1], device=q.device)
        out[s] = attend(q[s : s + 1], keys, values, pos, scale, sliding_window, dtype)[0]
    return out


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
    sliding_window: int | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[num_tokens, Hq, D] in `dtype`: sequence s's queries are its last q_len positions."""
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    starts = query_start.tolist()
    for s, length in enumerate(context_lens.tolist()):
        a, b = starts[s], starts[s + 1]
        if b == a:
            continue
        keys = _seq_keys(k_cache, block_tables[s], length)
        values = _seq_keys(v_cache, block_tables[s], length)
        pos = torch.arange(length - (b - a), length, device=q.device)
        out[a:b] = attend(q[a:b], keys, values, pos, scale, sliding_window, dtype)
    return out


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Row t of key/value into slot slot_mapping[t] of the caches; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    heads, dim = key.shape[1], key.shape[2]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slots, value[keep].to(v_cache.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gpu_worker.model.rms_norm: float32 statistics, rounded to x's dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gpu_worker.rope.apply_rotary on both (new tensors): x * cos + rotate_half(x) * sin."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gather_sdpa_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    mask: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """The torch decode path: every sequence's blocks gathered, one SDPA with GQA folded.

    mask: bool [B, 1, group, L] (True = attend), or None when every context fills its blocks.
    """
    b, heads, dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    n = block_tables.shape[1]
    flat = block_tables.reshape(-1).long()
    keys = k_cache.view(k_cache.shape[0], -1).index_select(0, flat).view(b, n * page, kv_heads, dim)
    values = v_cache.view(v_cache.shape[0], -1).index_select(0, flat).view(b, n * page, kv_heads, dim)
    qg = q.view(b, kv_heads, group, dim)
    o = F.scaled_dot_product_attention(
        qg, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale,
    )
    return o.reshape(b, heads, dim)
