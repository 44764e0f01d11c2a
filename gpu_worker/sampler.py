"""Token sampler: logits [N, V] -> one token per row, plus optional logprobs.

Follows vLLM's order: grammar bitmask (structured output) -> banned tokens -> penalties ->
(greedy rows: argmax) -> temperature -> min_p -> top_k -> top_p -> random draw. Everything is batched tensor work on logits.device.

Random draws use no torch.Generator and no global RNG state: a counter-based integer hash of
(seed, output_index, token id) gives each row its own uniform noise, so a seeded row draws
the same token whatever else is in the batch, at any row position, on CPU and CUDA alike.
The per-row part (seed, output_index) -> 32-bit key is hashed once on the host when the batch
is built and the per-token part is batched int64 tensor work (`gpu_worker/sampling_noise.py`).
The draw is an exponential race (Gumbel-max): argmax(probs / E) with E = -log(u), done in
log space as argmax(logits - log E), which needs no softmax and never picks a -inf token.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from gpu_worker.sampling_batch import SamplingBatch
from gpu_worker.sampling_noise import uniform_noise
from gpu_worker.structured.token_bitmask import apply_token_bitmask


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # int64 [N, K+1]: column 0 the sampled token, then the top-K ids
    logprobs: torch.Tensor  # float32 [N, K+1]
    ranks: torch.Tensor  # int64 [N]: 1-based rank of the sampled token among all tokens


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [N]
    logprobs: LogprobsTensors | None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token per row of `logits` (float32 [N, V]); never modifies `logits`."""
    if logits.dim() != 2 or logits.shape != (batch.num_rows, batch.vocab_size):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} != ({batch.num_rows}, {batch.vocab_size})"
        )
    logits = logits.float()
    # Raw logprobs come from the model's logits before any processing (vLLM's default).
    raw_logprobs = None
    if batch.max_num_logprobs is not None:
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    if batch.num_rows == 0:
        token_ids = torch.zeros(0, dtype=torch.int64, device=logits.device)
    else:
        token_ids = _choose_tokens(process_logits(logits, batch), batch)
    logprobs = None
    if raw_logprobs is not None and batch.max_num_logprobs is not None:
        logprobs = gather_logprobs(raw_logprobs, token_ids, batch.max_num_logprobs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def _choose_tokens(processed: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.all_greedy:
        return processed.argmax(dim=-1)
    if batch.all_random:
        return _sample_random(processed, batch)
    tokens = processed.argmax(dim=-1)
    drawn = _sample_random(processed.index_select(0, batch.random_rows), batch)
    return tokens.index_copy_(0, batch.random_rows, drawn)


# ---- banned tokens and penalties (every row, greedy too) ----


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Grammar mask and banned tokens to -inf, then penalties. Returns a new tensor when
    anything changes."""
    if batch.allowed_bitmask is not None:  # structured output: what the grammar forbids
        logits = apply_token_bitmask(logits, batch.allowed_bitmask)
    if batch.banned_index is None and not batch.any_penalty:
        return logits
    out = logits.clone(memory_format=torch.contiguous_format)  # flat .view(-1) below
    if batch.banned_index is not None:
        out.view(-1).index_fill_(0, batch.banned_index, float("-inf"))
    return apply_penalties(out, batch)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only), as vLLM.

    Rows whose penalty is disabled contribute no indices, and their factors (1.0 / 0.0)
    leave every logit bit-identical.
    """
    n, v = logits.shape
    if batch.repetition_index is not None:
        seen = torch.zeros(n * v, dtype=torch.bool, device=logits.device)
        seen.index_fill_(0, batch.repetition_index, True)
        penalty = torch.where(seen.view(n, v), batch.repetition_penalty.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if batch.output_count_index is not None:
        counts = torch.zeros(n * v, dtype=torch.float32, device=logits.device)
        ones = torch.ones_like(batch.output_count_index, dtype=torch.float32)
        counts.index_add_(0, batch.output_count_index, ones)  # integer sums: exact in any order
        counts = counts.view(n, v)
        logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
        logits = logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).float()
    return logits


# ---- random rows: temperature, filtering, exponential race ----


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Draw for the random rows; `logits` and the batch's sampling tensors are both [R, ...]."""
    scaled = logits / batch.temperature.unsqueeze(1)
    if batch.any_min_p:
        scaled = apply_min_p(scaled, batch.min_p)
    if batch.any_top_p:
        scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
    elif batch.any_top_k:
        scaled = apply_top_k(scaled, batch.top_k, batch.max_top_k)
    noise = uniform_noise(batch.noise_keys, scaled.shape[1])
    # argmax(p / E) == argmax(logit - log E), E = -log(u) ~ Exp(1); -inf tokens never win.
    # float64 so that CPU and CUDA agree except on ties closer than ~1e-15.
    log_exponential = noise.log_().neg_().log_()
    return (scaled - log_exponential).argmax(dim=-1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep tokens at least as large as the k-th largest logit (ties at the k-th are kept).

    Uses topk(max_top_k) instead of a full sort; rows with top_k disabled (== V) keep all.
    """
    v = logits.shape[1]
    top_values = logits.topk(max_top_k, dim=-1).values
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth = torch.where(top_k.unsqueeze(1) >= v, float("-inf"), kth)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """top_k, then top_p on the renormalised survivors, via one ascending (stable) sort.

    top_p drops the least likely tokens whose cumulative probability is <= 1 - p, so the kept
    set is the smallest head with mass >= p; the most likely token is always kept.
    """
    v = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, stable=True)
    kth = sorted_logits.gather(1, (v - top_k).clamp(min=0).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


# ---- logprobs ----


def gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Sampled token's logprob and rank plus the top-`num_logprobs` tokens of each row.

    Rank counts tokens with logprob >= the sampled one's (vLLM's definition), so the argmax
    token has rank 1 unless it ties.
    """
    sampled = token_ids.unsqueeze(1)
    sampled_logprobs = raw_logprobs.gather(1, sampled)
    ranks = (raw_logprobs >= sampled_logprobs).sum(dim=-1)
    top = raw_logprobs.topk(num_logprobs, dim=-1)
    return LogprobsTensors(
        token_ids=torch.cat([sampled, top.indices], dim=1),
        logprobs=torch.cat([sampled_logprobs, top.values], dim=1),
        ranks=ranks,
    )
