"""Every message survives the codec of its socket, arrays travel as frames, bad input is refused."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from protocol.codec import INLINE_MAX_BYTES, Codec, CodecError
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
    _Msg,
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


def small_logprobs() -> TokenLogprobs:
    """Arrays under the inline threshold: they travel inside the body."""
    return TokenLogprobs(
        token_ids=np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64),
        logprobs=np.array([[-0.1, -2.0, -3.5], [-0.2, -1.0, -4.0]], dtype=np.float32),
        ranks=np.array([1, 2], dtype=np.int64),
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


def assert_same(a: Any, b: Any, path: str = "msg") -> None:
    """Field-by-field equality; arrays by dtype, shape and content."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert b.dtype == a.dtype, path
        assert b.shape == a.shape, path
        assert np.array_equal(a, b), path
    elif isinstance(a, msgspec.Struct):
        assert type(b) is type(a), path
        for name in a.__struct_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(b) == len(a), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(b) is type(a), f"{path}: {type(a)} != {type(b)}"
        assert b == a, path


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


def test_big_arrays_travel_as_frames_and_body_stays_small() -> None:
    n = 100_000
    ids = np.arange(n, dtype=np.int64)
    lp = TokenLogprobs(
        token_ids=np.arange(n * 3, dtype=np.int64).reshape(n, 3),
        logprobs=np.ones((n, 3), dtype=np.float32),
        ranks=np.ones(n, dtype=np.int64),
    )
    msg = StepResult(1, "w", ["r"], ids, logprobs=lp)
    frames = Codec(FromWorker).encode(msg)
    assert len(frames) == 5
    assert len(frames[0]) < 100  # body: tag, scalars and array references only
    assert [memoryview(f).nbytes for f in frames[1:]] == [n * 8, n * 3 * 8, n * 3 * 4, n * 8]
    # zero-copy: the frame is a view of the array's own buffer
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), ids)
    decoded = Codec(FromWorker).decode([bytes(f) for f in frames])
    assert_same(msg, decoded)


def test_non_contiguous_and_zero_size_arrays() -> None:
    base = np.arange(2000, dtype=np.int64).reshape(40, 50)
    lp = TokenLogprobs(
        token_ids=np.zeros((0, 3), dtype=np.int64),
        logprobs=np.asfortranarray(np.arange(600, dtype=np.float32).reshape(20, 30)),
        ranks=np.array(5, dtype=np.int64),  # 0-d
    )
    msg = StepResult(1, "w", [], base[:, ::2], logprobs=lp)  # strided: not C-contiguous
    codec = Codec(FromWorker)
    assert_same(msg, codec.decode(codec.encode(msg)))


def test_decoded_arrays_are_read_only_views() -> None:
    msg = StepResult(1, "w", ["r"], np.arange(1000, dtype=np.int64))
    codec = Codec(FromWorker)
    decoded = codec.decode(codec.encode(msg))
    assert not decoded.sampled_token_ids.flags.writeable


def test_wrong_union_raises_codec_error() -> None:
    frames = Codec(FromWorker).encode(Heartbeat("w", 1.0))
    with pytest.raises(CodecError, match="StepPlan | Shutdown"):
        Codec(ToWorker).decode(frames)


def test_encode_refuses_message_of_another_socket() -> None:
    with pytest.raises(CodecError, match="cannot encode StepPlan"):
        Codec(FromWorker).encode(StepPlan(1))


@pytest.mark.parametrize(
    "frames",
    [
        [b""],
        [b"\xc1"],
        [b"garbage that is not msgpack"],
        [msgspec.msgpack.encode(["nosuchtag", 1])],
        [msgspec.msgpack.encode(["heartbeat"])],  # missing required fields
        [msgspec.msgpack.encode(["heartbeat", 5, 1.0])],  # wrong field type
        [msgspec.msgpack.encode({"t": "heartbeat"})],
        [],
    ],
    ids=["empty", "bad-opcode", "text", "unknown-tag", "missing-fields", "wrong-type", "map",
         "no-frames"],
)
def test_garbage_raises_codec_error(frames: list[bytes]) -> None:
    with pytest.raises(CodecError):
        Codec(FromWorker).decode(frames)


def _result_with_array(array_ref: Any) -> bytes:
    return msgspec.msgpack.encode(["result", 1, "w", ["r"], array_ref])


@pytest.mark.parametrize(
    "body, extra, match",
    [
        (_result_with_array(["<i8", [4], 1]), [], "refers to frame 1"),
        (_result_with_array(["<i8", [4], 0]), [], "refers to frame 0"),
        (_result_with_array(["<i8", [4], 2]), [b"\0" * 32], "refers to frame 2"),
        (_result_with_array(["<i8", [4], 1]), [b"\0" * 31], "needs 32 bytes, got 31"),
        (_result_with_array(["<i8", [4], b"\0" * 8]), [], "needs 32 bytes, got 8"),
        (_result_with_array(["O", [1], b"\0" * 8]), [], "not allowed"),
        (_result_with_array(["V8", [1], b"\0" * 8]), [], "not allowed"),
        (_result_with_array(["nonsense", [1], b""]), [], "unknown array dtype"),
        (_result_with_array(["<i8", [-1], b""]), [], "shape"),
        (_result_with_array(["<i8", [1]]), [], r"\[dtype, shape, data\]"),
        (_result_with_array(["<i8", [1], "text"]), [], "bytes or a frame index"),
        (_result_with_array([8, [1], b"\0" * 8]), [], "dtype must be a string"),
    ],
)
def test_bad_array_references_raise_codec_error(body: bytes, extra: list[bytes], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        Codec(FromWorker).decode([body, *extra])


def test_object_arrays_are_refused_on_encode() -> None:
    msg = StepResult(1, "w", [], np.array([object()] * 3))
    with pytest.raises(CodecError, match="dtype object"):
        Codec(FromWorker).encode(msg)


def test_numpy_scalars_encode_as_python_numbers() -> None:
    msg = Heartbeat("w", np.float32(1.5))  # type: ignore[arg-type]
    decoded = Codec(FromWorker).decode(Codec(FromWorker).encode(msg))
    assert decoded == Heartbeat("w", 1.5) and type(decoded.timestamp) is float


def test_default_only_message_is_small() -> None:
    """Array-like structs carry no field names, so defaults cost a byte or so each.

    msgspec ignores omit_defaults on array_like structs (jcrist/msgspec#720): trailing defaults
    are still written. This pins that down, so a msgspec that starts trimming them is noticed.
    """
    frames = Codec(ToWorker).encode(StepPlan(3))
    assert frames == [msgspec.msgpack.encode(["step", 3, [], [], []])]
    assert len(frames[0]) == 10
    assert len(Codec(ToWorker).encode(Shutdown())[0]) == 11  # ["shutdown", ""]
    assert len(msgspec.msgpack.encode(SamplingParams())) <= 80


class _HeartbeatV0(_Msg, tag="heartbeat"):
    """Heartbeat as an older peer knew it: identical but for the appended last field."""

    worker_id: str


class _HeartbeatV2(_Msg, tag="heartbeat"):
    """Heartbeat as a newer peer knows it: one more field, an array, appended with a default."""

    worker_id: str
    timestamp: float
    load: np.ndarray | None = None


class _StepResultV0(_Msg, tag="result"):
    """StepResult before `execute_seconds` was appended."""

    step_id: int
    worker_id: str
    request_ids: list[str]
    sampled_token_ids: np.ndarray
    logprobs: TokenLogprobs | None = None


def test_decodes_message_without_appended_defaulted_field() -> None:
    old = _StepResultV0(5, "w", ["a", "b"], np.arange(500, dtype=np.int64),
                        logprobs=small_logprobs())
    frames = Codec(_StepResultV0).encode(old)
    decoded = Codec(FromWorker).decode(frames)
    assert type(decoded) is StepResult
    assert decoded.execute_seconds == 0.0
    assert decoded.step_id == 5 and decoded.request_ids == ["a", "b"]
    assert np.array_equal(decoded.sampled_token_ids, old.sampled_token_ids)
    assert_same(old.logprobs, decoded.logprobs)


def test_required_field_missing_is_refused() -> None:
    """Only defaulted fields may be appended: a missing required field is an error."""
    with pytest.raises(CodecError, match="at least length 3"):
        Codec(FromWorker).decode(Codec(_HeartbeatV0).encode(_HeartbeatV0("w")))


def test_older_decoder_ignores_appended_field_and_its_frame() -> None:
    new = _HeartbeatV2("w", 2.0, load=np.ones(1000, dtype=np.float32))
    frames = Codec(_HeartbeatV2).encode(new)
    assert len(frames) == 2
    assert Codec(FromWorker).decode(frames) == Heartbeat("w", 2.0)
