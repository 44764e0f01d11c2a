"""The source side of a KV pull: a ROUTER that hands out blocks of this worker's cache.

Pull model: destinations drive every transfer and this server only answers, so it keeps no
per-transfer state and a destination that vanishes costs nothing but an undeliverable reply.
The scheduler keeps the blocks it lets a destination read allocated for the whole transfer, so a
block is stable while it is gathered here. A request that cannot be served (bad block ids, no
CUDA cache for cuda-ipc) gets an answer carrying the reason: a peer's mistake never stops the
server.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zmq
import zmq.asyncio

from gpu_worker.kv_transfer.cuda_ipc import CudaIpcError, SharedCache, share
from gpu_worker.kv_transfer.wire import dtype_name, to_wire, wire_dtype
from protocol.codec import Codec, CodecError
from protocol.messages import KVChunk, KVFetch, KVIpcHandle, KVIpcHandleRequest, KVPeerReply, KVPeerRequest
from protocol.sockets import RouterSocket

log = logging.getLogger("pdserve.kv_transfer")


class KVPeerServer:
    """Serves `kv_cache` to peer workers at `address` (bound at construction).

    `address` may be `tcp://host:*`: the port is picked at bind time and `.address` is the real
    one, what WorkerHello.kv_address must carry. `node_id` (optional) names this host; a
    cuda-ipc request from another node is refused, since its handle would mean nothing there.
    """

    def __init__(
        self, kv_cache: torch.Tensor, address: str, *, ctx: zmq.asyncio.Context | None = None,
        node_id: str = "",
    ) -> None:
        self.kv_cache = kv_cache
        self.node_id = node_id
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._sock: RouterSocket[KVPeerRequest, KVPeerReply] = RouterSocket(
            self._ctx, address, Codec(KVPeerRequest), Codec(KVPeerReply), bind=True
        )
        self.address = self._sock.bound_address
        # One thread: gathers are short, and each extra torch thread costs its own OpenMP team.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-serve")
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._shared: SharedCache | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def run(self) -> None:
        """Answer requests until `close()`; each is answered in its own task, so one slow gather
        does not hold up the others."""
        while not self._closed:
            try:
                identity, msg = await self._sock.recv()
            except CodecError as exc:
                log.warning("KV peer server %s: dropped an undecodable request: %s", self.address, exc)
                continue
            except (zmq.ZMQError, asyncio.CancelledError):
                if self._closed:
                    return
                raise
            task = asyncio.create_task(self._answer(identity, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop serving: pending answers are dropped, the socket (and an own context) closed."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._sock.close()
        if self._own_ctx:
            self._ctx.term()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _answer(self, identity: bytes, msg: KVPeerRequest) -> None:
        reply = await self._fetch(msg) if isinstance(msg, KVFetch) else self._ipc_handle(msg)
        try:
            await self._sock.send(identity, reply)
        except zmq.ZMQError as exc:  # the peer went away (ROUTER_MANDATORY) or we closed
            if not self._closed:
                log.warning("KV peer server %s: cannot answer a peer: %s", self.address, exc)

    async def _fetch(self, msg: KVFetch) -> KVChunk:
        num_blocks = self.kv_cache.shape[2]
        bad = [b for b in msg.block_ids if not 0 <= b < num_blocks]
        if bad:
            return self._error_chunk(
                msg, f"block ids out of range [0, {num_blocks}): {bad[:8]}{' ...' if len(bad) > 8 else ''}"
            )
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self._executor, self._gather, list(msg.block_ids))
        except Exception as exc:  # reported to the peer; the server keeps serving
            log.exception("KV peer server %s: gather failed", self.address)
            return self._error_chunk(msg, f"gather failed: {type(exc).__name__}: {exc}")
        return KVChunk(msg.transfer_id, msg.chunk, data)

    def _gather(self, block_ids: list[int]) -> np.ndarray:
        """`kv_cache[:, :, block_ids]` as a contiguous host array (runs on the server's thread).

        A CUDA cache is gathered on the device on a side stream, then copied into pinned host
        memory and synchronized, so the array is complete when it is handed to the socket.
        """
        index = torch.tensor(block_ids, dtype=torch.long)
        if self._stream is None:
            return to_wire(self.kv_cache.index_select(2, index))
        with torch.cuda.stream(self._stream):
            gathered = self.kv_cache.index_select(2, index.to(self.kv_cache.device, non_blocking=True))
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
        self._stream.synchronize()
        return to_wire(host)

    def _error_chunk(self, msg: KVFetch, error: str) -> KVChunk:
        return KVChunk(msg.transfer_id, msg.chunk, np.zeros(0, wire_dtype(self.kv_cache.dtype)), error)

    def _ipc_handle(self, msg: KVIpcHandleRequest) -> KVIpcHandle:
        if self.node_id and msg.node_id and msg.node_id != self.node_id:
            return KVIpcHandle(error=f"cuda-ipc needs one host: this source is on node {self.node_id!r}, "
                                     f"the destination on {msg.node_id!r}")
        try:
            if self._shared is None:  # shared once: every destination opens the same handle
                self._shared = share(self.kv_cache)
        except CudaIpcError as exc:
            return KVIpcHandle(error=f"cuda-ipc unavailable at this source: {exc}")
        except Exception as exc:
            log.exception("KV peer server %s: cannot share the CUDA cache", self.address)
            return KVIpcHandle(error=f"cuda-ipc unavailable at this source: {type(exc).__name__}: {exc}")
        s = self._shared
        return KVIpcHandle(
            handle=s.handle, fields=s.fields, ref_counter_handle=s.ref_counter_handle,
            event_handle=s.event_handle, shape=s.shape, dtype=dtype_name(s.dtype),
        )
