"""Every message that crosses a process boundary, as msgspec structs.

Rules (see docs/architecture.md): structs are `array_like` (positional, compact; msgspec still
writes trailing defaults there, so `omit_defaults` only matters if a struct stops being
array_like); a new field is appended last with a default so older peers still decode; enums
are IntEnum; each socket has one tagged union and one decoder (`protocol.codec`). Arrays
(`numpy.ndarray`) travel as raw zero-copy frames, never inside the msgpack body.

Sockets and their unions:
  gateway -> tokenizer                     : TokenizerInbound    (GenerateRequest)
  tokenizer -> gateway (same socket)       : TokenizerOutbound   (StageHeartbeat)
  gateway/tokenizer -> scheduler           : SchedulerInbound    (AddRequest | AbortRequests)
  scheduler -> detokenizer                 : DetokenizerInbound  (DetokRequest | EngineOutputs)
  detokenizer -> scheduler                 : DetokenizerOutbound (StageHeartbeat | AbortRequests)
  scheduler -> worker                      : ToWorker            (StepPlan | Shutdown | WorkerAccepted | WorkerRefused | WorkerUnknown | KVPull | KVCancel)
  worker -> scheduler                      : FromWorker          (WorkerHello | StepResult | Heartbeat | WorkerError | KVPullDone | WorkerDraining)
  worker -> worker (KV peer, dst asks src)  : KVPeerRequest       (KVFetch | KVIpcHandleRequest)
  worker -> worker (KV peer, src answers)   : KVPeerReply         (KVChunk | KVIpcHandle)
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


class KVPull(_Msg, tag="kv_pull"):
    """To a destination worker: copy these blocks of a source worker into these blocks of yours.

    The scheduler holds both sides' blocks for the transfer's whole life, so neither is reused
    while it runs; the destination answers with one KVPullDone, or drops it on KVCancel.
    """

    transfer_id: int
    request_id: str
    src_worker_id: str
    src_address: str  # the source's KV peer socket (WorkerHello.kv_address)
    src_block_ids: list[int]
    dst_block_ids: list[int]  # same length, pairwise
    transport: str  # "zmq" | "cuda-ipc"
    timeout: float  # seconds before the destination gives up and reports failure


class KVCancel(_Msg, tag="kv_cancel"):
    """Stop a transfer and never write its blocks again (the scheduler freed them)."""

    transfer_id: int


class WorkerRefused(_Msg, tag="refused"):
    """The worker does not fit the stack (another model, KV layout or context): it must exit."""

    worker_id: str
    reason: str


class WorkerUnknown(_Msg, tag="unknown"):
    """The scheduler has no record of this worker (it restarted, or declared it dead): register
    again with a fresh WorkerHello, after dropping every sequence."""

    worker_id: str


class WorkerAccepted(_Msg, tag="accepted"):
    """The scheduler's answer to WorkerHello: the worker is registered and will get steps."""

    worker_id: str
    scheduler_pid: int


ToWorker = StepPlan | Shutdown | WorkerAccepted | WorkerRefused | WorkerUnknown | KVPull | KVCancel


class KVLayout(_Part):
    """What must agree between workers that exchange KV blocks, checked at registration."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"
    block_size: int


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
    kv_layout: KVLayout | None = None
    kv_address: str = ""  # where this worker serves its KV blocks to peers (KVFetch)
    transports: list[str] = []  # KV transports it can pull with: "zmq", "cuda-ipc"
    node_id: str = ""  # host identity for same-host transports (boot id + hostname)


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


class Heartbeat(_Msg, tag="heartbeat"):
    worker_id: str
    timestamp: float


class WorkerError(_Msg, tag="error"):
    """A step failed; the scheduler fails the step's requests with this message."""

    worker_id: str
    step_id: int
    message: str


class KVPullDone(_Msg, tag="kv_done"):
    """A destination worker finished (ok) or gave up on (not ok) a KVPull."""

    worker_id: str
    transfer_id: int
    ok: bool
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str = ""
    error: str = ""


class WorkerDraining(_Msg, tag="draining"):
    """The worker got SIGTERM: no new requests; it exits when the scheduler sends Shutdown."""

    worker_id: str


FromWorker = WorkerHello | StepResult | Heartbeat | WorkerError | KVPullDone | WorkerDraining


# ---------------------------------------------------------------- worker <-> worker (KV peers)


class KVFetch(_Msg, tag="kv_fetch"):
    """Destination to source: send the KV of these blocks (one chunk of a transfer)."""

    transfer_id: int
    chunk: int
    block_ids: list[int]


class KVChunk(_Msg, tag="kv_chunk"):
    """Source to destination: the blocks of one KVFetch, [layers, 2, n, block_size, kv_heads,
    head_dim] in the cache's dtype (bfloat16 travels as its raw 16-bit pattern); on failure an
    empty array and the reason."""

    transfer_id: int
    chunk: int
    data: np.ndarray
    error: str = ""


class KVIpcHandleRequest(_Msg, tag="kv_ipc_req"):
    """Destination to source: the CUDA IPC handle of your KV cache, to copy on the device."""

    node_id: str


class KVIpcHandle(_Msg, tag="kv_ipc"):
    """Source to destination: what opening the source's cache storage in another process needs."""

    handle: bytes = b""
    fields: list[int] = []  # the integer parts of torch's CUDA storage share tuple, in order
    ref_counter_handle: bytes = b""
    event_handle: bytes = b""
    shape: list[int] = []
    dtype: str = ""
    error: str = ""


KVPeerRequest = KVFetch | KVIpcHandleRequest
KVPeerReply = KVChunk | KVIpcHandle

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
    tools: list[dict[str, Any]] | None = None  # OpenAI tool objects, rendered by the chat template


TokenizerInbound = GenerateRequest


def choice_request_id(request_id: str, index: int, n: int) -> str:
    """The scheduler-side id of choice `index` of a request with n choices."""
    return request_id if n == 1 else f"{request_id}#{index}"


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: seed + index (vLLM's rule, so seeded choices differ),
    wrapped into the signed 64-bit range msgpack and the sampler carry."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


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
    prompt_token_ids: list[int] = []  # the whole prompt, when echo or prompt logprobs need it


DetokenizerInbound = DetokRequest | EngineOutputs


class StageHeartbeat(_Msg, tag="stage"):
    """A tokenizer or detokenizer is alive (to the gateway; detokenizers also to the scheduler).
    A new pid under a known stage id means the stage restarted: what it held is lost."""

    stage: str  # "tokenizer" | "detokenizer"
    stage_id: str
    pid: int
    host: str
    timestamp: float


DetokenizerOutbound = StageHeartbeat | AbortRequests
TokenizerOutbound = StageHeartbeat  # a tokenizer's heartbeats teach the gateway its address


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
    top: list[TopLogprob] = []  # highest first: the i-th has rank i + 1
    rank: int | None = None  # 1-based rank of this token among all (sent for prompt tokens)


class PromptOutput(_Part):
    """The prompt as a client gets it back (completions `echo`, `prompt_logprobs`)."""

    text: str  # the prompt decoded ("" unless echo was asked)
    first_token: str  # prompt token 0's text: it has no logprob (nothing precedes it)
    logprobs: list[TokenLogprob] = []  # prompt tokens 1.., when prompt logprobs were asked


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
    prompt: PromptOutput | None = None  # on a choice's first delta, when echo or prompt logprobs


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
    state: str  # "ready" | "draining" | "dead"
    num_blocks_total: int
    num_blocks_used: int
    num_running: int
    num_waiting: int
    num_steps: int = 0  # steps completed since the worker joined
    busy_seconds: float = 0.0  # their summed execute time (utilization = its rate of growth)
    gpu_seconds: float = 0.0  # summed device time of the steps (CUDA)
    gpu_gap_seconds: float = 0.0  # summed device idle time between back-to-back steps (CUDA)
    transfers_in: int = 0  # KV transfers into this worker in flight
    transfers_out: int = 0  # KV transfers out of it in flight
    transfers_done: int = 0  # completed transfers into it since it joined
    transfer_bytes: int = 0  # their bytes
    transports: list[str] = []
    transfers_by_transport: dict[str, int] = {}  # completed transfers into it, by the path used


class TransferRecord(_Part):
    """One finished KV transfer, reported once in the next SchedulerStats (for histograms)."""

    transport: str
    num_bytes: int
    seconds: float
    ok: bool


class RequestPhases(_Part):
    """Where one finished request spent its time, reported once (for histograms).

    queue: arrival to first scheduled; prefill: first scheduled to first token; transfer: KV
    transfers (0 without disaggregation); decode: first token to finish, transfers excluded.
    """

    queue_seconds: float
    prefill_seconds: float
    transfer_seconds: float
    decode_seconds: float
    disaggregated: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


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
    transfers: list[TransferRecord] = []  # finished since the previous stats
    phases: list[RequestPhases] = []  # requests finished since the previous stats
    num_migrations: int = 0  # cumulative: requests moved off a dead or draining worker
    num_preemptions: int = 0  # cumulative
    integrity_checks: int = 0  # cumulative full checks of every worker's KV accounting
    integrity_failures: int = 0  # of those, failed (a bug: the log says what contradicted)
    step_tokens: list[int] = []  # tokens scheduled in each step planned since the previous stats
    # The KV cache config as vLLM's cache_config_info labels (block_size, num_gpu_blocks, ...).
    cache_info: dict[str, str] = {}
    max_waiting: int = 0  # the stack-wide waiting bound now (admission at the gateway)
    batch_capacity: int = 0  # sequences the ready workers can run at once


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
    WorkerRefused,
    WorkerUnknown,
    KVPull,
    KVCancel,
    WorkerHello,
    StepResult,
    Heartbeat,
    WorkerError,
    KVPullDone,
    WorkerDraining,
    KVFetch,
    KVChunk,
    KVIpcHandleRequest,
    KVIpcHandle,
)
