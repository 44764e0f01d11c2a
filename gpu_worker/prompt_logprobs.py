"""Prompt logprobs from the prefill's own forward: no second pass over the prompt.

A request with `prompt_logprobs` set wants, for each prompt token t >= 1, log p(token t | tokens
before it), the token's rank and the top k alternatives. Those come from the logits of packed
row t - 1, which the prefill computes anyway (only its norm and LM head are extra). Each prefill
chunk contributes the rows of the prompt positions it runs, so chunked prefill needs nothing
special; the scheduler admits such a request without prefix-cache hits (a cached token has no
row). A recomputed request (after preemption or migration) sends its rows again and the
scheduler keeps only positions it has not seen.

`select_prompt_rows` picks the rows (before the forward: the executor computes logits for
`StepInputs.prompt_rows` after the sampled rows); `gather_prompt_logprobs` turns those logits
into one `PromptLogprobsChunk` per request, a few hundred rows at a time so the full-vocabulary
log-softmax never holds more than that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.seq_state import ScheduledSeq
from gpu_worker.step_inputs import StepInputs
from protocol.messages import PromptLogprobsChunk, TokenLogprobs

ROWS_PER_SLICE = 256  # rows log-softmaxed at once: bounds the float32 [rows, vocab] temporaries


@dataclass
class PromptSpan:
    """One request's rows in this step: logits rows [offset, offset + count) score prompt
    tokens start .. start + count - 1."""

    request_id: str
    start: int
    offset: int
    count: int
    k: int


@dataclass
class PromptRows:
    rows: np.ndarray  # int64 [R]: packed rows (StepInputs.prompt_rows)
    targets: np.ndarray  # int64 [R]: the prompt token each row scores
    spans: list[PromptSpan] = field(default_factory=list)


def select_prompt_rows(scheduled: list[ScheduledSeq], step: StepInputs) -> PromptRows | None:
    """The rows of this step that score a prompt token of a request asking for prompt logprobs;
    None when there are none. A chunk at positions [c, c + n) scores tokens c + 1 .. up to the
    last prompt token (the last prompt position's row samples the first output instead)."""
    rows: list[np.ndarray] = []
    targets: list[int] = []
    spans: list[PromptSpan] = []
    offset = 0
    for i, s in enumerate(scheduled):
        k = s.state.params.prompt_logprobs
        if k is None:
            continue
        lo = s.num_computed
        hi = min(s.num_computed + s.num_scheduled, s.state.num_prompt_tokens - 1)
        if hi <= lo:
            continue
        count = hi - lo
        rows.append(step.query_start[i] + np.arange(count, dtype=np.int64))
        targets.extend(s.state.token_ids[lo + 1 : hi + 1])
        spans.append(PromptSpan(s.state.request_id, lo + 1, offset, count, k))
        offset += count
    if not spans:
        return None
    return PromptRows(np.concatenate(rows), np.asarray(targets, dtype=np.int64), spans)


def gather_prompt_logprobs(logits: torch.Tensor, plan: PromptRows) -> list[PromptLogprobsChunk]:
    """Logprob, rank and top k of each target from `logits` (float32 [R, V], row i for
    plan.rows[i]); raw logprobs (a log-softmax of the model's logits), as for sampled tokens."""
    k_max = max(span.k for span in plan.spans)
    targets = torch.from_numpy(plan.targets).to(logits.device)
    ids, values, ranks = [], [], []
    for lo in range(0, len(plan.targets), ROWS_PER_SLICE):
        logprobs = torch.log_softmax(logits[lo : lo + ROWS_PER_SLICE].float(), dim=-1)
        target = targets[lo : lo + ROWS_PER_SLICE].unsqueeze(1)
        chosen = logprobs.gather(1, target)
        ranks.append((logprobs >= chosen).sum(dim=-1))
        top = logprobs.topk(k_max, dim=-1) if k_max else None
        ids.append(target if top is None else torch.cat([target, top.indices], dim=1))
        values.append(chosen if top is None else torch.cat([chosen, top.values], dim=1))
    all_ids = torch.cat(ids).cpu().numpy()
    all_values = torch.cat(values).cpu().numpy()
    all_ranks = torch.cat(ranks).cpu().numpy()
    return [
        PromptLogprobsChunk(
            span.request_id, span.start,
            TokenLogprobs(
                token_ids=np.ascontiguousarray(all_ids[span.offset : span.offset + span.count, : span.k + 1]),
                logprobs=np.ascontiguousarray(all_values[span.offset : span.offset + span.count, : span.k + 1]),
                ranks=np.ascontiguousarray(all_ranks[span.offset : span.offset + span.count]),
            ),
        )
        for span in plan.spans
    ]
