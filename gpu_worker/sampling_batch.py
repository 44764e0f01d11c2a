"""Per-step sampling parameters, turned from plain Python rows into device tensors once.

The sampler's hot path must be pure batched tensor work, so everything that needs a Python
loop over rows (reading the requests' settings, flattening their token lists) happens here,
on the host, once per step. Flags record which features any row uses so that `sample()`
can skip whole stages (penalties, filtering, random draws, logprobs) when no row needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker.inflight import pinned_to_device
from gpu_worker.sampling_noise import noise_key

# Temperatures below this are greedy (as in vLLM): dividing by them would overflow anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

_INT64_RANGE = 1 << 64
_INT64_MIN = -(1 << 63)


@dataclass
class SamplingRow:
    """One sequence being sampled this step (plain Python values)."""

    temperature: float  # 0.0 -> greedy (argmax of the processed logits)
    top_k: int  # 0 or -1 -> disabled
    top_p: float  # 1.0 -> disabled
    min_p: float  # 0.0 -> disabled
    repetition_penalty: float  # 1.0 -> disabled; over prompt AND output tokens
    presence_penalty: float  # 0.0 -> disabled; output tokens only
    frequency_penalty: float  # 0.0 -> disabled; output tokens only
    seed: int  # every row has one (the caller draws one for unseeded requests)
    output_index: int  # index within the request's output of the token being sampled
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int]  # tokens forbidden this step (e.g. EOS before min_tokens)
    num_logprobs: int | None  # None -> no logprobs; k>=0 -> sampled token's logprob plus top-k

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass
class SamplingBatch:
    """Tensors for one sampling step, all on `device`.

    Sampling parameters (temperature ... noise_keys) are held only for the rows that sample
    randomly, in the order of `random_rows`; greedy rows never look at them. `noise_keys` are
    hashed from (seed, output_index) here, on the host, which spares the GPU ~40 tiny kernels.
    Penalties apply to every row, so they are [N]. Token lists are held as *flat* indices
    `row * V + token` rather than padded [N, L] tensors: ragged prompts cost no padding, and
    one `index_fill_`/`index_add_` on the flattened [N*V] logits applies them. Each index
    tensor is None unless some row needs it, and only the rows that use the feature add to it.
    """

    num_rows: int
    vocab_size: int
    device: torch.device
    # Rows that sample randomly (int64 [R]) and their parameters ([R] each).
    random_rows: torch.Tensor
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, disabled -> vocab_size
    top_p: torch.Tensor  # float32, disabled -> 1.0
    min_p: torch.Tensor  # float32, disabled -> 0.0
    seeds: torch.Tensor  # int64
    output_index: torch.Tensor  # int64
    noise_keys: torch.Tensor  # int64 in [0, 2^32): noise_key(seed, output_index), on the host
    # Penalties of every row ([N] each).
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    # Flat token indices (int64, row * vocab_size + token), None when no row needs them.
    banned_index: torch.Tensor | None
    repetition_index: torch.Tensor | None  # prompt + output tokens of rows with repetition_penalty
    output_count_index: torch.Tensor | None  # output tokens of rows with presence/frequency
    # Flags that let sample() skip whole stages.
    all_greedy: bool
    all_random: bool
    any_penalty: bool
    any_top_k: bool  # among random rows
    any_top_p: bool  # among random rows
    any_min_p: bool  # among random rows
    max_top_k: int  # largest enabled top_k among random rows (0 if none)
    max_num_logprobs: int | None  # None when no row asked for logprobs
    # Structured output: int32 [N, ceil(V/32)] allowed-token bits (gpu_worker.structured), or None.
    allowed_bitmask: torch.Tensor | None = None

    @property
    def num_random(self) -> int:
        return int(self.random_rows.shape[0])

    @property
    def any_top_k_or_p(self) -> bool:
        return self.any_top_k or self.any_top_p

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device,
        allowed_bitmask: np.ndarray | None = None,
    ) -> SamplingBatch:
        device = torch.device(device)
        v = vocab_size
        random_rows = [i for i, r in enumerate(rows) if not r.is_greedy]
        sampled = [rows[i] for i in random_rows]

        top_k = [_effective_top_k(r.top_k, v) for r in sampled]
        enabled_top_k = [k for k in top_k if k < v]
        any_top_p = any(r.top_p < 1.0 for r in sampled)
        any_min_p = any(r.min_p > 0.0 for r in sampled)

        rep_rows = [i for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
        count_rows = [
            i for i, r in enumerate(rows) if r.presence_penalty != 0.0 or r.frequency_penalty != 0.0
        ]
        banned_rows = [i for i, r in enumerate(rows) if len(r.banned_token_ids) > 0]
        banned = _flat_index([(i, _in_vocab(rows[i].banned_token_ids, v)) for i in banned_rows], v)
        repetition = _flat_index(
            [(i, rows[i].prompt_token_ids) for i in rep_rows]
            + [(i, rows[i].output_token_ids) for i in rep_rows],
            v,
        )
        counted = _flat_index([(i, rows[i].output_token_ids) for i in count_rows], v)

        seeds = [_fold_int64(r.seed) for r in sampled]
        ints = _to_device(
            [
                np.asarray(random_rows, dtype=np.int64),
                np.asarray(top_k, dtype=np.int64),
                np.asarray(seeds, dtype=np.int64),
                np.asarray([r.output_index for r in sampled], dtype=np.int64),
                np.asarray(
                    [noise_key(s, r.output_index) for s, r in zip(seeds, sampled)], dtype=np.int64
                ),
                banned,
                repetition,
                counted,
            ],
            np.int64,
            device,
        )
        floats = _to_device(
            [
                np.asarray([r.temperature for r in sampled], dtype=np.float32),
                np.asarray([r.top_p for r in sampled], dtype=np.float32),
                np.asarray([r.min_p for r in sampled], dtype=np.float32),
                np.asarray([r.repetition_penalty for r in rows], dtype=np.float32),
                np.asarray([r.presence_penalty for r in rows], dtype=np.float32),
                np.asarray([r.frequency_penalty for r in rows], dtype=np.float32),
            ],
            np.float32,
            device,
        )
        wanted = [r.num_logprobs for r in rows if r.num_logprobs is not None]
        return cls(
            num_rows=len(rows),
            vocab_size=v,
            device=device,
            random_rows=ints[0],
            top_k=ints[1],
            seeds=ints[2],
            output_index=ints[3],
            noise_keys=ints[4],
            banned_index=ints[5] if banned_rows else None,
            repetition_index=ints[6] if rep_rows else None,
            output_count_index=ints[7] if count_rows else None,
            temperature=floats[0],
            top_p=floats[1],
            min_p=floats[2],
            repetition_penalty=floats[3],
            presence_penalty=floats[4],
            frequency_penalty=floats[5],
            all_greedy=not random_rows,
            all_random=len(random_rows) == len(rows),
            any_penalty=bool(rep_rows or count_rows),
            any_top_k=bool(enabled_top_k),
            any_top_p=any_top_p,
            any_min_p=any_min_p,
            max_top_k=max(enabled_top_k, default=0),
            max_num_logprobs=min(max(wanted), v) if wanted else None,
            allowed_bitmask=None if allowed_bitmask is None
            else torch.from_numpy(allowed_bitmask).to(device, non_blocking=True),
        )


def _effective_top_k(top_k: int, vocab_size: int) -> int:
    """Disabled (<= 0) or oversized top_k becomes vocab_size, which keeps every token."""
    return vocab_size if top_k <= 0 or top_k > vocab_size else top_k


def _fold_int64(seed: int) -> int:
    """Any Python int seed, wrapped into the signed int64 range (same bits modulo 2^64)."""
    return (seed - _INT64_MIN) % _INT64_RANGE + _INT64_MIN


def _in_vocab(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    """Banned ids the model cannot produce anyway (e.g. a stop id past the logits' width) are
    dropped: banning them is vacuous, and indexing with them would fault."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    return ids[(ids >= 0) & (ids < vocab_size)]


def _flat_index(rows_tokens: list[tuple[int, Sequence[int]]], vocab_size: int) -> np.ndarray:
    """Concatenate `row * vocab_size + token` over rows; rejects out-of-vocab prompt/output
    ids, which would otherwise fault (CUDA) or silently hit a neighbouring row's logits."""
    parts = []
    for row, tokens in rows_tokens:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"row {row}: token id outside [0, {vocab_size})")
        parts.append(ids + row * vocab_size)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _to_device(parts: list[np.ndarray], dtype: type, device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy for many small arrays, split back into views on the device."""
    sizes = [int(p.size) for p in parts]
    packed = pinned_to_device(np.concatenate(parts).astype(dtype, copy=False), device)
    return list(torch.split(packed, sizes))
