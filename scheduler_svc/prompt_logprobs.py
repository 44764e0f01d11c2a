"""Collecting a request's prompt logprobs as prefill chunks report them.

Workers send the rows of each prefill chunk (`StepResult.prompt_logprobs`); the request keeps
them until its first token, whose output carries the whole prompt's rows at once. A recomputed
request (preempted, migrated) reports positions again: only positions not yet held are kept,
so the client sees each prompt token once. Pure: no clocks, no sockets.
"""

from __future__ import annotations

import numpy as np

from protocol.messages import PromptLogprobsChunk, TokenLogprobs
from scheduler_svc.request import Request

# Prompt tokens of prompt-logprob requests per step: their rows' logits ([rows, vocab] float32)
# are extra activations the KV sizing does not reserve, so they are bounded here.
MAX_PROMPT_ROWS_PER_STEP = 512


def wants_prompt_rows(req: Request) -> bool:
    """The request still needs prompt rows from a prefill: it must not skip prompt positions
    through prefix-cache hits (cached tokens have no logits)."""
    return (req.params.prompt_logprobs is not None
            and req.num_prompt_logprobs < req.num_prompt_tokens - 1)


def accept_chunk(req: Request, chunk: PromptLogprobsChunk) -> None:
    """Keep the rows of `chunk` that extend the positions held (1 .. num_prompt_logprobs)."""
    have = req.num_prompt_logprobs
    end = chunk.start + len(chunk.logprobs.ranks)
    if chunk.start > have + 1 or end <= have + 1:
        return  # a gap (cannot happen: chunks arrive in order) or nothing new
    skip = have + 1 - chunk.start
    rows = chunk.logprobs
    if skip:
        rows = TokenLogprobs(rows.token_ids[skip:], rows.logprobs[skip:], rows.ranks[skip:])
    req.prompt_logprob_parts.append(rows)
    req.num_prompt_logprobs = end - 1


def take_prompt_logprobs(req: Request) -> TokenLogprobs | None:
    """All rows held (prompt tokens 1..), once: the first output carries them."""
    if req.params.prompt_logprobs is None or req.prompt_logprobs_sent:
        return None
    req.prompt_logprobs_sent = True
    parts = req.prompt_logprob_parts
    req.prompt_logprob_parts = []
    width = req.params.prompt_logprobs + 1
    if not parts:  # a one-token prompt: nothing to score
        return TokenLogprobs(np.zeros((0, width), np.int64), np.zeros((0, width), np.float32),
                             np.zeros(0, np.int64))
    return TokenLogprobs(
        token_ids=np.concatenate([p.token_ids for p in parts]),
        logprobs=np.concatenate([p.logprobs for p in parts]),
        ranks=np.concatenate([p.ranks for p in parts]),
    )
