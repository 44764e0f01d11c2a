"""One client request in flight: merge its streams, shape OpenAI bodies or SSE chunks, time it.

A /v1/completions request with several prompts has one RequestStream per prompt; choice
`p * n + i` is choice i of prompt p. Metrics are observed as the client sees them: TTFT at the
first delta, inter-token latency between deltas, end-to-end at the last.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from starlette.requests import Request

from gateway.engine_client import EngineClient, RequestStream
from gateway.errors import APIError, error_body
from gateway.metrics import GatewayMetrics
from gateway.openai_schemas import choice_index
from gateway.prompt_echo import EchoSpec
from gateway import responses as R
from gateway.tool_calls.parsers import ParsedOutput, parser_for
from gateway.tool_calls.wire_format import call_dicts, delta_dicts
from gateway.tool_calls.tool_request import ToolPlan
from protocol.messages import RequestFailed, TextDelta


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    def __init__(self, client: EngineClient, metrics: GatewayMetrics, streams: list[RequestStream],
                 parsed: Any, chat: bool, request_id: str, model: str, timeout: float,
                 tools: ToolPlan | None = None, tool_call_parser: str = "hermes",
                 prompts: list[str | None] | None = None) -> None:
        self.client, self.metrics, self.streams = client, metrics, streams
        self.chat, self.model = chat, model
        self.tools = tools if tools is not None and tools.reads_calls else None
        self.tool_call_parser = tool_call_parser
        self.parsers: dict[int, Any] = {}  # choice index -> its tool-call parser
        self.n = streams[0].n
        self.echo = EchoSpec.of(parsed, chat, prompts or [])  # echo / prompt_logprobs, or None
        self.max_tokens_param = getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens
        self.output_tokens: dict[tuple[int, int], int] = {}  # (prompt, choice) -> tokens so far
        self.include_usage = bool(parsed.include_usage)
        self.continuous_usage = bool(parsed.continuous_usage_stats)  # usage on every chunk (vLLM)
        self.response_id = (R.chat_completion_id if chat else R.completion_id)(request_id)
        self.created = int(time.time())
        self.start = time.monotonic()
        self.deadline = asyncio.get_running_loop().time() + timeout  # the loop's clock
        # One stream (the usual case) is read directly; several are merged through a queue.
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pumps = [asyncio.create_task(self._pump(p, s)) for p, s in enumerate(streams)] \
            if len(streams) > 1 else []
        self.choices: dict[int, R.ChoiceResult] = {}
        self.prompt_tokens: dict[int, tuple[int, int]] = {}  # prompt -> (tokens, cached)
        self.last_delta: float | None = None
        self.remaining = self.n * len(streams)
        self.peeked: list[tuple[int, Any]] = []

    async def _pump(self, p: int, stream: RequestStream) -> None:
        while not stream.done:
            item = await stream.next()
            await self.queue.put((p, item))
            if isinstance(item, RequestFailed):
                return

    async def _get(self) -> tuple[int, Any]:
        if self.peeked:
            return self.peeked.pop(0)
        try:
            # asyncio.timeout_at arms one timer per call; wait_for would also spawn a task.
            async with asyncio.timeout_at(self.deadline):
                if not self.pumps:
                    return 0, await self.streams[0].next()
                return await self.queue.get()
        except TimeoutError:
            raise APIError(503, "the request timed out in pdserve; it was aborted") from None

    async def first_failure(self) -> APIError | None:
        """Wait for the first answer: a failure here still gets its own HTTP status."""
        item = await self._get()
        self.peeked.append(item)
        return APIError.from_request_failed(item[1]) if isinstance(item[1], RequestFailed) else None

    async def _deltas(self) -> AsyncIterator[tuple[int, TextDelta]]:
        while self.remaining > 0:
            p, item = await self._get()
            if isinstance(item, RequestFailed):
                raise APIError.from_request_failed(item)
            self._observe(p, item)
            yield choice_index(p, self.n, item.index), item

    def _observe(self, p: int, d: TextDelta) -> None:
        now = time.monotonic()
        m = self.metrics
        if self.last_delta is None:
            m.ttft.observe(now - self.start)
        elif d.token_ids:
            m.inter_token(now - self.last_delta)
        self.last_delta = now
        if d.queue_seconds is not None:
            m.queue.observe(d.queue_seconds)
        m.generation_tokens.inc(len(d.token_ids))
        if d.num_prompt_tokens and p not in self.prompt_tokens:
            self.prompt_tokens[p] = (d.num_prompt_tokens, d.num_cached_tokens)
            m.prompt_tokens.inc(d.num_prompt_tokens)
        key = (p, d.index)
        self.output_tokens[key] = max(self.output_tokens.get(key, 0), d.num_output_tokens)
        if d.finish_reason is not None:
            self.remaining -= 1
            m.request_finished(d.finish_reason)
            if self.remaining == 0:
                m.e2e.observe(now - self.start)
                m.request_done(self.n, self.max_tokens_param, max(self.output_tokens.values(), default=0))

    def _usage(self) -> dict[str, Any]:
        prompt = sum(t for t, _ in self.prompt_tokens.values())
        cached = sum(c for _, c in self.prompt_tokens.values())
        completion = sum(c.num_output_tokens for c in self.choices.values())
        if self.echo is not None and self.echo.hide_output:
            completion = 0  # echo with max_tokens 0: the one token run is not returned
        return R.usage_body(prompt, completion, cached)

    async def complete(self) -> dict[str, Any]:
        async for index, delta in self._deltas():
            self.choices.setdefault(index, R.ChoiceResult(index)).add(delta)
        errors = [c.error or "generation failed" for c in self.choices.values() if c.finish_reason == "error"]
        if errors:
            raise APIError(500, errors[0])
        if self.tools is not None:
            for choice in self.choices.values():
                self._read_tool_calls(choice)
        body_of = R.chat_completion_body if self.chat else R.completion_body
        body = body_of(self.response_id, self.created, self.model, list(self.choices.values()), self._usage())
        if self.echo is not None:
            self._add_prompts(body)
        return body

    def _add_prompts(self, body: dict[str, Any]) -> None:
        """Echo text, prompt logprobs: per choice for completions, once for chat (vLLM)."""
        assert self.echo is not None
        if self.chat:
            prompt = next((c.prompt for c in self.choices.values() if c.prompt is not None), None)
            body["prompt_logprobs"] = self.echo.vllm_prompt_logprobs(prompt)
            return
        for choice in body["choices"]:
            result = self.choices[choice["index"]]
            self.echo.completion_choice(choice, result.prompt, result.logprobs)

    def _parse(self, index: int, text: str, final: bool) -> ParsedOutput:
        """Feed a choice's new text to its tool-call parser (made on first use)."""
        assert self.tools is not None
        parser = self.parsers.get(index)
        if parser is None:
            parser = self.parsers[index] = parser_for(
                self.tools.mode, self.tools.function_name, self.tool_call_parser)
        out = parser.feed(text)
        if final:
            end = parser.finish()
            out.content += end.content
            out.deltas += end.deltas
        return out

    def _read_tool_calls(self, choice: R.ChoiceResult) -> None:
        out = self._parse(choice.index, choice.text, final=True)
        parser = self.parsers[choice.index]
        if parser.calls:
            choice.tool_calls = call_dicts(parser.calls, out.deltas)
            choice.content = out.content if out.content.strip() else None
            choice.finish_reason = _tool_finish(choice.finish_reason, True)

    async def stream(self) -> AsyncIterator[bytes]:
        args = (self.response_id, self.created, self.model)
        offsets: dict[int, int] = {}
        try:
            async for index, d in self._deltas():
                first = index not in self.choices
                choice = self.choices.setdefault(index, R.ChoiceResult(index))
                choice.add(d)
                if d.finish_reason == "error":
                    yield R.sse(error_body(500, d.error or "generation failed"))
                    continue
                usage = self._usage() if self.continuous_usage else None
                if self.chat:
                    if first:
                        yield R.sse(R.chat_chunk(*args, index, "", role=True, usage=usage))
                    text, calls, finish = d.text, None, d.finish_reason
                    if self.tools is not None:
                        out = self._parse(index, d.text, final=finish is not None)
                        text, calls = out.content, delta_dicts(out.deltas)
                        finish = _tool_finish(finish, self.parsers[index].made_calls)
                    yield R.sse(R.chat_chunk(*args, index, text, finish_reason=finish,
                                             stop_reason=d.stop_reason, logprobs=d.logprobs, usage=usage,
                                             tool_calls=calls))
                else:
                    chunk = R.completion_chunk(*args, index, d.text, finish_reason=d.finish_reason,
                                               stop_reason=d.stop_reason, logprobs=d.logprobs,
                                               text_offset=offsets.get(index, 0), usage=usage)
                    if self.echo is not None:  # the prompt goes in front of a choice's first chunk
                        self.echo.completion_choice(chunk["choices"][0], d.prompt, d.logprobs,
                                                    offsets.get(index, 0))
                    yield R.sse(chunk)
                    offsets[index] = offsets.get(index, 0) + len(chunk["choices"][0]["text"])
            if self.include_usage:
                usage_chunk = R.chat_usage_chunk if self.chat else R.completion_usage_chunk
                yield R.sse(usage_chunk(*args, self._usage()))
        except APIError as exc:
            yield R.sse(exc.body())
        yield R.SSE_DONE

    async def close(self) -> None:
        """Stop listening; abort whatever has not finished (client gone, error, timeout)."""
        for task in self.pumps:
            task.cancel()
        for stream in self.streams:
            await self.client.close_stream(stream)


def _tool_finish(finish_reason: str | None, made_calls: bool) -> str | None:
    """A choice that called tools and stopped by itself ends with "tool_calls"."""
    return "tool_calls" if made_calls and finish_reason == "stop" else finish_reason
