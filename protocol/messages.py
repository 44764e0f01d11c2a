"""Every message that crosses a process boundary, as msgspec structs.

Rules (see docs/architecture.md): structs are `array_like` (positional, compact; msgspec still
writes trailing defaults there, so `omit_defaults` only matters if a struct stops being
array_like); a new field is appended last with a default so older peers still decode; enums
are IntEnum; each socket has one tagged union and one decoder (`protocol.codec`). Arrays
(`numpy.ndarray`) travel as raw zero-copy frames, never inside the msgpack body.

Sockets and their unions:
  tokenizer/detokenizer -> scheduler : SchedulerInbound  (AddRequest | AbortRequests)
  scheduler -> detokenizer           : EngineOutputs
  scheduler -> worker                : ToWorker          (StepPlan | Shutdown)
  worker -> scheduler                : FromWorker        (WorkerHello | StepResult | Heartbeat | WorkerError)
"""

from __future__ import annotations

import enum

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


ToWorker = StepPlan | Shutdown


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

ALL_MESSAGE_TYPES: tuple[type, ...] = (
    AddRequest,
    AbortRequests,
    EngineOutputs,
    StepPlan,
    Shutdown,
    WorkerHello,
    StepResult,
    Heartbeat,
    WorkerError,
)
