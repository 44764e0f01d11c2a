"""Bad input is refused with a CodecError: another socket's message, garbage frames, bad array
references.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol.codec import Codec, CodecError
from protocol.messages import FromWorker, Heartbeat, StepPlan, ToWorker


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
