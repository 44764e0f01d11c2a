"""One tagged union per socket (what its codec decodes), and the list of every message type.

A union names messages of several families, so it lives here rather than with any of them; the
table of which socket carries which union is in `protocol.messages`.
"""

from __future__ import annotations

from protocol.messages.client_requests import AbortRequests, AddRequest, GenerateRequest
from protocol.messages.engine_outputs import DetokRequest, EngineOutputs
from protocol.messages.gateway_outputs import RequestFailed, TextOutputs
from protocol.messages.kv_transfer import (
    KVCancel,
    KVChunk,
    KVFetch,
    KVIpcHandle,
    KVIpcHandleRequest,
    KVPull,
    KVPullDone,
)
from protocol.messages.scheduler_stats import SchedulerStats
from protocol.messages.stage_control import (
    Heartbeat,
    Shutdown,
    StageHeartbeat,
    WorkerAccepted,
    WorkerDraining,
    WorkerHello,
    WorkerRefused,
    WorkerUnknown,
)
from protocol.messages.worker_steps import StepPlan, StepResult, WorkerError

SchedulerInbound = AddRequest | AbortRequests

ToWorker = StepPlan | Shutdown | WorkerAccepted | WorkerRefused | WorkerUnknown | KVPull | KVCancel

FromWorker = WorkerHello | StepResult | Heartbeat | WorkerError | KVPullDone | WorkerDraining

KVPeerRequest = KVFetch | KVIpcHandleRequest
KVPeerReply = KVChunk | KVIpcHandle

TokenizerInbound = GenerateRequest

DetokenizerInbound = DetokRequest | EngineOutputs

DetokenizerOutbound = StageHeartbeat | AbortRequests
TokenizerOutbound = StageHeartbeat  # a tokenizer's heartbeats teach the gateway its address

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
