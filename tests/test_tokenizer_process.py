"""`pdserve tokenizer` as a real process on real sockets, the test playing the gateway and the
scheduler: tokenizing runs in a thread (issue 13), so a huge prompt does not silence the
tokenizer's heartbeats, which the gateway would otherwise take for a dead tokenizer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import zmq.asyncio

from protocol.codec import Codec
from protocol.endpoints import Endpoints
from protocol.messages import (
    AddRequest,
    GatewayInbound,
    GenerateRequest,
    RequestFailed,
    SchedulerInbound,
    StageHeartbeat,
    TokenizerInbound,
    TokenizerOutbound,
)
from protocol.sampling import SamplingParams
from protocol.sockets import PullSocket, RouterSocket

pytestmark = pytest.mark.slow
HEARTBEAT = 0.05  # seconds
HUGE_PROMPT = "The quick brown fox jumps over the lazy dog. " * 45_000  # 2 MB, ~450k tokens
WAIT = 300.0  # seconds a reply may take on a loaded machine


def request(request_id: str, prompt: str) -> GenerateRequest:
    return GenerateRequest(request_id, SamplingParams(max_tokens=4), time.time(), prompt=prompt)


def largest_gap(start: float, end: float, beats: list[float]) -> float:
    """The longest stretch of [start, end] with no heartbeat sent in it."""
    points = [start, *sorted(t for t in beats if start < t < end), end]
    return max(b - a for a, b in zip(points, points[1:]))


def test_heartbeats_go_on_while_a_huge_prompt_is_tokenized(smollm2_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoints = Endpoints.ipc(run_dir)
    env = {**os.environ, "PDSERVE_RUN_DIR": str(run_dir), "PDSERVE_MODEL": str(smollm2_dir),
           "PDSERVE_STAGE_ID": "t0", "PDSERVE_HEARTBEAT_INTERVAL": str(HEARTBEAT)}

    async def play_gateway_and_scheduler() -> None:
        ctx = zmq.asyncio.Context()
        to_tokenizer = RouterSocket(ctx, endpoints.tokenizer_in, Codec(TokenizerOutbound),
                                    Codec(TokenizerInbound), bind=True)
        scheduler = PullSocket(ctx, endpoints.scheduler_in, Codec(SchedulerInbound), bind=True)
        gateway = PullSocket(ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=True)
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "tokenizer"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        beats: list[float] = []  # when each heartbeat was sent (the tokenizer's clock: this host's)

        async def listen() -> None:
            while True:
                _, beat = await to_tokenizer.recv()
                assert isinstance(beat, StageHeartbeat) and beat.stage_id == "t0", beat
                beats.append(beat.timestamp)

        try:
            identity, first = await asyncio.wait_for(to_tokenizer.recv(), WAIT)
            assert identity == b"t0" and isinstance(first, StageHeartbeat)
            listening = asyncio.create_task(listen())
            # Warm: a small request becomes an AddRequest.
            await to_tokenizer.send(identity, request("small", "Hello there"))
            add = await asyncio.wait_for(scheduler.recv(), WAIT)
            assert isinstance(add, AddRequest) and add.request_id == "small"

            sent = time.time()
            await to_tokenizer.send(identity, request("huge", HUGE_PROMPT))
            failed = await asyncio.wait_for(gateway.recv(), WAIT)  # tokenized, then too long
            answered = time.time()
            assert isinstance(failed, RequestFailed) and failed.request_id == "huge", failed
            assert failed.status == 400 and "maximum context length" in failed.message, failed
            took = answered - sent
            assert took > 10 * HEARTBEAT, f"tokenizing took only {took:.2f} s: prompt too small to tell"
            # The event loop sent its heartbeats all along (stalled, the gap would be ~`took`).
            gap = largest_gap(sent, answered, beats)
            assert gap < took / 3, f"no heartbeat for {gap:.2f} s of the {took:.2f} s tokenizing took"
            listening.cancel()
            assert proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            ctx.destroy(linger=0)

    asyncio.run(play_gateway_and_scheduler())
