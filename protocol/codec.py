"""Encode and decode the messages of one socket as ZeroMQ multipart frames.

Frame 0 is the msgpack body. A numpy array larger than `inline_max_bytes` travels as its own raw
frame, sent zero-copy (a memoryview of the array's buffer) and referenced in the body as
`[dtype, shape, frame_index]`; a small array goes inline as `[dtype, shape, bytes]`, since a
frame of its own would cost more than the copy. On receipt an array is rebuilt with
`numpy.frombuffer` over the received frame: zero-copy and read-only (copy it to mutate).

Only plain numeric numpy dtypes travel (bool, signed/unsigned int, float, complex). bfloat16 is
not a numpy dtype, and the protocol carries numpy arrays only, so bf16 tensors are out of scope:
convert them (e.g. to float32) before they reach a message.

Frames that no field refers to are ignored rather than rejected: an older peer decoding a message
with an appended array field drops that field, and with it the reference to its frame.

A codec keeps the frames of the call in progress on itself (reset when the call returns) so its
msgspec hooks can reach them: use a codec from one thread at a time. asyncio tasks of one loop
may share it, since encode and decode never await.
No pickle anywhere: an array is its dtype string, shape and raw bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, get_args

import msgspec
import numpy as np
import zmq

T = TypeVar("T")

INLINE_MAX_BYTES = 256
_ALLOWED_KINDS = frozenset("biufc")  # bool, int, uint, float, complex

FrameLike = bytes | memoryview | zmq.Frame


class CodecError(ValueError):
    """A message could not be encoded, or received frames are not a valid message."""


class Codec(Generic[T]):
    """Encoder and decoder for the union of one socket, e.g. `Codec[FromWorker](FromWorker)`.

    `msg_type` is a struct type or a union of tagged struct types; `encode` refuses messages that
    are not one of them and `decode` refuses bodies that do not decode as one of them.
    """

    def __init__(self, msg_type: Any, *, inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        self.msg_type = msg_type
        self.inline_max_bytes = inline_max_bytes
        self._members: tuple[type, ...] = get_args(msg_type) or (msg_type,)
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(
            msg_type, dec_hook=self._dec_hook
        )
        # Frames of the call in progress; None between calls.
        self._out_frames: list[bytes | memoryview] | None = None
        self._in_frames: list[memoryview] | None = None

    def encode(self, msg: T) -> list[bytes | memoryview]:
        """Frames for `msg`: the body, then one raw frame per large array."""
        if not isinstance(msg, self._members):
            raise CodecError(
                f"cannot encode {type(msg).__name__}: this codec carries {self._type_name()}"
            )
        frames: list[bytes | memoryview] = [b""]
        self._out_frames = frames
        try:
            frames[0] = self._encoder.encode(msg)
        except CodecError:
            raise
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        finally:
            self._out_frames = None
        return frames

    def decode(self, frames: Sequence[FrameLike]) -> T:
        """The message in `frames`; raises CodecError on anything that is not a valid message."""
        if len(frames) == 0:
            raise CodecError(f"no frames to decode as {self._type_name()}")
        try:
            views = [_as_memoryview(f) for f in frames]
        except TypeError as exc:
            raise CodecError(f"frames must be bytes-like: {exc}") from exc
        self._in_frames = views
        try:
            return self._decoder.decode(views[0])
        except (msgspec.MsgspecError, ValueError, TypeError, OverflowError) as exc:
            raise CodecError(f"cannot decode {self._type_name()}: {exc}") from exc
        finally:
            self._in_frames = None

    def _type_name(self) -> str:
        return " | ".join(t.__name__ for t in self._members)

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._encode_array(obj)
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()  # numpy scalars in int/float fields, as workers tend to produce
        raise TypeError(f"unsupported type {type(obj).__name__}")

    def _encode_array(self, arr: np.ndarray) -> list[Any]:
        dtype = arr.dtype
        if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
            raise CodecError(f"arrays of dtype {dtype} cannot travel (numeric dtypes only)")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # not ascontiguousarray: it turns 0-d arrays into 1-d
        shape = list(arr.shape)
        if arr.nbytes <= self.inline_max_bytes:
            return [dtype.str, shape, arr.tobytes()]
        assert self._out_frames is not None, "array encoded outside Codec.encode"
        self._out_frames.append(memoryview(arr.reshape(-1).view(np.uint8)).toreadonly())
        return [dtype.str, shape, len(self._out_frames) - 1]

    def _dec_hook(self, tp: type, obj: Any) -> Any:
        if tp is not np.ndarray:
            raise CodecError(f"no decoder for type {tp!r}")
        if not (isinstance(obj, list) and len(obj) == 3):
            raise CodecError(f"expected an array as [dtype, shape, data], got {_short(obj)}")
        dtype_str, shape, data = obj
        dtype = _parse_dtype(dtype_str)
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CodecError(f"array shape must be a list of non-negative ints, got {_short(shape)}")
        if isinstance(data, bytes):
            buf: bytes | memoryview = data
        elif _is_count(data):
            buf = self._frame(data)
        else:
            raise CodecError(f"array data must be bytes or a frame index, got {_short(data)}")
        count = math.prod(shape)
        nbytes = len(buf) if isinstance(buf, bytes) else buf.nbytes
        if count * dtype.itemsize != nbytes:
            raise CodecError(
                f"array of dtype {dtype} and shape {tuple(shape)} needs "
                f"{count * dtype.itemsize} bytes, got {nbytes}"
            )
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(tuple(shape))

    def _frame(self, index: int) -> memoryview:
        frames = self._in_frames
        assert frames is not None, "array decoded outside Codec.decode"
        if not 1 <= index < len(frames):
            have = f"frames 1..{len(frames) - 1}" if len(frames) > 1 else "no array frames"
            raise CodecError(f"array refers to frame {index}, but the message has {have}")
        return frames[index]


def _as_memoryview(frame: FrameLike) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    view = memoryview(frame)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _parse_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str):
        raise CodecError(f"array dtype must be a string, got {_short(value)}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unknown array dtype {value!r}") from exc
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise CodecError(f"array dtype {value!r} is not allowed (numeric dtypes only)")
    return dtype


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
