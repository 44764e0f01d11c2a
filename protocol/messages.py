"""Every message that crosses a process boundary, as msgspec structs.

Rules (see docs/architecture.md): structs are `array_like` (positional, compact; msgspec still
writes trailing defaults there, so `omit_defaults` only matters if a struct stops being
array_like); a new field is appended last with a default so older peers still decode; enums
are IntEnum; each socket has one tagged union and one decoder (`protocol.codec`). Arrays
(`numpy.ndarray`) travel as raw zero-copy frames, never inside the msgpack body.

Sockets and their unions:
  gateway -> tokenizer                     : TokenizerInbound    (GenerateRequest)
  gateway/tokenizer -> scheduler           : SchedulerInbound    (AddRequest | AbortRequests)
  scheduler -> detokenizer                 : DetokenizerInbound  (DetokRequest | EngineOutputs)
  detokenizer -> scheduler                 : DetokenizerOutbound (StageHeartbeat | AbortRequests)
  scheduler -> worker                      : ToWorker            (StepPlan | Shutdown)
  worker -> scheduler                      : FromWorker          (WorkerHello | StepResult | Heartbeat | WorkerError)
  tokenizer/detokenizer/scheduler -> gateway : GatewayInbound    (TextOutputs | RequestFailed | SchedulerStats | StageHeartbeat)
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec
import numpy as np

from protocol.sampling import SamplingParams


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    """Base of tagged messages: the tag is the class name unless a subclass sets its own."""


class _Part(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of untagged parts nested inside messages."""


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or the context length
    ABORT = 2  # the client went away or asked
    ERROR = 3  # something failed; RequestOutput.error says what

    @property
    def openai_name(self) -> str:
        return {0: "stop", 1: "length", 2: "abort", 3: "error"}[int(self)]


class WorkerRole(enum.IntEnum):
    MIXED = 0  # prefill and decode
    PREFILL = 1  # prefill only; hands KV blocks to a decode worker (disaggregation)
    DECODE = 2  # decode only; receives KV blocks


# ---------------------------------------------------------------- requests into the scheduler


class AddRequest(_Msg, tag="add"):
    """A tokenized, validated request, ready to schedule."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    priority: int = 0  # lower runs first (vLLM's convention); FCFS among equals
    parent_id: str = ""  # the client's request id when n > 1 made several of these
    index: int = 0  # which of the n choices this is


class AbortRequests(_Msg, tag="abort"):
    """Stop these requests now (client gone, stop string matched) and free their KV blocks."""

    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT


SchedulerInbound = AddRequest | AbortRequests


# ---------------------------------------------------------------- scheduler -> detokenizer


class TokenLogprobs(_Part):
    """Logprobs of the tokens in one RequestOutput: row i is new_token_ids[i]."""

    token_ids: np.ndarray  # int64 [n, k+1]: column 0 the sampled token, then the top k
    logprobs: np.ndarray  # float32 [n, k+1]
    ranks: np.ndarray  # int64 [n]: 1-based rank of the sampled token


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


class EngineOutputs(_Msg, tag="outputs"):
    outputs: list[RequestOutput]
    timestamp: float = 0.0


# ---------------------------------------------------------------- scheduler <-> worker


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


class Shutdown(_Msg, tag="shutdown"):
    reason: str = ""


class WorkerAccepted(_Msg, tag="accepted"):
    """The scheduler's answer to WorkerHello: the worker is registered and will get steps."""

    worker_id: str
    scheduler_pid: int


ToWorker = StepPlan | Shutdown | WorkerAccepted


class WorkerHello(_Msg, tag="hello"):
    """First message of a worker: the fixed facts the scheduler plans with."""

    worker_id: str
    role: WorkerRole
    pid: int
    host: str
    device: str
    model: str
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int


class StepResult(_Msg, tag="result"):
    """Tokens sampled in one step, row i belonging to request_ids[i]."""

    step_id: int
    worker_id: str
    request_ids: list[str]
    sampled_token_ids: np.ndarray  # int64 [n]
    logprobs: TokenLogprobs | None = None  # rows for every sampled request, when any asked
    execute_seconds: float = 0.0


class Heartbeat(_Msg, tag="heartbeat"):
    worker_id: str
    timestamp: float


class WorkerError(_Msg, tag="error"):
    """A step failed; the scheduler fails the step's requests with this message."""

    worker_id: str
    step_id: int
    message: str


FromWorker = WorkerHello | StepResult | Heartbeat | WorkerError

# ---------------------------------------------------------------- gateway -> tokenizer


class GenerateRequest(_Msg, tag="generate"):
    """A client request as the gateway validated it, before tokenization.

    Exactly one of prompt / prompt_token_ids / messages is set. The tokenizer turns it into n
    AddRequests (ids from `choice_request_id`), or one RequestFailed back to the gateway.
    """

    request_id: str
    params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    max_tokens_is_default: bool = False  # the client gave none: use what the context leaves
    priority: int = 0


TokenizerInbound = GenerateRequest


def choice_request_id(request_id: str, index: int, n: int) -> str:
    """The scheduler-side id of choice `index` of a request with n choices."""
    return request_id if n == 1 else f"{request_id}#{index}"


# ---------------------------------------------------------------- scheduler <-> detokenizer


DETOK_PROMPT_TAIL = 6  # prompt tokens a detokenizer gets as context for the first output's spaces


class DetokRequest(_Msg, tag="detok_new"):
    """Sent before a request's first output, so its detokenizer knows how to render it."""

    request_id: str
    parent_id: str
    index: int
    prompt_tail_ids: list[int]  # the last prompt tokens: context for the first output's spaces
    num_prompt_tokens: int
    params: SamplingParams


DetokenizerInbound = DetokRequest | EngineOutputs


class StageHeartbeat(_Msg, tag="stage"):
    """A tokenizer or detokenizer is alive (to the gateway; detokenizers also to the scheduler)."""

    stage: str  # "tokenizer" | "detokenizer"
    stage_id: str
    pid: int
    host: str
    timestamp: float


DetokenizerOutbound = StageHeartbeat | AbortRequests


# ---------------------------------------------------------------- to the gateway


class TopLogprob(_Part):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int


class TokenLogprob(_Part):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int
    top: list[TopLogprob] = []


class TextDelta(_Part):
    """New text of one choice, and how it ended when it has."""

    request_id: str  # the client's request id
    index: int  # choice index
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, all deltas included
    num_cached_tokens: int = 0
    queue_seconds: float | None = None  # arrival to first scheduling, on the first delta
    error: str = ""


class TextOutputs(_Msg, tag="text"):
    deltas: list[TextDelta]


class RequestFailed(_Msg, tag="failed"):
    """A request ended before producing output: the gateway answers with this HTTP status."""

    request_id: str
    status: int
    message: str
    param: str | None = None
    code: str | None = None


class WorkerInfo(_Part):
    worker_id: str
    role: WorkerRole
    pid: int
    host: str
    device: str
    state: str  # "ready" | "dead"
    num_blocks_total: int
    num_blocks_used: int
    num_running: int
    num_waiting: int
    num_steps: int = 0  # steps completed since the worker joined
    busy_seconds: float = 0.0  # their summed execute time (utilization = its rate of growth)


class SchedulerStats(_Msg, tag="stats"):
    """The scheduler's state, published periodically: readiness, /workers and metrics."""

    timestamp: float
    model: str
    max_model_len: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # blocks held by live requests / total, over all workers
    prefix_cache_queries: int  # cumulative prompt tokens looked up
    prefix_cache_hits: int  # cumulative prompt tokens found
    workers: list[WorkerInfo] = []


GatewayInbound = TextOutputs | RequestFailed | SchedulerStats | StageHeartbeat


ALL_MESSAGE_TYPES: tuple[type, ...] = (
    GenerateRequest,
    DetokRequest,
    StageHeartbeat,
    TextOutputs,
    RequestFailed,
    SchedulerStats,
    AddRequest,
    AbortRequests,
    EngineOutputs,
    StepPlan,
    Shutdown,
    WorkerAccepted,
    WorkerHello,
    StepResult,
    Heartbeat,
    WorkerError,
)
