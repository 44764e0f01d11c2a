"""`pdserve worker`: one model runner behind a DEALER socket, driven by the scheduler.

Handshake: load the model, then send WorkerHello (blocks, block size, context length). After that
every StepPlan is answered by one StepResult, or by a WorkerError if the step raised, and a
Heartbeat goes out every interval. Steps run in a thread so heartbeats keep flowing while the
model computes (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

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
    # One thread drives torch for the worker's whole life: OpenMP keeps one thread team per
    # calling thread, so steps hopping between pool threads would oversubscribe the cores.
    step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-step")
    if stage.torch_threads:
        await loop.run_in_executor(step_thread, torch.set_num_threads, stage.torch_threads)
    runner = await loop.run_in_executor(
        step_thread, lambda: ModelRunner(model, cache, sched.max_num_batched_tokens, sched.max_num_seqs, worker_id)
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
    beat = asyncio.create_task(_heartbeats(sock, worker_id, stage.heartbeat_interval))
    try:
        while True:
            msg = await sock.recv()
            if isinstance(msg, WorkerAccepted):
                log.info("worker %s accepted by the scheduler (pid %d): %d KV blocks",
                         worker_id, msg.scheduler_pid, runner.num_kv_blocks)
                continue
            if isinstance(msg, Shutdown):
                log.info("worker %s: shutdown (%s)", worker_id, msg.reason)
                return
            assert isinstance(msg, StepPlan)
            try:
                result = await loop.run_in_executor(step_thread, runner.execute, msg)
            except Exception as exc:  # the step failed: report it, keep serving
                log.error("step %d failed: %s", msg.step_id, traceback.format_exc())
                for seq in [*msg.new_seqs, *msg.cached_seqs]:  # the scheduler fails exactly these
                    runner.seqs.seqs.pop(seq.request_id, None)
                await sock.send(WorkerError(worker_id, msg.step_id, f"{type(exc).__name__}: {exc}"))
                continue
            await sock.send(result)
    finally:
        beat.cancel()
        sock.close()
        ctx.term()
        step_thread.shutdown(wait=False)


async def _heartbeats(sock: DealerSocket, worker_id: str, interval: float) -> None:
    while True:
        await sock.send(Heartbeat(worker_id, time.time()))
        await asyncio.sleep(interval)
