"""Messages across versions: defaults cost little on the wire, an appended defaulted field is
decoded by older and newer peers, a missing required field is refused.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from protocol.codec import Codec, CodecError
from protocol.messages import (
    FromWorker,
    Heartbeat,
    Shutdown,
    StepPlan,
    StepResult,
    TokenLogprobs,
    ToWorker,
    _Msg,
)
from protocol.sampling import SamplingParams
from tests.protocol_helpers import assert_same, small_logprobs


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
