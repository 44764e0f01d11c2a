"""Typed asyncio ZeroMQ sockets that speak one Codec each way.

Every socket is bound or connected at construction, has LINGER 0 (a stopping process never
hangs on unsent messages) and bounded high-water marks (a stalled peer pushes back instead of
growing memory without limit). Messages go out with `send_multipart(copy=False)`, so a large
array is handed to ZeroMQ without a copy: do not mutate an array after sending it. A received
message that does not decode raises `protocol.codec.CodecError`; the caller decides whether to
drop it or fail.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import zmq
import zmq.asyncio

from protocol.codec import Codec

T = TypeVar("T")
TIn = TypeVar("TIn")
TOut = TypeVar("TOut")

DEFAULT_HWM = 1000


class _Socket:
    """A bound or connected zmq.asyncio socket with the options every pdserve socket uses."""

    def __init__(
        self, ctx: zmq.asyncio.Context, kind: int, address: str, *, bind: bool, hwm: int,
        identity: bytes | None = None,
    ) -> None:
        self.address = address
        self.socket: zmq.asyncio.Socket = ctx.socket(kind)
        try:
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.SNDHWM, hwm)
            self.socket.setsockopt(zmq.RCVHWM, hwm)
            if identity is not None:
                self.socket.setsockopt(zmq.ROUTING_ID, identity)
            if kind == zmq.ROUTER:
                # Sending to an unknown peer raises instead of dropping the message silently.
                self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if bind:
                self.socket.bind(address)
            else:
                self.socket.connect(address)
        except BaseException:
            self.socket.close(linger=0)
            raise

    @property
    def bound_address(self) -> str:
        """The address actually bound, e.g. the port chosen for `tcp://127.0.0.1:*`."""
        endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)

    @property
    def closed(self) -> bool:
        return bool(self.socket.closed)


class PushSocket(_Socket, Generic[T]):
    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, codec: Codec[T], *, bind: bool,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        super().__init__(ctx, zmq.PUSH, address, bind=bind, hwm=hwm)
        self.codec = codec

    async def send(self, msg: T) -> None:
        await self.socket.send_multipart(self.codec.encode(msg), copy=False)

    async def send_within(self, msg: T, timeout: float) -> bool:
        """Send, waiting at most `timeout` seconds for room (no peer, or a full queue to a
        stalled one); False if it was not sent. For loops that must never block on a peer."""
        if self.closed:
            return False
        try:
            await asyncio.wait_for(self.send(msg), timeout)
            return True
        except (TimeoutError, zmq.ZMQError):
            return False


class PullSocket(_Socket, Generic[T]):
    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, codec: Codec[T], *, bind: bool,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        super().__init__(ctx, zmq.PULL, address, bind=bind, hwm=hwm)
        self.codec = codec

    async def recv(self) -> T:
        frames = await self.socket.recv_multipart(copy=False)
        return self.codec.decode(frames)


class RouterSocket(_Socket, Generic[TIn, TOut]):
    """The scheduler's end of the worker link: messages carry the peer's routing identity."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, codec_in: Codec[TIn],
        codec_out: Codec[TOut], *, bind: bool, hwm: int = DEFAULT_HWM,
    ) -> None:
        super().__init__(ctx, zmq.ROUTER, address, bind=bind, hwm=hwm)
        self.codec_in = codec_in
        self.codec_out = codec_out

    async def recv(self) -> tuple[bytes, TIn]:
        frames = await self.socket.recv_multipart(copy=False)
        return frames[0].bytes, self.codec_in.decode(frames[1:])

    async def send(self, identity: bytes, msg: TOut) -> None:
        await self.socket.send_multipart([identity, *self.codec_out.encode(msg)], copy=False)

    async def send_within(self, identity: bytes, msg: TOut, timeout: float) -> None:
        """Send, waiting at most `timeout` seconds for room in a stalled peer's queue; raises
        zmq.ZMQError (EAGAIN past the timeout, EHOSTUNREACH for a peer that is gone)."""
        try:
            await asyncio.wait_for(self.send(identity, msg), timeout)
        except TimeoutError:
            raise zmq.Again(f"the peer took nothing for {timeout} s") from None


class DealerSocket(_Socket, Generic[TIn, TOut]):
    """A worker's end of the worker link; `identity` is its routing id at the router."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, codec_in: Codec[TIn],
        codec_out: Codec[TOut], *, bind: bool, hwm: int = DEFAULT_HWM,
        identity: bytes | None = None,
    ) -> None:
        super().__init__(ctx, zmq.DEALER, address, bind=bind, hwm=hwm, identity=identity)
        self.codec_in = codec_in
        self.codec_out = codec_out

    async def recv(self) -> TIn:
        frames = await self.socket.recv_multipart(copy=False)
        return self.codec_in.decode(frames)

    async def send(self, msg: TOut) -> None:
        await self.socket.send_multipart(self.codec_out.encode(msg), copy=False)
