"""Scheduler -> detokenizer: a request's facts before its first output (`DetokRequest`), then its
new tokens and logprob arrays (`EngineOutputs`); the logprob parts also ride on `StepResult`."""

from __future__ import annotations

import numpy as np

from protocol.messages.base import FinishReason, _Msg, _Part
from protocol.sampling import SamplingParams


class TokenLogprobs(_Part):
    """Logprobs of the tokens in one RequestOutput: row i is new_token_ids[i]."""

    token_ids: np.ndarray  # int64 [n, k+1]: column 0 the sampled token, then the top k
    logprobs: np.ndarray  # float32 [n, k+1]
    ranks: np.ndarray  # int64 [n]: 1-based rank of the sampled token


class PromptLogprobsChunk(_Part):
    """Prompt logprobs of one request from one prefill chunk: row i scores prompt token
    `start + i` (column 0 that token, then the top k) from the logits of the token before it."""

    request_id: str
    start: int  # >= 1: prompt token 0 has nothing before it
    logprobs: TokenLogprobs


class RequestOutput(_Part):
    """New tokens of one request since its last output, and whether it has finished."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the stop token that ended it, if any
    logprobs: TokenLogprobs | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str = ""
    queue_seconds: float | None = None  # arrival to first scheduling, on the first output
    # Rows for prompt tokens 1.. (as PromptLogprobsChunk.logprobs), once, with the first token.
    prompt_logprobs: TokenLogprobs | None = None


class EngineOutputs(_Msg, tag="outputs"):
    outputs: list[RequestOutput]
    timestamp: float = 0.0


DETOK_PROMPT_TAIL = 6  # prompt tokens a detokenizer gets as context for the first output's spaces


class DetokRequest(_Msg, tag="detok_new"):
    """Sent before a request's first output, so its detokenizer knows how to render it."""

    request_id: str
    parent_id: str
    index: int
    prompt_tail_ids: list[int]  # the last prompt tokens: context for the first output's spaces
    num_prompt_tokens: int
    params: SamplingParams
    prompt_token_ids: list[int] = []  # the whole prompt, when echo or prompt logprobs need it
