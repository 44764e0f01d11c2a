"""The scheduler's record of one request: tokens so far, progress, and why it ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.messages import FinishReason, TokenLogprobs
from protocol.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again, to be recomputed from scratch (its outputs are kept)
    FINISHED = 3
    OUTGOING = 4  # prefilled; its KV blocks stay held until a decode worker has copied them (the
    # destination's reservation shares this record and status until it activates the request)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    priority: int
    seed: int
    order: int  # admission counter: FCFS tie-break, and "newest" for preemption
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs, grown in place
    num_computed_tokens: int = 0  # tokens whose KV is computed or scheduled to be
    num_inflight_samples: int = 0  # scheduled samples whose token has not come back yet
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    num_preemptions: int = 0
    on_worker: bool = False  # the worker holds state for it (CachedSeq from now on)
    admitted_step: int = 0  # step id of the plan that last (re)admitted it; older samples are stale
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    prefill_only: bool = False  # disaggregated: leave this worker once the next token is sampled
    # Phase clocks (time.time(), set by the scheduler process; 0.0 = not yet).
    first_scheduled_at: float = 0.0
    first_token_at: float = 0.0
    transfer_seconds: float = 0.0  # summed KV transfer time
    num_migrations: int = 0  # moved off a dead or draining worker, or after a failed transfer
    # Prompt logprobs (scheduler_svc.prompt_logprobs): rows held for prompt tokens 1..n.
    prompt_logprob_parts: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_logprobs: int = 0
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run, counting samples in flight as known (async scheduling)."""
        return self.num_tokens + self.num_inflight_samples - self.num_computed_tokens

    def sort_key(self, by_priority: bool) -> tuple[int, int]:
        return (self.priority if by_priority else 0, self.order)
