"""The scheduler's sends are bounded (issue 13): a peer that takes nothing costs at most
SEND_TIMEOUT per send and never stops the loops that watch liveness, and what waits for it is
capped by the sockets' high-water mark, not by memory.

The real SchedulerService runs on real ipc sockets in this process; the test plays the other
stages. A peer that has taken nothing for a long time is reproduced by filling the scheduler's
queue to it up to the high-water mark first (what hours of stats to a dead gateway, or a flood of
outputs to a stuck detokenizer, would do), so the tests need not wait for that.
"""

from __future__ import annotations

import asyncio
import os
import time

import zmq
import zmq.asyncio

from protocol.codec import Codec
from protocol.config import CacheSettings, SchedulerSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.messages import (
    DetokenizerInbound,
    DetokenizerOutbound,
    GatewayInbound,
    Heartbeat,
    RequestFailed,
    SchedulerInbound,
    StageHeartbeat,
    WorkerUnknown,
)
from protocol.sockets import DEFAULT_HWM, DealerSocket, PullSocket, PushSocket
from scheduler_svc.scheduler_process import SchedulerService
from scheduler_svc.service_timing import SEND_TIMEOUT
from tests.scheduler_harness import BS
from tests.scheduler_peers import REPLY_WAIT, add_request, join_worker, stop

LIVENESS = StageSettings(heartbeat_interval=0.2, liveness_timeout=1.0)


def fill(sock: zmq.asyncio.Socket, frames: list[bytes]) -> int:
    """Queue junk on `sock` until it refuses more (EAGAIN), retrying while zmq's I/O thread still
    moves messages on to the peer; how many it took. Blocks the event loop for a moment, on
    purpose: the socket is the scheduler's, which must not use it meanwhile."""
    sync = zmq.Socket.shadow(sock.underlying)
    total, quiet = 0, 0
    while quiet < 3:
        taken = 0
        while True:
            try:
                sync.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            taken += 1
        total += taken
        quiet = quiet + 1 if taken == 0 else 0
        time.sleep(0.1)
    return total


async def registered(svc: SchedulerService, detok: bytes) -> None:
    """Wait until the scheduler counts `detok` as a live detokenizer it may pick."""
    deadline = time.monotonic() + REPLY_WAIT
    while detok not in svc.detoks.load:
        assert time.monotonic() < deadline, f"{detok!r} never registered"
        await asyncio.sleep(0.05)


def test_a_gateway_that_takes_nothing_does_not_stop_the_liveness_checks(tmp_path):
    """No gateway is bound: the stats queue fills to the high-water mark and stays there, yet a
    worker that falls silent is still declared dead (it is told WorkerUnknown when it speaks)."""
    endpoints = Endpoints.ipc(tmp_path)

    async def main() -> None:
        svc = SchedulerService(SchedulerSettings(), CacheSettings(block_size=BS), LIVENESS, endpoints)
        queued = fill(svc.gateway.socket, [b"stats nobody reads"])
        assert queued == DEFAULT_HWM  # what waits for the gateway is capped
        ctx = zmq.asyncio.Context()
        running = asyncio.create_task(svc.run())
        try:
            worker = await join_worker(ctx, endpoints, "w0")
            # Silent past the liveness timeout; the housekeeping that must notice is the loop
            # that also sends the stats, each now refused for SEND_TIMEOUT.
            await asyncio.sleep(LIVENESS.liveness_timeout + 3 * (SEND_TIMEOUT + 0.5))
            await worker.send(Heartbeat("w0", time.time()))
            reply = await asyncio.wait_for(worker.recv(), REPLY_WAIT)
            assert reply == WorkerUnknown("w0")
            assert "w0" not in svc.central.workers
            worker.close()
        finally:
            await stop(svc.ctx, running)
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_a_detokenizer_that_takes_nothing_costs_its_request_not_the_scheduler(tmp_path):
    """A detokenizer that heartbeats but reads nothing: once its queue is full, the next send to
    it gives up after SEND_TIMEOUT, the request it was to serve fails with a 503, and the
    scheduler goes on taking requests (each answered, none stuck behind the blocked send)."""
    endpoints = Endpoints.ipc(tmp_path)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        gateway = PullSocket(ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=True)
        # Liveness is not what this test is about: a timeout long enough for a loaded machine.
        stage = StageSettings(heartbeat_interval=0.2, liveness_timeout=10.0)
        svc = SchedulerService(SchedulerSettings(), CacheSettings(block_size=BS), stage, endpoints)
        running = asyncio.create_task(svc.run())
        worker = await join_worker(ctx, endpoints, "w0")
        detok = DealerSocket(ctx, endpoints.detokenizer_in, Codec(DetokenizerInbound),
                             Codec(DetokenizerOutbound), bind=False, identity=b"d0")

        async def beat() -> None:  # both alive: only the full queue can make the detokenizer lost
            while True:
                await detok.send(StageHeartbeat("detokenizer", "d0", os.getpid(), "h", time.time()))
                await worker.send(Heartbeat("w0", time.time()))
                await asyncio.sleep(stage.heartbeat_interval)

        beating = asyncio.create_task(beat())
        tokenizer = PushSocket(ctx, endpoints.scheduler_in, Codec(SchedulerInbound), bind=False)
        try:
            await registered(svc, b"d0")
            queued = fill(svc.detok_sock.socket, [b"d0", bytes(4096)])  # outputs nobody reads
            # Its queue and the peer's (a high-water mark each), plus the few the OS buffers hold.
            assert 2 * DEFAULT_HWM <= queued < 3 * DEFAULT_HWM

            failures: list[tuple[RequestFailed, float]] = []
            for rid in ("r1", "r2", "r3"):
                await registered(svc, b"d0")  # lost with each failure, back with its next beat
                sent = time.monotonic()
                await tokenizer.send(add_request(rid))
                while True:  # the stats keep coming meanwhile
                    msg = await asyncio.wait_for(gateway.recv(), sent + REPLY_WAIT - time.monotonic())
                    if isinstance(msg, RequestFailed):
                        failures.append((msg, time.monotonic() - sent))
                        break
            for (msg, took), rid in zip(failures, ("r1", "r2", "r3")):
                assert msg.request_id == rid and msg.status == 503, msg
                assert msg.message == "the detokenizer serving this request died", msg
                assert took >= SEND_TIMEOUT * 0.9  # the send waited its bound, then gave up
        finally:
            await stop(svc.ctx, running, beating)
            ctx.destroy(linger=0)

    asyncio.run(main())
