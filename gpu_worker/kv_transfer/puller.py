"""The destination side of a KV pull: fetch a source's blocks and write them into this cache.

The destination drives every transfer (pull model). `pull()` turns one KVPull into exactly one
KVPullDone and never raises for anything a peer or the order did wrong. Over zmq it keeps a few
chunk fetches outstanding, so the source gathers the next chunk while this side writes the last
one; over cuda-ipc it maps the source's cache once per source and copies on the device with one
kernel (block_copy). zmq writes run on a worker thread (torch releases the GIL); a cuda-ipc copy is
launched from the event loop's thread and its completion event waited for (on the loop for a
small copy, on the worker thread for a large one). Both run behind the transfer's WriteGate, which
is what lets `cancel()` promise that no write of that transfer happens after it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
import zmq
import zmq.asyncio

from gpu_worker.kv_transfer.block_copy import AUTO, TORCH, copy_blocks
from gpu_worker.kv_transfer.block_copy import prepare as prepare_copy
from gpu_worker.kv_transfer.cuda_ipc import CudaIpcError, SharedCache, open_shared
from gpu_worker.kv_transfer.source_link import SourceError, SourceLink
from gpu_worker.kv_transfer.wire import (
    KVLayoutMismatch,
    block_bytes,
    blocks_per_chunk,
    check_layout,
    from_wire,
    parse_dtype,
)
from gpu_worker.kv_transfer.write_gate import WriteGate
from protocol.messages import KVFetch, KVPull, KVPullDone

log = logging.getLogger("pdserve.kv_transfer")

ZMQ = "zmq"
CUDA_IPC = "cuda-ipc"
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_IPC_CHUNK_BYTES = 64 << 20  # bounds the scratch of the torch fallback's gather
DEFAULT_IPC_INLINE_BYTES = 128 << 20  # cuda-ipc copies up to this size are waited for on the loop
DEFAULT_MAX_INFLIGHT = 4


class _Cancelled(Exception):
    """The transfer's gate was shut while it ran."""


@dataclass
class _Transfer:
    gate: WriteGate = field(default_factory=WriteGate)
    task: asyncio.Task | None = None
    cancelled: bool = False


class KVPuller:
    """Pulls blocks into `kv_cache` ([layers, 2, blocks, block_size, kv_heads, head_dim]).

    `chunk_bytes`: the size of one zmq fetch (whole blocks, at least one); `max_inflight`: zmq
    fetches outstanding per transfer; `ipc_chunk_bytes`: the size of one device-to-device copy
    where the torch fallback copies (the kernel needs no scratch and copies a transfer at once);
    `ipc_inline_bytes`: a cuda-ipc copy up to this size is waited for on the event loop's thread
    (blocking it a fraction of a millisecond beats two thread wake-ups), a larger one on the pull
    thread, so the loop keeps serving;
    `node_id`: this host, sent with cuda-ipc handle requests. Use from one event loop.
    """

    def __init__(
        self, kv_cache: torch.Tensor, *, ctx: zmq.asyncio.Context | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_inflight: int = DEFAULT_MAX_INFLIGHT,
        ipc_chunk_bytes: int = DEFAULT_IPC_CHUNK_BYTES, ipc_inline_bytes: int = DEFAULT_IPC_INLINE_BYTES,
        node_id: str = "",
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.kv_cache = kv_cache
        self.chunk_bytes = chunk_bytes
        self.max_inflight = max_inflight
        self.ipc_chunk_bytes = ipc_chunk_bytes
        self.ipc_inline_bytes = ipc_inline_bytes
        self.node_id = node_id
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._links: dict[str, SourceLink] = {}
        self._ipc_sources: dict[str, torch.Tensor] = {}
        self._ipc_open_lock = asyncio.Lock()
        self._transfers: dict[int, _Transfer] = {}
        # One thread: writes of one worker are serial anyway, and each torch thread costs its
        # own OpenMP team on CPU.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-pull")
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._ipc_backend = AUTO  # block_copy's choice; torch if the kernel fails to build

    @property
    def transports(self) -> list[str]:
        """What this destination can pull with (WorkerHello.transports)."""
        return [ZMQ, CUDA_IPC] if self.kv_cache.is_cuda else [ZMQ]

    async def pull(self, order: KVPull, worker_id: str,
                   write_after: Callable[[], Awaitable[object]] | None = None) -> KVPullDone:
        """Run one transfer to its end: ok with bytes and seconds, or not ok with the reason.

        `write_after`, when given, is called and awaited before the first write (fetching
        already runs):
        the worker passes "every step received before this order has run", so a step planned
        before the destination blocks were freed and reassigned can no longer write into them
        after the transfer has (the scheduler orders both on one socket).

        Never raises (except when the awaiting task itself is cancelled). After it returns, and
        also when it is cancelled, no write of this transfer happens any more. A transfer stopped
        by `cancel()` returns not ok with error "cancelled"; the caller drops that answer (the
        scheduler already forgot the transfer).
        """
        start = time.perf_counter()

        def failed(error: str) -> KVPullDone:
            return KVPullDone(worker_id, order.transfer_id, False, seconds=time.perf_counter() - start,
                              transport=order.transport, error=error)

        if order.transfer_id in self._transfers:
            return failed(f"transfer {order.transfer_id} is already running here")
        problem = self._check_order(order)
        if problem:
            return failed(problem)
        state = _Transfer()
        self._transfers[order.transfer_id] = state
        run = self._pull_zmq if order.transport == ZMQ else self._pull_ipc
        state.task = asyncio.create_task(run(order, state.gate, write_after))
        try:
            async with asyncio.timeout(order.timeout):
                num_bytes = await state.task
        except TimeoutError:
            self._drop_idle_link(order.src_address)
            return failed(f"timed out after {order.timeout:g} s pulling {len(order.src_block_ids)} "
                          f"blocks from {order.src_worker_id} at {order.src_address}")
        except _Cancelled:  # the gate shut between two chunks
            return failed("cancelled")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if state.cancelled and not (current is not None and current.cancelling()):
                return failed("cancelled")  # cancel() stopped the transfer, not our caller
            raise
        except (SourceError, KVLayoutMismatch, CudaIpcError) as exc:
            return failed(str(exc))
        except Exception as exc:
            log.exception("KV transfer %d failed", order.transfer_id)
            return failed(f"{type(exc).__name__}: {exc}")
        finally:
            if state.task is not None and not state.task.done():
                state.task.cancel()
            state.gate.close()  # waits for a write in progress: none follows
            self._transfers.pop(order.transfer_id, None)
        return KVPullDone(worker_id, order.transfer_id, True, num_bytes=num_bytes,
                          seconds=time.perf_counter() - start, transport=order.transport)

    def cancel(self, transfer_id: int) -> bool:
        """Stop a transfer. When this returns, none of its blocks is written again (a write in
        progress is waited for: one zmq chunk, or a whole cuda-ipc device copy through its event).
        False if no such transfer runs here."""
        state = self._transfers.get(transfer_id)
        if state is None:
            return False
        state.cancelled = True
        state.gate.close()
        if state.task is not None:
            state.task.cancel()
        return True

    def forget_source(self, address: str) -> None:
        """Drop the connection and the mapped cuda-ipc cache of a source that is gone, so a new
        worker at the same address is opened afresh."""
        link = self._links.pop(address, None)
        if link is not None:
            link.close()
        self._ipc_sources.pop(address, None)

    def close(self) -> None:
        """Cancel every transfer, close every source link (and an own zmq context)."""
        for transfer_id in list(self._transfers):
            self.cancel(transfer_id)
        for address in list(self._links):
            self.forget_source(address)
        self._ipc_sources.clear()
        if self._own_ctx:
            self._ctx.term()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ checks

    def _check_order(self, order: KVPull) -> str:
        if order.transport not in self.transports:
            if order.transport == CUDA_IPC:
                return f"cuda-ipc needs a CUDA cache; this worker's cache is on {self.kv_cache.device}"
            return f"unknown KV transport {order.transport!r} (this worker has {self.transports})"
        if len(order.src_block_ids) != len(order.dst_block_ids):
            return (f"{len(order.src_block_ids)} source blocks but {len(order.dst_block_ids)} "
                    "destination blocks")
        if not order.timeout > 0:
            return f"timeout must be positive, got {order.timeout}"
        num_blocks = self.kv_cache.shape[2]
        bad = [b for b in order.dst_block_ids if not 0 <= b < num_blocks]
        if bad:
            return f"destination block ids out of range [0, {num_blocks}): {bad[:8]}"
        if len(set(order.dst_block_ids)) != len(order.dst_block_ids):
            return "destination block ids repeat"
        return ""

    # ------------------------------------------------------------------ zmq

    async def _pull_zmq(self, order: KVPull, gate: WriteGate, write_after: Callable[[], Awaitable[object]] | None) -> int:
        link = self._link(order.src_address)
        replies = link.open_route(order.transfer_id)
        per = blocks_per_chunk(self.kv_cache, self.chunk_bytes)
        src, dst = order.src_block_ids, order.dst_block_ids
        chunks = [(src[i:i + per], dst[i:i + per]) for i in range(0, len(src), per)]
        loop = asyncio.get_running_loop()
        outstanding: set[int] = set()
        sent = done = num_bytes = 0
        try:
            while sent < min(self.max_inflight, len(chunks)):
                await link.send(KVFetch(order.transfer_id, sent, chunks[sent][0]))
                outstanding.add(sent)
                sent += 1
            while done < len(chunks):
                reply = await replies.get()
                if reply.chunk not in outstanding:
                    continue  # a duplicate or a chunk never asked for
                outstanding.discard(reply.chunk)
                where = f"chunk {reply.chunk} from {order.src_worker_id} at {order.src_address}"
                if reply.error:
                    raise SourceError(f"source error on {where}: {reply.error}")
                if sent < len(chunks):  # keep the source busy while this chunk is written
                    await link.send(KVFetch(order.transfer_id, sent, chunks[sent][0]))
                    outstanding.add(sent)
                    sent += 1
                dst_ids = chunks[reply.chunk][1]
                try:
                    data = from_wire(reply.data, self.kv_cache, len(dst_ids))
                except KVLayoutMismatch as exc:
                    raise KVLayoutMismatch(f"{where}: {exc}") from None
                if write_after is not None:
                    await write_after()
                    write_after = None
                if not await loop.run_in_executor(self._executor, gate.run,
                                                  partial(self._write, dst_ids, data)):
                    raise _Cancelled()
                num_bytes += reply.data.nbytes
                done += 1
        finally:
            link.close_route(order.transfer_id)
        return num_bytes

    def _write(self, dst_ids: list[int], data: torch.Tensor) -> None:
        """kv_cache[:, :, dst_ids] = data, complete on return (runs on the pull thread)."""
        index = torch.tensor(dst_ids, dtype=torch.long)
        if self._stream is None:
            self.kv_cache.index_copy_(2, index, data)
            return
        device = self.kv_cache.device
        with torch.cuda.stream(self._stream):
            self.kv_cache.index_copy_(2, index.to(device), data.to(device))
        self._stream.synchronize()

    def _link(self, address: str) -> SourceLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = SourceLink(self._ctx, address)
        return link

    def _drop_idle_link(self, address: str) -> None:
        """After a timeout: a link nothing else uses is closed, so fetches queued for a source
        that never answered do not reach it if it comes back."""
        link = self._links.get(address)
        if link is not None and link.idle:
            del self._links[address]
            link.close()

    # ------------------------------------------------------------------ cuda-ipc

    async def _pull_ipc(self, order: KVPull, gate: WriteGate, write_after: Callable[[], Awaitable[object]] | None) -> int:
        source = await self._ipc_source(order)
        num_src = source.shape[2]
        bad = [b for b in order.src_block_ids if not 0 <= b < num_src]
        if bad:
            raise SourceError(f"source block ids out of range [0, {num_src}) at "
                              f"{order.src_worker_id}: {bad[:8]}")
        num_bytes = len(order.src_block_ids) * block_bytes(self.kv_cache)
        launched: list[torch.cuda.Event] = []

        def launch() -> torch.cuda.Event:
            launched.append(self._launch_copy(source, order.src_block_ids, order.dst_block_ids))
            return launched[0]

        if write_after is not None:
            await write_after()
        # Queued from this thread (a few launches, no wait); the gate keeps the event, so a
        # cancel() from now on returns only once the copy is done.
        if not gate.run(launch):
            raise _Cancelled()
        if num_bytes <= self.ipc_inline_bytes:
            launched[0].synchronize()  # a fraction of a millisecond: less than a thread hop costs
        else:  # wait off the loop; the GPU has been copying since the launch
            await asyncio.get_running_loop().run_in_executor(self._executor, launched[0].synchronize)
        return num_bytes

    def _launch_copy(self, source: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> torch.cuda.Event:
        """Queue kv_cache[:, :, dst_ids] = source[:, :, src_ids] on the pull stream; the returned
        event completes with the copy.

        The Triton kernel (block_copy) reads each block once from the source and writes it once
        here, with no scratch and the id lists in one pinned upload; where it cannot run, the
        torch gather and scatter run in `ipc_chunk_bytes` pieces, which bound their device
        scratch (a nearly full GPU has little to spare). The whole transfer is one gate step:
        8192 tokens of a Llama-8B-sized cache are 1 GiB, about a millisecond of copying on an
        H200, so cancelling between pieces would buy little.
        """
        assert self._stream is not None
        per = blocks_per_chunk(self.kv_cache, self.ipc_chunk_bytes)
        with torch.cuda.stream(self._stream):
            copy_blocks(source, self.kv_cache, src_ids, dst_ids, backend=self._ipc_backend,
                        max_chunk_blocks=per)
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    async def _ipc_source(self, order: KVPull) -> torch.Tensor:
        """The source's cache mapped here, opened once per source address."""
        async with self._ipc_open_lock:
            source = self._ipc_sources.get(order.src_address)
            if source is not None:
                return source
            reply = await self._link(order.src_address).ipc_handle(self.node_id)
            if reply.error:
                raise SourceError(f"source {order.src_worker_id} at {order.src_address}: {reply.error}")
            try:
                check_layout(reply.shape, reply.dtype, self.kv_cache)
            except KVLayoutMismatch as exc:
                raise KVLayoutMismatch(f"cuda-ipc from {order.src_worker_id}: {exc}") from None
            shared = SharedCache(reply.handle, list(reply.fields), reply.ref_counter_handle,
                                 reply.event_handle, list(reply.shape), parse_dtype(reply.dtype))
            loop = asyncio.get_running_loop()
            source = await loop.run_in_executor(self._executor, open_shared, shared, self.kv_cache.device)
            if self._ipc_backend == AUTO:  # compile the copy kernel off the loop, once
                try:
                    await loop.run_in_executor(self._executor, prepare_copy, source, self.kv_cache)
                except Exception:
                    log.exception("the Triton KV block copy does not build here; cuda-ipc copies with torch")
                    self._ipc_backend = TORCH
            self._ipc_sources[order.src_address] = source
            return source
