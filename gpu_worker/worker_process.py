"""`pdserve worker`: one model runner behind a DEALER socket, driven by the scheduler.

Handshake: load the model, then send WorkerHello (blocks, block size, context length). After that
every StepPlan is answered by one StepResult, or by a WorkerError if the step raised, in plan
order, and a Heartbeat goes out every interval. Steps run in their own thread (StepThread), so
heartbeats keep flowing while the model computes (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
import traceback

import torch
import zmq
import zmq.asyncio

from gpu_worker.runner import ModelRunner
from protocol.codec import Codec
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.messages import (
    FromWorker,
    Heartbeat,
    Shutdown,
    StepPlan,
    StepResult,
    ToWorker,
    WorkerAccepted,
    WorkerError,
    WorkerHello,
    WorkerRole,
)
from protocol.sockets import DealerSocket

log = logging.getLogger("pdserve.worker")


async def serve_worker(
    model: ModelSettings,
    cache: CacheSettings,
    sched: SchedulerSettings,
    stage: StageSettings,
    endpoints: Endpoints,
) -> None:
    worker_id = stage.stage_id or f"worker-{os.getpid()}"
    loop = asyncio.get_running_loop()
    steps = StepThread(worker_id, loop)
    runner = await steps.start(
        lambda: ModelRunner(model, cache, sched.max_num_batched_tokens, sched.max_num_seqs, worker_id),
        stage.torch_threads,
    )
    ctx = zmq.asyncio.Context()
    sock: DealerSocket = DealerSocket(
        ctx, endpoints.worker_router, Codec(ToWorker), Codec(FromWorker),
        bind=False, identity=worker_id.encode(),
    )
    hello = WorkerHello(
        worker_id=worker_id,
        role=WorkerRole[stage.role.upper()],
        pid=os.getpid(),
        host=socket.gethostname(),
        device=str(runner.device),
        model=model.model,
        num_kv_blocks=runner.num_kv_blocks,
        block_size=runner.block_size,
        max_model_len=runner.max_model_len,
        vocab_size=runner.vocab_size,
    )
    await sock.send(hello)
    tasks = [
        asyncio.create_task(_heartbeats(sock, worker_id, stage.heartbeat_interval)),
        asyncio.create_task(_send_results(sock, steps.results)),
    ]
    try:
        while True:
            msg = await sock.recv()
            if isinstance(msg, WorkerAccepted):
                log.info("worker %s accepted by the scheduler (pid %d): %d KV blocks",
                         worker_id, msg.scheduler_pid, runner.num_kv_blocks)
            elif isinstance(msg, Shutdown):
                log.info("worker %s: shutdown (%s)", worker_id, msg.reason)
                return
            else:
                steps.submit(msg)
    finally:
        steps.stop()
        for t in tasks:
            t.cancel()
        sock.close()
        ctx.term()


class StepThread:
    """The one thread that drives torch for the worker's whole life.

    OpenMP keeps one thread team per calling thread, so steps hopping between threads would
    oversubscribe the cores. Plans queue up here as they arrive and run back to back: when the
    scheduler has sent step N+1 before N finished, N+1 starts the moment N ends, with no hop
    through the event loop; results go back to the loop, which owns the socket.
    """

    def __init__(self, worker_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.results: asyncio.Queue[StepResult | WorkerError] = asyncio.Queue()
        self._plans: queue.SimpleQueue[StepPlan | None] = queue.SimpleQueue()
        self._runner: ModelRunner | None = None

    async def start(self, make_runner, torch_threads: int | None) -> ModelRunner:
        """Start the thread, build the runner on it, and return the runner once loaded."""
        ready: asyncio.Future[ModelRunner] = self.loop.create_future()

        def main() -> None:
            try:
                if torch_threads:
                    torch.set_num_threads(torch_threads)
                self._runner = make_runner()
            except BaseException as exc:  # reported to the awaiting coroutine
                self.loop.call_soon_threadsafe(_settle, ready, None, exc)
                return
            self.loop.call_soon_threadsafe(_settle, ready, self._runner, None)
            self._run_plans()

        threading.Thread(target=main, name="pdserve-step", daemon=True).start()
        return await ready

    def submit(self, plan: StepPlan) -> None:
        self._plans.put(plan)

    def stop(self) -> None:
        self._plans.put(None)

    def _run_plans(self) -> None:
        runner = self._runner
        assert runner is not None
        while (plan := self._plans.get()) is not None:
            try:
                out: StepResult | WorkerError = runner.execute(plan)
            except Exception as exc:  # the step failed: report it, keep serving
                log.error("step %d failed: %s", plan.step_id, traceback.format_exc())
                for seq in [*plan.new_seqs, *plan.cached_seqs]:  # the scheduler fails exactly these
                    runner.seqs.seqs.pop(seq.request_id, None)
                out = WorkerError(self.worker_id, plan.step_id, f"{type(exc).__name__}: {exc}")
            try:
                self.loop.call_soon_threadsafe(self.results.put_nowait, out)
            except RuntimeError:  # the loop closed: the worker is shutting down
                return


def _settle(fut: asyncio.Future, value, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


async def _send_results(sock: DealerSocket, results: asyncio.Queue) -> None:
    while True:
        await sock.send(await results.get())


async def _heartbeats(sock: DealerSocket, worker_id: str, interval: float) -> None:
    while True:
        await sock.send(Heartbeat(worker_id, time.time()))
        await asyncio.sleep(interval)
