"""Every message that crosses a process boundary, as msgspec structs.

Each message is defined once, in the module of its family; this package re-exports them all, so
`from protocol.messages import X` is how every process imports one:
  base            : the struct bases `_Msg` (tagged) and `_Part` (untagged); FinishReason, WorkerRole
  client_requests : GenerateRequest, AddRequest, AbortRequests; choice ids and seeds
  engine_outputs  : DetokRequest, EngineOutputs and their token/prompt logprob parts
  worker_steps    : StepPlan (NewSeq, CachedSeq), StepResult, WorkerError
  stage_control   : WorkerHello (KVLayout) and the scheduler's answers, heartbeats, draining, shutdown
  kv_transfer     : KVPull, KVCancel, KVPullDone; the KV peer messages KVFetch/KVChunk and CUDA IPC
  gateway_outputs : TextOutputs (text deltas, rendered logprobs and prompt), RequestFailed
  scheduler_stats : SchedulerStats and its parts
  unions          : the union of each socket (below) and ALL_MESSAGE_TYPES

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

from protocol.messages.base import FinishReason, WorkerRole, _Msg, _Part
from protocol.messages.client_requests import (
    AbortRequests,
    AddRequest,
    GenerateRequest,
    choice_request_id,
    choice_seed,
)
from protocol.messages.engine_outputs import (
    DETOK_PROMPT_TAIL,
    DetokRequest,
    EngineOutputs,
    PromptLogprobsChunk,
    RequestOutput,
    TokenLogprobs,
)
from protocol.messages.gateway_outputs import (
    PromptOutput,
    RequestFailed,
    TextDelta,
    TextOutputs,
    TokenLogprob,
    TopLogprob,
)
from protocol.messages.kv_transfer import (
    KVCancel,
    KVChunk,
    KVFetch,
    KVIpcHandle,
    KVIpcHandleRequest,
    KVPull,
    KVPullDone,
)
from protocol.messages.scheduler_stats import (
    RequestPhases,
    SchedulerStats,
    TransferRecord,
    WorkerInfo,
)
from protocol.messages.stage_control import (
    Heartbeat,
    KVLayout,
    Shutdown,
    StageHeartbeat,
    WorkerAccepted,
    WorkerDraining,
    WorkerHello,
    WorkerRefused,
    WorkerUnknown,
)
from protocol.messages.unions import (
    ALL_MESSAGE_TYPES,
    DetokenizerInbound,
    DetokenizerOutbound,
    FromWorker,
    GatewayInbound,
    KVPeerReply,
    KVPeerRequest,
    SchedulerInbound,
    TokenizerInbound,
    TokenizerOutbound,
    ToWorker,
)
from protocol.messages.worker_steps import (
    CachedSeq,
    NewSeq,
    StepPlan,
    StepResult,
    WorkerError,
)

__all__ = [
    # base
    "_Msg",
    "_Part",
    "FinishReason",
    "WorkerRole",
    # client_requests
    "GenerateRequest",
    "AddRequest",
    "AbortRequests",
    "choice_request_id",
    "choice_seed",
    # engine_outputs
    "TokenLogprobs",
    "PromptLogprobsChunk",
    "RequestOutput",
    "EngineOutputs",
    "DETOK_PROMPT_TAIL",
    "DetokRequest",
    # worker_steps
    "NewSeq",
    "CachedSeq",
    "StepPlan",
    "StepResult",
    "WorkerError",
    # stage_control
    "KVLayout",
    "WorkerHello",
    "WorkerAccepted",
    "WorkerRefused",
    "WorkerUnknown",
    "Heartbeat",
    "WorkerDraining",
    "Shutdown",
    "StageHeartbeat",
    # kv_transfer
    "KVPull",
    "KVCancel",
    "KVPullDone",
    "KVFetch",
    "KVChunk",
    "KVIpcHandleRequest",
    "KVIpcHandle",
    # gateway_outputs
    "TopLogprob",
    "TokenLogprob",
    "PromptOutput",
    "TextDelta",
    "TextOutputs",
    "RequestFailed",
    # scheduler_stats
    "WorkerInfo",
    "TransferRecord",
    "RequestPhases",
    "SchedulerStats",
    # unions
    "SchedulerInbound",
    "ToWorker",
    "FromWorker",
    "KVPeerRequest",
    "KVPeerReply",
    "TokenizerInbound",
    "DetokenizerInbound",
    "DetokenizerOutbound",
    "TokenizerOutbound",
    "GatewayInbound",
    "ALL_MESSAGE_TYPES",
]
