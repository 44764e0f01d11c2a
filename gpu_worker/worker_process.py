"""`pdserve worker`: one model runner behind a DEALER socket, driven by the scheduler.

Handshake: load the model, then send WorkerHello (blocks, block size, context length, KV layout,
the address of its KV peer socket). After that every StepPlan is answered by one StepResult, or by
a WorkerError if the step raised, in plan order, and a Heartbeat goes out every interval. Steps
run in their own thread (gpu_worker.step_thread), so heartbeats keep flowing while the model
computes (torch releases the GIL in its kernels). KV blocks move between workers beside the steps: this worker
serves its blocks to peers (KVPeerServer) and pulls blocks the scheduler orders (KVPull ->
KVPullDone). A scheduler that does not know this worker (it restarted, or declared the worker
dead after a stall) answers WorkerUnknown: the worker drops its sequences and registers again.
SIGTERM drains: WorkerDraining, then the scheduler finishes or moves this worker's requests and
sends Shutdown; SIGINT (or a second SIGTERM) stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path

import zmq
import zmq.asyncio

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from gpu_worker.runner import ModelRunner
from gpu_worker.step_thread import StepThread
from protocol.codec import Codec
from protocol.config import CacheSettings, ConfigError, ModelSettings, SchedulerSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.liveness import default_stage_id
from protocol.messages import (
    FromWorker,
    Heartbeat,
    KVCancel,
    KVLayout,
    KVPull,
    Shutdown,
    StepPlan,
    ToWorker,
    WorkerAccepted,
    WorkerDraining,
    WorkerHello,
    WorkerRefused,
    WorkerRole,
    WorkerUnknown,
)
from protocol.sockets import DealerSocket

log = logging.getLogger("pdserve.worker")


class WorkerRefusedError(ConfigError):
    """The scheduler refused this worker (it does not fit the stack)."""


async def serve_worker(
    model: ModelSettings,
    cache: CacheSettings,
    sched: SchedulerSettings,
    stage: StageSettings,
    endpoints: Endpoints,
) -> None:
    worker_id = default_stage_id("worker", stage.stage_id)
    loop = asyncio.get_running_loop()
    steps = StepThread(worker_id, loop)
    runner = await steps.start(
        lambda: ModelRunner(model, cache, sched.max_num_batched_tokens, sched.max_num_seqs, worker_id),
        stage.torch_threads,
    )
    ctx = zmq.asyncio.Context()
    node = node_id()
    kv_server = KVPeerServer(runner.kv_cache, endpoints.kv_peer_address(worker_id, stage.kv_host),
                             ctx=ctx, node_id=node)
    puller = KVPuller(runner.kv_cache, ctx=ctx, node_id=node)
    sock: DealerSocket = DealerSocket(
        ctx, endpoints.worker_router, Codec(ToWorker), Codec(FromWorker),
        bind=False, identity=worker_id.encode(),
    )
    cfg = runner.config
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
        kv_layout=KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                           str(runner.dtype).removeprefix("torch."), runner.block_size),
        kv_address=kv_server.address,
        transports=puller.transports,
        node_id=node,
    )
    draining = asyncio.Event()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_sigterm() -> None:
        if draining.is_set():  # a second SIGTERM: stop now
            main_task.cancel()
        else:
            draining.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    pulls: dict[int, asyncio.Task] = {}

    async def pull(order: KVPull, steps_before: int) -> None:
        try:
            done = await puller.pull(order, worker_id, lambda: steps.ran(steps_before))
            if not done.ok and done.error != "cancelled":
                puller.forget_source(order.src_address)  # reconnect (or re-map) next time
            if done.ok or done.error != "cancelled":
                await sock.send(done)
        finally:
            pulls.pop(order.transfer_id, None)

    await sock.send(hello)
    tasks = [
        asyncio.create_task(_heartbeats(sock, worker_id, stage.heartbeat_interval)),
        asyncio.create_task(_send_results(sock, steps.results)),
        asyncio.create_task(kv_server.run()),
        asyncio.create_task(_drain_when_asked(sock, worker_id, draining, sched.drain_timeout, main_task)),
    ]
    try:
        while True:
            msg = await sock.recv()
            if isinstance(msg, StepPlan):
                steps.submit(msg)
            elif isinstance(msg, KVPull):
                pulls[msg.transfer_id] = asyncio.create_task(pull(msg, steps.submitted))
            elif isinstance(msg, KVCancel):
                puller.cancel(msg.transfer_id)
            elif isinstance(msg, WorkerAccepted):
                log.info("worker %s accepted by the scheduler (pid %d): %d KV blocks, KV peers at %s",
                         worker_id, msg.scheduler_pid, runner.num_kv_blocks, kv_server.address)
            elif isinstance(msg, WorkerUnknown):
                log.warning("worker %s: the scheduler does not know this worker; registering again", worker_id)
                for task in list(pulls.values()):
                    task.cancel()
                steps.reset()
                await sock.send(hello)
                if draining.is_set():
                    await sock.send(WorkerDraining(worker_id))
            elif isinstance(msg, WorkerRefused):
                raise WorkerRefusedError(f"the scheduler refused worker {worker_id}: {msg.reason}")
            elif isinstance(msg, Shutdown):
                log.info("worker %s: shutdown (%s)", worker_id, msg.reason)
                return
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        steps.stop()
        for t in [*tasks, *pulls.values()]:
            t.cancel()
        puller.close()
        kv_server.close()
        sock.close()
        ctx.term()
        if kv_server.address.startswith("ipc://"):
            Path(kv_server.address[len("ipc://"):]).unlink(missing_ok=True)


async def _drain_when_asked(sock: DealerSocket, worker_id: str, draining: asyncio.Event,
                            drain_timeout: float, main_task: asyncio.Task) -> None:
    """On SIGTERM tell the scheduler, then wait for its Shutdown; stop anyway if it never comes
    (the scheduler is gone), a little after the scheduler's own drain deadline."""
    await draining.wait()
    log.info("worker %s: draining (SIGTERM)", worker_id)
    await sock.send(WorkerDraining(worker_id))
    await asyncio.sleep(drain_timeout + 10.0)
    log.warning("worker %s: no Shutdown from the scheduler %.0f s after draining; stopping",
                worker_id, drain_timeout + 10.0)
    main_task.cancel()


def node_id() -> str:
    """This host's identity for same-host transports: hostname plus the kernel's boot id (two
    containers on one host share the boot id, so cuda-ipc can pair them)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{socket.gethostname()}" if boot else socket.gethostname()


async def _send_results(sock: DealerSocket, results: asyncio.Queue) -> None:
    while True:
        await sock.send(await results.get())


async def _heartbeats(sock: DealerSocket, worker_id: str, interval: float) -> None:
    while True:
        await sock.send(Heartbeat(worker_id, time.time()))
        await asyncio.sleep(interval)
