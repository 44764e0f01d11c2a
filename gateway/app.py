"""The OpenAI-compatible HTTP API (Starlette): routes, auth, limits, streaming, abort on disconnect.

Generation requests become GenerateRequests for the tokenizers; their TextDeltas come back
through the EngineClient and leave as one JSON body or as SSE chunks. A client that goes away
(streaming or not, still queued or already generating) has its request aborted at once, so its
waiting slot and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.admission import DoorAdmission, retry_headers
from gateway.engine_client import EngineClient
from gateway.errors import APIError, error_body
from gateway.generation import Generation, wait_for_disconnect
from gateway.metrics import GatewayMetrics
from gateway.openai_schemas import (
    chat_tool_plan, parse_chat_request, parse_completion_request, to_generate_requests,
)
from protocol.config import GatewaySettings, LaunchSettings

log = logging.getLogger("pdserve.gateway")
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the logs do


class GatewayApp:
    def __init__(self, client: EngineClient, gw: GatewaySettings, launch: LaunchSettings,
                 served_model: str, model_root: str) -> None:
        self.client = client
        self.gw = gw
        self.launch = launch
        self.served_model = served_model
        self.model_root = model_root
        self.metrics = GatewayMetrics(served_model, gw.metrics_prefix)
        client.on_stats = self.metrics.observe_stats
        self.admission = DoorAdmission()
        client.on_finish = lambda: self.admission.note_finished(time.monotonic())
        self.created = int(time.time())
        self._background: set[asyncio.Task] = set()

    def build(self) -> Starlette:
        routes = [
            Route("/health", self.health),
            Route("/ready", self.ready),
            Route("/metrics", self.metrics_route),
            Route("/workers", self.workers),
            Route("/v1/models", self.models),
            Route("/v1/models/{model_id:path}", self.model),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, APIError: self._api_error}
        return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ plain routes

    async def health(self, request: Request) -> Response:
        """200 while the gateway is alive; says which stages are missing (degraded) if any."""
        la = self.launch
        stages = self.client.stage_counts(la.tokenizers, la.detokenizers,
                                          la.num_mixed_workers + la.prefill_workers + la.decode_workers)
        missing = [f"{name}: {c['live']} of {c['expected']} live" for name, c in stages.items()
                   if c["live"] < c["expected"]]
        return JSONResponse({"status": "degraded" if missing else "ok", "missing": missing,
                             "stages": stages})

    async def ready(self, request: Request) -> Response:
        ok, reason = self.client.readiness()
        return JSONResponse({"status": "ready" if ok else "not ready", "reason": reason},
                            status_code=200 if ok else 503)

    async def metrics_route(self, request: Request) -> Response:
        if self.client.stats is not None:
            self.metrics.update_from(self.client.stats)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def workers(self, request: Request) -> Response:
        stats = self.client.stats
        rows = [] if stats is None else [
            {"id": w.worker_id, "role": w.role.name.lower(), "pid": w.pid, "host": w.host,
             "device": w.device, "state": w.state, "blocks_total": w.num_blocks_total,
             "blocks_used": w.num_blocks_used, "running_requests": w.num_running,
             "waiting_requests": w.num_waiting, "steps": w.num_steps,
             "busy_seconds": w.busy_seconds, "gpu_seconds": w.gpu_seconds,
             "gpu_gap_seconds": w.gpu_gap_seconds, "transfers_in": w.transfers_in,
             "transfers_out": w.transfers_out, "transfers_done": w.transfers_done,
             "transfer_bytes": w.transfer_bytes, "transports": w.transports,
             "transfers_by_transport": w.transfers_by_transport}
            for w in stats.workers
        ]
        return JSONResponse(rows)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id} (`client.models.retrieve`): the card, or 404 for another id."""
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id != self.served_model:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        stats = self.client.stats
        return {"id": self.served_model, "object": "model", "created": self.created,
                "owned_by": "pdserve", "root": self.model_root, "parent": None,
                "max_model_len": stats.max_model_len if stats else None}

    # ------------------------------------------------------------------ generation

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        self._authorize(request)
        self._refuse_if_full()
        client_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        # Clients reuse ids (retries): the pipeline's id stays unique, the header is echoed.
        request_id = f"{client_id[:64]}-{uuid.uuid4().hex[:8]}"
        body = await self._read_body(request)
        parsed = parse_chat_request(body) if chat else parse_completion_request(body)
        tools = chat_tool_plan(parsed)
        gen_requests = to_generate_requests(parsed, request_id, time.time(), self.served_model, tools)
        ok, reason = self.client.readiness()
        if not ok:
            raise APIError(503, f"pdserve is not ready: {reason}")
        self._admit(sum(g.n for g in gen_requests))
        streams = [await self.client.submit(g) for g in gen_requests]
        gen = Generation(self.client, self.metrics, streams, parsed, chat, request_id,
                         self.served_model, self.gw.request_timeout, tools, self.gw.tool_call_parser,
                         prompts=[g.prompt for g in gen_requests])
        headers = {"x-request-id": client_id}
        # From here on a client that leaves aborts the request, even while it is still queued.
        disconnect = asyncio.create_task(wait_for_disconnect(request))
        streaming = False
        try:
            first = asyncio.create_task(gen.first_failure())
            done, _ = await asyncio.wait({disconnect, first}, return_when=asyncio.FIRST_COMPLETED)
            if first not in done:
                first.cancel()
                return Response(status_code=CLIENT_CLOSED)
            failure = first.result()
            if failure is not None:
                raise failure
            if parsed.stream:  # the response watches for the disconnect from here on
                streaming = True
                return StreamingResponse(self._guarded(gen), media_type="text/event-stream",
                                         headers={**headers, "cache-control": "no-cache"})
            result = asyncio.create_task(gen.complete())
            done, _ = await asyncio.wait({disconnect, result}, return_when=asyncio.FIRST_COMPLETED)
            if result not in done:  # the client went away: abort, free its blocks
                result.cancel()
                return Response(status_code=CLIENT_CLOSED)
            return JSONResponse(result.result(), headers=headers)
        finally:
            disconnect.cancel()
            if not streaming:
                self._spawn(gen.close())

    async def _guarded(self, gen: Generation):
        try:
            async for chunk in gen.stream():
                yield chunk
        finally:  # runs on disconnect too; the abort must not be inside the cancelled scope
            self._spawn(gen.close())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: logged once, here
            log.warning("background task failed: %r", task.exception())

    # ------------------------------------------------------------------ checks

    def _refuse_if_full(self) -> None:
        """429 before any work on the request when the door is full even for one choice (the
        usual case under overload): the body is not read, parsed, or compiled (a grammar), so a
        refusal costs the same small time whatever the body. One that passes is checked again
        with its real number of choices once parsed; a stack that is not ready answers below."""
        if self.client.readiness()[0]:
            self._admit(1)

    def _admit(self, choices: int) -> None:
        """429 at the door when the stack's waiting bound would be passed (gateway/admission.py)."""
        stats = self.client.stats
        if stats is None:
            return
        pending, started = self.client.choice_counts()
        refusal = self.admission.check(pending, started, choices, stats.max_waiting,
                                       stats.batch_capacity, time.monotonic())
        if refusal is not None:
            raise APIError(429, refusal.message, retry_after=refusal.retry_after)

    def _authorize(self, request: Request) -> None:
        key = self.gw.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.gw.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        headers = None
        if exc.status == 429:  # the scheduler's own refusals come without an estimate
            seconds = exc.retry_after if exc.retry_after is not None else \
                self.admission.retry_after(1, time.monotonic())
            headers = retry_headers(seconds)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message: Any = exc.detail or "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(exc.status_code, str(message)), status_code=exc.status_code)
