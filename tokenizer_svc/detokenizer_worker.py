"""`pdserve detokenizer`: token ids in, text deltas out, stop strings enforced.

A DEALER socket to the scheduler's ROUTER brings DetokRequests and EngineOutputs (every output of
a request comes to the same detokenizer, chosen when the scheduler admitted it) and carries back
heartbeats and the aborts of requests whose stop string matched. Text goes to the gateway.
Detokenizing runs in a thread, so a large batch never stalls the heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import zmq
import zmq.asyncio

from protocol.model_files.model_source import resolve_model
from protocol.codec import Codec
from protocol.config import ModelSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.liveness import default_stage_id, send_heartbeats
from protocol.messages import (
    AbortRequests,
    DetokenizerInbound,
    DetokenizerOutbound,
    DetokRequest,
    EngineOutputs,
    FinishReason,
    GatewayInbound,
    TextOutputs,
)
from protocol.sockets import DealerSocket, PushSocket
from tokenizer_svc.request_detokenizer import RequestDetokenizer
from tokenizer_svc.tokenizer import Tokenizer

log = logging.getLogger("pdserve.detokenizer")


class DetokenizerState:
    """Pure: the detokenizers of live requests; EngineOutputs -> (TextOutputs, ids to abort)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestDetokenizer] = {}

    def add(self, req: DetokRequest) -> None:
        self.requests[req.request_id] = RequestDetokenizer(self.tokenizer, req)

    def process(self, outputs: EngineOutputs) -> tuple[TextOutputs, list[str]]:
        deltas, stop_matched = [], []
        for out in outputs.outputs:
            state = self.requests.get(out.request_id)
            if state is None:  # ended here already (stop string) or never announced
                continue
            delta = state.step(out)
            if delta is not None:
                deltas.append(delta)
            if state.finished:
                del self.requests[out.request_id]
                if state.matched_stop and out.finish_reason is None:
                    stop_matched.append(out.request_id)
        return TextOutputs(deltas), stop_matched


async def serve_detokenizer(model: ModelSettings, stage: StageSettings, endpoints: Endpoints) -> None:
    stage_id = default_stage_id("detokenizer", stage.stage_id)
    hf_dir = resolve_model(model.model, Path(model.cache_dir).expanduser(),
                           need_weights=model.load_format != "dummy")
    state = DetokenizerState(Tokenizer.from_dir(hf_dir, name=model.model))
    ctx = zmq.asyncio.Context()
    scheduler = DealerSocket(
        ctx, endpoints.detokenizer_in, Codec(DetokenizerInbound), Codec(DetokenizerOutbound),
        bind=False, identity=stage_id.encode(),
    )
    gateway = PushSocket(ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=False)
    beat = asyncio.create_task(
        send_heartbeats([scheduler, gateway], "detokenizer", stage_id, stage.heartbeat_interval)
    )
    loop = asyncio.get_running_loop()
    log.info("detokenizer %s ready", stage_id)
    try:
        while True:
            msg = await scheduler.recv()
            if isinstance(msg, DetokRequest):
                state.add(msg)
                continue
            assert isinstance(msg, EngineOutputs)
            try:
                text, stopped = await loop.run_in_executor(None, state.process, msg)
            except Exception:
                log.exception("detokenizing a batch")
                continue
            if text.deltas:
                await gateway.send(text)
            if stopped:
                await scheduler.send(AbortRequests(stopped, FinishReason.STOP))
    finally:
        beat.cancel()
        scheduler.close()
        gateway.close()
        ctx.term()
