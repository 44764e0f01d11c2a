"""Scheduler <-> worker, the steps themselves: a plan of one forward pass (`StepPlan`) and what
came of it (`StepResult`, or `WorkerError` when it failed)."""

from __future__ import annotations

import numpy as np

from protocol.messages.base import _Msg, _Part
from protocol.messages.engine_outputs import PromptLogprobsChunk, TokenLogprobs
from protocol.sampling import SamplingParams


class NewSeq(_Part):
    """A sequence the worker has no state for: first scheduling, or resumed after preemption.

    token_ids holds every known token (prompt, then outputs generated before a preemption), so a
    resumed sequence is recomputed without the scheduler sending anything else.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the blocks (prefix-cache hit)
    num_scheduled_tokens: int
    params: SamplingParams
    eos_token_ids: list[int]
    seed: int  # the request's seed, or one drawn by the scheduler when it has none


class CachedSeq(_Part):
    """A sequence the worker already holds: schedule more of its tokens.

    The worker feeds its own sampled tokens forward, so a decode step needs no token ids here;
    that is what lets the scheduler send step N+1 before step N's result has come back.
    """

    request_id: str
    new_block_ids: list[int]  # appended to the worker's block table for this sequence
    num_computed_tokens: int
    num_scheduled_tokens: int


class StepPlan(_Msg, tag="step"):
    """One forward pass: which tokens of which sequences to compute, and what to forget.

    A sequence is sampled when its scheduled tokens reach the end of its known tokens; a
    prefill chunk that stops short of the prompt's end is not sampled.
    """

    step_id: int
    new_seqs: list[NewSeq] = []
    cached_seqs: list[CachedSeq] = []
    finished_request_ids: list[str] = []  # finished, aborted or preempted: drop their state


class StepResult(_Msg, tag="result"):
    """Tokens sampled in one step, row i belonging to request_ids[i]."""

    step_id: int
    worker_id: str
    request_ids: list[str]
    sampled_token_ids: np.ndarray  # int64 [n]
    logprobs: TokenLogprobs | None = None  # rows for every sampled request, when any asked
    execute_seconds: float = 0.0  # wall time of the step on the worker (overlapped steps: once)
    gpu_seconds: float = 0.0  # device time from the step's first to its last queued work (CUDA)
    gpu_gap_seconds: float = 0.0  # device idle time between the previous step and this one, when
    # this step was already waiting (host overhead, not want of work); 0 on CPU
    prompt_logprobs: list[PromptLogprobsChunk] = []  # prefill rows of requests that asked
    request_errors: dict[str, str] = {}  # request id -> why it cannot go on (its grammar failed):
    # the scheduler ends it with this error and drops its row's token


class WorkerError(_Msg, tag="error"):
    """A step failed; the scheduler fails the step's requests with this message."""

    worker_id: str
    step_id: int
    message: str
