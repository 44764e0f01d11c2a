"""Every message survives the codec of its socket, with its arrays travelling as frames.

Arrays in detail: test_protocol_arrays.py; bad input: test_protocol_bad_input.py; older and
newer peers: test_protocol_versions.py.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from protocol.codec import INLINE_MAX_BYTES, Codec
from protocol.messages import (
    ALL_MESSAGE_TYPES,
    AbortRequests,
    AddRequest,
    CachedSeq,
    DetokenizerInbound,
    DetokenizerOutbound,
    DetokRequest,
    GatewayInbound,
    GenerateRequest,
    RequestFailed,
    SchedulerStats,
    StageHeartbeat,
    TextDelta,
    TextOutputs,
    TokenizerInbound,
    PromptLogprobsChunk,
    PromptOutput,
    TokenLogprob,
    TopLogprob,
    WorkerInfo,
    EngineOutputs,
    FinishReason,
    FromWorker,
    Heartbeat,
    NewSeq,
    RequestOutput,
    SchedulerInbound,
    Shutdown,
    StepPlan,
    StepResult,
    TokenLogprobs,
    ToWorker,
    WorkerAccepted,
    WorkerError,
    WorkerHello,
    WorkerRole,
    KVCancel,
    KVChunk,
    KVFetch,
    KVIpcHandle,
    KVIpcHandleRequest,
    KVLayout,
    KVPeerReply,
    KVPeerRequest,
    KVPull,
    KVPullDone,
    RequestPhases,
    TransferRecord,
    WorkerDraining,
    WorkerRefused,
    WorkerUnknown,
)
from protocol.sampling import SamplingParams
from protocol.structured_output import StructuredOutput
from tests.protocol_helpers import assert_same, small_logprobs


UNION_OF: dict[type, Any] = {
    GenerateRequest: TokenizerInbound,
    DetokRequest: DetokenizerInbound,
    StageHeartbeat: DetokenizerOutbound,
    TextOutputs: GatewayInbound,
    RequestFailed: GatewayInbound,
    SchedulerStats: GatewayInbound,
    AddRequest: SchedulerInbound,
    AbortRequests: SchedulerInbound,
    EngineOutputs: EngineOutputs,
    StepPlan: ToWorker,
    Shutdown: ToWorker,
    WorkerAccepted: ToWorker,
    WorkerHello: FromWorker,
    StepResult: FromWorker,
    Heartbeat: FromWorker,
    WorkerError: FromWorker,
    WorkerRefused: ToWorker,
    WorkerUnknown: ToWorker,
    KVPull: ToWorker,
    KVCancel: ToWorker,
    KVPullDone: FromWorker,
    WorkerDraining: FromWorker,
    KVFetch: KVPeerRequest,
    KVIpcHandleRequest: KVPeerRequest,
    KVChunk: KVPeerReply,
    KVIpcHandle: KVPeerReply,
}

PARAMS = SamplingParams(
    max_tokens=77, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=-0.5, seed=1234, min_tokens=3,
    stop_token_ids=[7, 8], ignore_eos=True, logprobs=5, stop=["\n\n", "END"],
    include_stop_str_in_output=True, skip_special_tokens=False, prompt_logprobs=2, echo=True,
    structured=StructuredOutput("json_schema", '{"type":"object"}'),
)


def big_logprobs(n: int, k: int) -> TokenLogprobs:
    """Arrays above the inline threshold: they must travel as frames."""
    rng = np.random.default_rng(0)
    return TokenLogprobs(
        token_ids=rng.integers(0, 50_000, size=(n, k + 1), dtype=np.int64),
        logprobs=rng.standard_normal((n, k + 1)).astype(np.float32),
        ranks=np.arange(1, n + 1, dtype=np.int64),
    )


SAMPLES: list[tuple[str, Any]] = [
    (
        "generate-chat",
        GenerateRequest("g1", PARAMS, 17.5, messages=[{"role": "user", "content": "hi ✓"}], n=3,
                        max_tokens_is_default=True, priority=2, prompt="p",
                        prompt_token_ids=[1, 2],
                        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ),
    ("generate-default", GenerateRequest("g2", SamplingParams(), 1.0)),
    ("detok-new", DetokRequest("g1#0", "g1", 0, [5, 6, 7], 30, PARAMS, prompt_token_ids=[1, 5, 6, 7])),
    ("stage", StageHeartbeat("detokenizer", "detok-1", 77, "h", 3.5)),
    (
        "text",
        TextOutputs([
            TextDelta("g1", 2, "héllo", [4, 5], finish_reason="stop", stop_reason="END",
                      logprobs=[TokenLogprob("hé", -0.5, [104, 195, 169], 4,
                                             top=[TopLogprob("hé", -0.5, [104, 195, 169], 4)], rank=2)],
                      num_prompt_tokens=30, num_output_tokens=9, num_cached_tokens=16,
                      queue_seconds=0.01, error="e",
                      prompt=PromptOutput("a b", "a", [TokenLogprob(" b", -1.5, [32, 98], 3, rank=7)])),
            TextDelta("g2", 0, "", [], stop_reason=2),
        ]),
    ),
    ("failed", RequestFailed("g3", 429, "queue full", param="prompt", code="overloaded")),
    (
        "stats",
        SchedulerStats(5.0, "smollm2-135m", 8192, 3, 4, 0.25, 100, 40,
                       workers=[WorkerInfo("w0", WorkerRole.MIXED, 9, "h", "cpu", "ready", 100, 25, 3, 4,
                                           num_steps=5, busy_seconds=1.5, gpu_seconds=1.25, gpu_gap_seconds=0.5,
                                           transfers_in=1, transfers_out=2,
                                           transfers_done=3, transfer_bytes=4096, transports=["zmq"],
                                           transfers_by_transport={"zmq": 2, "cuda-ipc": 1})],
                       transfers=[TransferRecord("zmq", 1 << 20, 0.01, True)],
                       phases=[RequestPhases(0.1, 0.2, 0.05, 1.5, disaggregated=True,
                                             num_prompt_tokens=12, num_output_tokens=5)],
                       num_migrations=2, num_preemptions=3, integrity_checks=9, integrity_failures=1,
                       step_tokens=[64, 3], cache_info={"block_size": "16"},
                       max_waiting=64, batch_capacity=32),
    ),
    ("add", AddRequest("req-1", [1, 2, 3, 40_000], PARAMS, [2, 0], 1712.5, priority=-3,
                       parent_id="req", index=3)),
    ("add-default-params", AddRequest("req-2", [9], SamplingParams(), [2], 0.25)),
    ("abort", AbortRequests(["a", "b"], reason=FinishReason.STOP)),
    (
        "outputs",
        EngineOutputs(
            [
                RequestOutput(
                    "r1", [11, 12], finish_reason=FinishReason.LENGTH, stop_token_id=2,
                    logprobs=small_logprobs(), num_prompt_tokens=9, num_cached_tokens=4,
                    error="boom", queue_seconds=0.5, prompt_logprobs=big_logprobs(30, 2),
                ),
                RequestOutput("r2", [13], logprobs=big_logprobs(40, 5)),
                RequestOutput("r3", [], finish_reason=None, stop_token_id=None, logprobs=None),
            ],
            timestamp=99.5,
        ),
    ),
    (
        "step",
        StepPlan(
            41,
            new_seqs=[NewSeq("n1", [1, 2, 3], 3, [0, 1], 16, 3, PARAMS, [2], 777)],
            cached_seqs=[CachedSeq("c1", [5], 20, 1), CachedSeq("c2", [], 7, 1)],
            finished_request_ids=["old"],
        ),
    ),
    ("step-empty", StepPlan(0)),
    ("shutdown", Shutdown(reason="bye")),
    ("accepted", WorkerAccepted("w0", 4321)),
    (
        "hello",
        WorkerHello("w0", WorkerRole.DECODE, 4242, "host-a", "cuda:1", "smollm2-135m",
                    1024, 16, 8192, 49152),
    ),
    (
        "result-big",
        StepResult(7, "w0", [f"r{i}" for i in range(300)],
                   np.arange(300, dtype=np.int64) * 3, logprobs=big_logprobs(300, 4),
                   execute_seconds=0.125, gpu_seconds=0.0625, gpu_gap_seconds=0.001,
                   prompt_logprobs=[PromptLogprobsChunk("r0", 1, big_logprobs(20, 3)),
                                    PromptLogprobsChunk("r1", 9, small_logprobs())],
                   request_errors={"r2": "the output does not match the grammar"}),
    ),
    ("result-small-no-logprobs", StepResult(8, "w1", ["x"], np.array([5], dtype=np.int64))),
    (
        "hello-disagg",
        WorkerHello("w1", WorkerRole.PREFILL, 4243, "host-a", "cpu", "m", 64, 16, 2048, 100,
                    kv_layout=KVLayout(30, 3, 64, "bfloat16", 16), kv_address="ipc:///tmp/kv-w1.sock",
                    transports=["zmq", "cuda-ipc"], node_id="boot:host-a"),
    ),
    ("refused", WorkerRefused("w1", "another model")),
    ("unknown", WorkerUnknown("w1")),
    ("kv-pull", KVPull(3, "r1", "w1", "ipc:///tmp/kv-w1.sock", [4, 5, 6], [9, 8, 7], "zmq", 5.0)),
    ("kv-cancel", KVCancel(3)),
    ("kv-done", KVPullDone("w2", 3, False, num_bytes=123, seconds=0.5, transport="zmq", error="timeout")),
    ("draining", WorkerDraining("w2")),
    ("kv-fetch", KVFetch(3, 0, [4, 5])),
    ("kv-chunk", KVChunk(3, 1, data=np.arange(2 * 2 * 2 * 4 * 3 * 8, dtype=np.int16).reshape(2, 2, 2, 4, 3, 8),
                         error="partial")),
    ("kv-ipc-req", KVIpcHandleRequest("boot:host-a")),
    ("kv-ipc", KVIpcHandle(b"h", [0, 1, 2], b"r", b"e", [2, 2], "bfloat16", error="x")),
    ("heartbeat", Heartbeat("w0", 12.75)),
    ("error", WorkerError("w0", 9, "CUDA out of memory")),
]


def count_big_arrays(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes > INLINE_MAX_BYTES)
    if isinstance(obj, msgspec.Struct):
        return sum(count_big_arrays(getattr(obj, f)) for f in obj.__struct_fields__)
    if isinstance(obj, list):
        return sum(count_big_arrays(x) for x in obj)
    return 0


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for _, m in SAMPLES} == set(ALL_MESSAGE_TYPES)
    assert set(UNION_OF) == set(ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("tp", ALL_MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_some_sample_sets_every_defaulted_field(tp: type) -> None:
    """So the round trip proves non-default values survive, not just defaults."""
    samples = [m for _, m in SAMPLES if type(m) is tp]
    for f in msgspec.structs.fields(tp):
        if f.required:
            continue
        default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
        assert any(getattr(m, f.name) != default for m in samples), f"{tp.__name__}.{f.name}"


@pytest.mark.parametrize("msg", [m for _, m in SAMPLES], ids=[n for n, _ in SAMPLES])
def test_roundtrip(msg: Any) -> None:
    codec: Codec[Any] = Codec(UNION_OF[type(msg)])
    frames = codec.encode(msg)
    assert len(frames) == 1 + count_big_arrays(msg)
    decoded = codec.decode(frames)
    assert_same(msg, decoded)
