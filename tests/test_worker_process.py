"""`pdserve worker` as a real process on a real socket: the test plays the scheduler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.asyncio

from protocol.codec import Codec
from protocol.endpoints import Endpoints
from protocol.messages import (
    CachedSeq,
    FromWorker,
    Heartbeat,
    NewSeq,
    Shutdown,
    StepPlan,
    StepResult,
    ToWorker,
    WorkerAccepted,
    WorkerError,
    WorkerHello,
)
from protocol.sampling import SamplingParams
from protocol.sockets import RouterSocket

pytestmark = pytest.mark.slow


async def _recv_skipping_heartbeats(sock: RouterSocket):
    while True:
        identity, msg = await asyncio.wait_for(sock.recv(), timeout=120)
        if not isinstance(msg, Heartbeat):
            return identity, msg


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_worker_answers_plans_in_order_and_survives_a_failed_step(smollm2_dir, tmp_path, overlap):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoints = Endpoints.ipc(run_dir)
    env = {**os.environ, "PDSERVE_RUN_DIR": str(run_dir), "PDSERVE_MODEL": str(smollm2_dir),
           "PDSERVE_LOAD_FORMAT": "dummy", "PDSERVE_NUM_KV_BLOCKS": "64", "PDSERVE_STAGE_ID": "w0",
           "PDSERVE_OVERLAP_STEPS": overlap}

    async def play_scheduler() -> list:
        ctx = zmq.asyncio.Context()
        sock = RouterSocket(ctx, endpoints.worker_router, Codec(FromWorker), Codec(ToWorker), bind=True)
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "worker"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            identity, hello = await _recv_skipping_heartbeats(sock)
            assert isinstance(hello, WorkerHello) and hello.worker_id == "w0" and hello.num_kv_blocks == 64
            await sock.send(identity, WorkerAccepted("w0", os.getpid()))
            greedy = SamplingParams(max_tokens=4, temperature=0.0)
            new = NewSeq("a", [1, 2, 3, 4, 5], 5, [1], 0, 5, greedy, [0], 7)
            # Plans sent at once, as pipelined scheduling does: the second refers to a sequence
            # the worker does not hold, so it fails alone; the third runs on a's sample. The
            # fourth admits b without the blocks its prompt needs and fails; the fifth was
            # planned before the scheduler heard of that, so it still lists b: b is skipped and
            # a, the innocent neighbour, runs.
            broken = NewSeq("b", [6, 7, 8], 3, [], 0, 3, greedy, [0], 9)
            plans = [StepPlan(1, new_seqs=[new]), StepPlan(2, cached_seqs=[CachedSeq("zz", [], 3, 1)]),
                     StepPlan(3, cached_seqs=[CachedSeq("a", [], 5, 1)]), StepPlan(4, new_seqs=[broken]),
                     StepPlan(5, cached_seqs=[CachedSeq("b", [2], 3, 1), CachedSeq("a", [], 6, 1)])]
            for plan in plans:
                await sock.send(identity, plan)
            answers = [(await _recv_skipping_heartbeats(sock))[1] for _ in plans]
            await sock.send(identity, Shutdown("test over"))
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
            return answers
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            sock.close()
            ctx.term()

    first, failed, third, failed_b, fifth = asyncio.run(play_scheduler())
    assert isinstance(first, StepResult) and first.step_id == 1 and first.request_ids == ["a"]
    assert isinstance(failed, WorkerError) and failed.step_id == 2 and "zz" in failed.message
    assert isinstance(third, StepResult) and third.step_id == 3 and third.request_ids == ["a"]
    assert np.asarray(third.sampled_token_ids).shape == (1,)
    assert isinstance(failed_b, WorkerError) and failed_b.step_id == 4 and "b:" in failed_b.message
    assert isinstance(fifth, StepResult) and fifth.step_id == 5 and fifth.request_ids == ["a"]
    assert int(np.asarray(fifth.sampled_token_ids)[0]) >= 0
