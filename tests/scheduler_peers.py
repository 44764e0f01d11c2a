"""The stages around a real SchedulerService, played by a test on real sockets: a model worker
that registers, a tokenizer's requests."""

from __future__ import annotations

import asyncio
import os
import time

import zmq.asyncio

from protocol.codec import Codec
from protocol.endpoints import Endpoints
from protocol.messages import AddRequest, FromWorker, ToWorker, WorkerAccepted, WorkerHello, WorkerRole
from protocol.sampling import SamplingParams
from protocol.sockets import DealerSocket
from tests.central_harness import LAYOUT
from tests.scheduler_harness import BS, VOCAB

REPLY_WAIT = 20.0  # seconds any expected reply may take on a loaded machine


def hello(worker_id: str) -> WorkerHello:
    return WorkerHello(worker_id=worker_id, role=WorkerRole.MIXED, pid=os.getpid(), host="h",
                       device="cpu", model="m", num_kv_blocks=64, block_size=BS, max_model_len=256,
                       vocab_size=VOCAB, kv_layout=LAYOUT, transports=["zmq"], node_id="n")


def add_request(request_id: str) -> AddRequest:
    return AddRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4), [0], time.time())


async def join_worker(ctx: zmq.asyncio.Context, endpoints: Endpoints, worker_id: str) -> DealerSocket:
    """A worker socket that said Hello and was accepted."""
    worker = DealerSocket(ctx, endpoints.worker_router, Codec(ToWorker), Codec(FromWorker),
                          bind=False, identity=worker_id.encode())
    await worker.send(hello(worker_id))
    reply = await asyncio.wait_for(worker.recv(), REPLY_WAIT)
    assert isinstance(reply, WorkerAccepted), reply
    return worker


async def stop(service_ctx: zmq.asyncio.Context, *tasks: asyncio.Task) -> None:
    """Cancel the service's task and the test's helpers. A service stuck in a send that never
    returns (an unbounded send to a peer that takes nothing) has its sockets destroyed after a
    few seconds, so a failing test fails instead of hanging."""
    for task in tasks:
        task.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=5)
    if stuck:
        service_ctx.destroy(linger=0)
