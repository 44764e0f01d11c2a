"""`pdserve tokenizer`: chat template, tokenization and length checks, then on to the scheduler.

Several run side by side, each a DEALER (identity: its stage id) on the gateway's ROUTER: the
gateway picks a live tokenizer for each GenerateRequest and, if that tokenizer dies or stalls,
sends the requests it held to another (the scheduler ignores an AddRequest it already has).
Heartbeats go up the same socket. A request that cannot run (malformed messages, prompt longer
than the context, max_tokens past it, out-of-vocabulary ids, a structured output that does not
compile for the model's vocabulary) is answered straight to the gateway with a RequestFailed; a
good one becomes n AddRequests (one per choice). Tokenizing runs in a thread, so a huge prompt
never stalls the heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from protocol.model_files.model_source import resolve_model
from protocol.model_files.model_config import ModelConfig
from protocol.codec import Codec
from protocol.config import ModelSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.grammar_compiler import GrammarCompiler
from protocol.liveness import default_stage_id, send_heartbeats
from protocol.messages import (
    AddRequest,
    GatewayInbound,
    GenerateRequest,
    RequestFailed,
    SchedulerInbound,
    TokenizerInbound,
    TokenizerOutbound,
    choice_request_id,
    choice_seed,
)
from protocol.sampling import SamplingParams
from protocol.structured_output import StructuredOutputError
from protocol.sockets import DealerSocket, PushSocket
from tokenizer_svc.tokenizer import Tokenizer

log = logging.getLogger("pdserve.tokenizer")


class PromptError(ValueError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class PromptPreparer:
    """Pure: GenerateRequest -> AddRequests, or PromptError saying what is wrong.

    With `grammars`, a structured output is compiled against the model's vocabulary (as the
    worker will, cached by source) so one the vocabulary cannot serve is the client's 400."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 grammars: GrammarCompiler | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.grammars = grammars

    def prepare(self, req: GenerateRequest) -> list[AddRequest]:
        if req.params.structured is not None and self.grammars is not None:
            try:
                self.grammars.check(req.params.structured, self.tokenizer.eos_token_ids)
            except StructuredOutputError as exc:
                raise PromptError(str(exc), None) from None
        ids = self._prompt_ids(req)
        n = len(ids)
        if n == 0:
            raise PromptError("the prompt is empty", "prompt")
        room = self.max_model_len - n
        if room < 1:
            raise PromptError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {n} tokens, which leaves no room for output.",
                "messages" if req.messages is not None else "prompt",
            )
        params = req.params
        if req.max_tokens_is_default:
            params = msgspec.structs.replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise PromptError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the prompt, "
                f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                "max_tokens",
            )
        if params.min_tokens > params.max_tokens:
            params = msgspec.structs.replace(params, min_tokens=params.max_tokens)
        return [
            AddRequest(
                request_id=choice_request_id(req.request_id, i, req.n),
                prompt_token_ids=ids,
                params=_choice_params(params, i),
                eos_token_ids=self.tokenizer.eos_token_ids,
                arrival_time=req.arrival_time,
                priority=req.priority,
                parent_id=req.request_id,
                index=i,
            )
            for i in range(req.n)
        ]

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            try:
                return self.tokenizer.apply_chat_template(req.messages, req.tools)
            except ValueError as exc:
                raise PromptError(str(exc), "messages") from exc
        if req.prompt_token_ids is not None:
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise PromptError(
                    f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:3]}", "prompt"
                )
            return list(req.prompt_token_ids)
        if req.prompt is None:
            raise PromptError("one of prompt or messages is required", "prompt")
        return self.tokenizer.encode(req.prompt)


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s params: its own seed (seed + index), so seeded choices differ."""
    if params.seed is None or index == 0:
        return params
    return msgspec.structs.replace(params, seed=choice_seed(params.seed, index))


async def serve_tokenizer(model: ModelSettings, stage: StageSettings, endpoints: Endpoints) -> None:
    stage_id = default_stage_id("tokenizer", stage.stage_id)
    hf_dir = resolve_model(model.model, Path(model.cache_dir).expanduser(),
                           need_weights=model.load_format != "dummy")
    cfg = ModelConfig.from_dir(hf_dir)
    max_len = min(model.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    tokenizer = Tokenizer.from_dir(hf_dir, name=model.model, chat_template=model.chat_template)
    grammars = GrammarCompiler(lambda: tokenizer.hf_tokenizer, cfg.vocab_size, model.model)
    preparer = PromptPreparer(tokenizer, max_len, cfg.vocab_size, grammars)
    ctx = zmq.asyncio.Context()
    pull = DealerSocket(ctx, endpoints.tokenizer_in, Codec(TokenizerInbound), Codec(TokenizerOutbound),
                        bind=False, identity=stage_id.encode())
    to_scheduler = PushSocket(ctx, endpoints.scheduler_in, Codec(SchedulerInbound), bind=False)
    to_gateway = PushSocket(ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=False)
    beat = asyncio.create_task(
        send_heartbeats([pull], "tokenizer", stage_id, stage.heartbeat_interval)
    )
    loop = asyncio.get_running_loop()
    log.info("tokenizer %s ready (context %d)", stage_id, max_len)
    try:
        while True:
            req = await pull.recv()
            try:
                for add in await loop.run_in_executor(None, preparer.prepare, req):
                    await to_scheduler.send(add)
            except PromptError as exc:
                await to_gateway.send(RequestFailed(req.request_id, 400, str(exc), exc.param))
            except Exception as exc:  # never lose a request silently
                log.exception("tokenizing %s", req.request_id)
                await to_gateway.send(RequestFailed(req.request_id, 500, f"tokenizer error: {exc}"))
    finally:
        beat.cancel()
        for s in (pull, to_scheduler, to_gateway):
            s.close()
        ctx.term()
