"""A destination's one connection to one source worker, shared by every transfer from it.

One DEALER per source address and one reader task per DEALER: replies for different transfers
arrive interleaved on the same socket, so the reader routes each KVChunk to its transfer's queue
by transfer_id. A chunk for a transfer that has no route (finished, timed out or cancelled) is
dropped here, which is half of the guarantee that a cancelled transfer never writes again (the
other half is the WriteGate). KVIpcHandle replies carry no transfer id; they go to whoever is
waiting for this source's handle (the handle is the same for every asker).
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from protocol.codec import Codec, CodecError
from protocol.messages import KVChunk, KVIpcHandle, KVIpcHandleRequest, KVPeerReply, KVPeerRequest
from protocol.sockets import DealerSocket

log = logging.getLogger("pdserve.kv_transfer")


class SourceError(RuntimeError):
    """The source answered a request with an error."""


class SourceLink:
    """Connect to `address` (lazily: zmq queues requests until the source is there)."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self._sock: DealerSocket[KVPeerReply, KVPeerRequest] = DealerSocket(
            ctx, address, Codec(KVPeerReply), Codec(KVPeerRequest), bind=False
        )
        self._routes: dict[int, asyncio.Queue[KVChunk]] = {}
        self._handle_waiters: list[asyncio.Future[KVIpcHandle]] = []
        self._reader = asyncio.create_task(self._read())

    @property
    def idle(self) -> bool:
        """No transfer and no handle request uses this link."""
        return not self._routes and not self._handle_waiters

    def open_route(self, transfer_id: int) -> asyncio.Queue[KVChunk]:
        if transfer_id in self._routes:
            raise RuntimeError(f"transfer {transfer_id} is already running from {self.address}")
        queue: asyncio.Queue[KVChunk] = asyncio.Queue()
        self._routes[transfer_id] = queue
        return queue

    def close_route(self, transfer_id: int) -> None:
        """From now on this transfer's chunks are dropped on arrival."""
        self._routes.pop(transfer_id, None)

    async def send(self, msg: KVPeerRequest) -> None:
        await self._sock.send(msg)

    async def ipc_handle(self, node_id: str) -> KVIpcHandle:
        """Ask the source for its CUDA IPC handle and wait for the answer (no timeout here: the
        caller's transfer timeout bounds it)."""
        fut: asyncio.Future[KVIpcHandle] = asyncio.get_running_loop().create_future()
        self._handle_waiters.append(fut)
        try:
            await self._sock.send(KVIpcHandleRequest(node_id))
            return await fut
        finally:
            if fut in self._handle_waiters:
                self._handle_waiters.remove(fut)

    def close(self) -> None:
        self._reader.cancel()
        self._sock.close()
        for fut in self._handle_waiters:
            if not fut.done():
                fut.set_exception(SourceError(f"the link to {self.address} was closed"))
        self._handle_waiters.clear()
        self._routes.clear()

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._sock.recv()
            except CodecError as exc:
                log.warning("KV source %s: dropped an undecodable reply: %s", self.address, exc)
                continue
            except zmq.ZMQError:
                if self._sock.closed:
                    return
                raise
            if isinstance(msg, KVChunk):
                queue = self._routes.get(msg.transfer_id)
                if queue is not None:
                    queue.put_nowait(msg)
            else:
                waiters, self._handle_waiters = self._handle_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(msg)
