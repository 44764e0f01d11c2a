"""A model worker that registers and then never speaks again is declared dead after the liveness
timeout (real SchedulerService, real ipc sockets, the test plays the worker)."""

from __future__ import annotations

import asyncio
import time

import zmq.asyncio

from protocol.codec import Codec
from protocol.config import CacheSettings, SchedulerSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.messages import GatewayInbound, Heartbeat, WorkerUnknown
from protocol.sockets import PullSocket
from scheduler_svc.scheduler_process import SchedulerService
from scheduler_svc.service_timing import STATS_INTERVAL
from scheduler_svc.worker_slot import DEAD
from tests.scheduler_harness import BS
from tests.scheduler_peers import REPLY_WAIT, join_worker, stop

LIVENESS = StageSettings(heartbeat_interval=0.2, liveness_timeout=1.0)


def test_a_worker_silent_from_its_hello_on_is_declared_dead(tmp_path):
    endpoints = Endpoints.ipc(tmp_path)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        gateway = PullSocket(ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=True)
        svc = SchedulerService(SchedulerSettings(), CacheSettings(block_size=BS), LIVENESS, endpoints)
        running = asyncio.create_task(svc.run())
        try:
            worker = await join_worker(ctx, endpoints, "w0")  # and then not a word
            await asyncio.sleep(LIVENESS.liveness_timeout + 4 * STATS_INTERVAL)
            deadline = time.monotonic() + REPLY_WAIT
            while "w0" in svc.central.workers and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "w0" not in svc.central.workers, "a worker silent since its Hello is still ready"
            assert [w.state for w in svc.central.departed] == [DEAD]
            await worker.send(Heartbeat("w0", time.time()))  # it wakes up: register again
            assert await asyncio.wait_for(worker.recv(), REPLY_WAIT) == WorkerUnknown("w0")
        finally:
            await stop(svc.ctx, running)
            gateway.close()
            ctx.destroy(linger=0)

    asyncio.run(main())
