"""Arrays travel as raw zero-copy frames: big, strided, zero-size and 0-d arrays survive, decoded
arrays are read-only views, object arrays are refused, numpy scalars become Python numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from protocol.codec import Codec, CodecError
from protocol.messages import FromWorker, Heartbeat, StepResult, TokenLogprobs
from tests.protocol_helpers import assert_same


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


def test_object_arrays_are_refused_on_encode() -> None:
    msg = StepResult(1, "w", [], np.array([object()] * 3))
    with pytest.raises(CodecError, match="dtype object"):
        Codec(FromWorker).encode(msg)


def test_numpy_scalars_encode_as_python_numbers() -> None:
    msg = Heartbeat("w", np.float32(1.5))  # type: ignore[arg-type]
    decoded = Codec(FromWorker).decode(Codec(FromWorker).encode(msg))
    assert decoded == Heartbeat("w", 1.5) and type(decoded.timestamp) is float
