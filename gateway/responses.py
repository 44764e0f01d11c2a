"""OpenAI response bodies and SSE chunks, built from the TextDeltas the detokenizers send.

Shapes are those the `openai` SDK parses (its pydantic models validate them in the tests) and
that `vllm bench serve` / SGLang `bench_serving` read, plus vLLM's `stop_reason` extra (the stop
token id or stop string that ended a choice, null for EOS or length).

Streaming, per response: for each TextDelta one chunk, `chat_chunk` / `completion_chunk`, the
choice's last one carrying `finish_reason`; then, when the client asked for
`stream_options.include_usage`, one usage chunk with `"choices": []`; then SSE_DONE. A chat
choice's first chunk carries the role: either a chunk of its own, `chat_chunk(..., text="",
role=True)` as api.openai.com sends, or `role=True` on the first text chunk. Send it when the
first TextDelta arrives, not at admission, or benchmark clients (which time the first chunk
with choices) report a TTFT without the prefill. A failure mid-stream is
`sse(error_body(500, message))` followed by SSE_DONE, as vLLM does; without streaming, a choice
that ended with finish_reason "error" makes the whole response an error instead.

Logprobs of -inf (and NaN) are written as LOGPROB_FLOOR: JSON has no infinities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol.messages import PromptOutput, TextDelta, TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"
LOGPROB_FLOOR = -9999.0


def encode_json(data: dict[str, Any]) -> bytes:
    """Compact JSON, keys in insertion order, UTF-8 unescaped."""
    return msgspec.json.encode(data)


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def chat_completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def usage_body(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> dict[str, Any]:
    """`usage`; prompt tokens count once per prompt however many choices it has."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


@dataclass
class ChoiceResult:
    """One choice of a non-streaming response, accumulated from its TextDeltas."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str = ""
    prompt: PromptOutput | None = None  # echo / prompt logprobs (gateway.prompt_echo)
    tool_calls: list[dict[str, Any]] | None = None  # set when the output was read as tool calls
    content: str | None = None  # then: the text outside the calls (None if only whitespace)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, delta: TextDelta) -> None:
        self.text_parts.append(delta.text)
        if delta.prompt is not None:
            self.prompt = delta.prompt
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.num_prompt_tokens:
            self.num_prompt_tokens = delta.num_prompt_tokens
            self.num_cached_tokens = delta.num_cached_tokens
        self.num_output_tokens = max(self.num_output_tokens, delta.num_output_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.error = delta.error


# ---------------------------------------------------------------- logprobs


def _logprob(value: float) -> float:
    value = float(value)
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares False


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """Chat `logprobs`: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": _logprob(t.logprob),
                "bytes": t.bytes,
                "top_logprobs": [
                    {"token": x.token, "logprob": _logprob(x.logprob), "bytes": x.bytes}
                    for x in t.top
                ],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions `logprobs`; `text_offset` is the choice's text length before these."""
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.token)
    top_logprobs = []
    for t in tokens:
        top = {x.token: _logprob(x.logprob) for x in t.top}
        top.setdefault(t.token, _logprob(t.logprob))  # vLLM lists the sampled token too
        top_logprobs.append(top)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_logprob(t.logprob) for t in tokens],
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


# ---------------------------------------------------------------- whole responses


def _envelope(
    obj: str, response_id: str, created: int, model: str, choices: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """What every response and chunk shares; `usage` is left out when None (plain chunks)."""
    body = {"id": response_id, "object": obj, "created": created, "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def chat_completion_body(
    response_id: str, created: int, model: str, choices: list[ChoiceResult],
    usage: dict[str, Any],
) -> dict[str, Any]:
    return _envelope("chat.completion", response_id, created, model, [
        {
            "index": c.index,
            "message": _chat_message(c),
            "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in sorted(choices, key=lambda c: c.index)
    ], usage)


def _chat_message(c: ChoiceResult) -> dict[str, Any]:
    if c.tool_calls is None:
        return {"role": "assistant", "content": c.text}
    return {"role": "assistant", "content": c.content, "tool_calls": c.tool_calls}


def completion_body(
    response_id: str, created: int, model: str, choices: list[ChoiceResult],
    usage: dict[str, Any],
) -> dict[str, Any]:
    return _envelope("text_completion", response_id, created, model, [
        {
            "index": c.index,
            "text": c.text,
            "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in sorted(choices, key=lambda c: c.index)
    ], usage)


# ---------------------------------------------------------------- streaming chunks


def _finish(choice: dict[str, Any], finish_reason: str | None, stop_reason: int | str | None
            ) -> dict[str, Any]:
    choice["finish_reason"] = finish_reason
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def chat_chunk(
    response_id: str, created: int, model: str, index: int, text: str, *, role: bool = False,
    finish_reason: str | None = None, stop_reason: int | str | None = None,
    logprobs: list[TokenLogprob] | None = None, usage: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A "chat.completion.chunk" with one choice's new text (`usage`: continuous stats) and,
    when the output is read as tool calls, their new deltas (content null if there is none)."""
    delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
    if tool_calls:
        delta["tool_calls"] = tool_calls
        if not text:
            delta["content"] = None
    choice = {"index": index, "delta": delta,
              "logprobs": None if logprobs is None else chat_logprobs(logprobs)}
    return _envelope("chat.completion.chunk", response_id, created, model,
                  [_finish(choice, finish_reason, stop_reason)], usage)


def chat_usage_chunk(response_id: str, created: int, model: str, usage: dict[str, Any]
                     ) -> dict[str, Any]:
    """The include_usage chunk: no choices, the whole response's usage."""
    return _envelope("chat.completion.chunk", response_id, created, model, [], usage)


def completion_chunk(
    response_id: str, created: int, model: str, index: int, text: str, *,
    finish_reason: str | None = None, stop_reason: int | str | None = None,
    logprobs: list[TokenLogprob] | None = None, text_offset: int = 0,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed "text_completion" with one choice's new text; `text_offset` as above."""
    choice = {"index": index, "text": text,
              "logprobs": None if logprobs is None else completion_logprobs(logprobs, text_offset)}
    return _envelope("text_completion", response_id, created, model,
                  [_finish(choice, finish_reason, stop_reason)], usage)


def completion_usage_chunk(response_id: str, created: int, model: str, usage: dict[str, Any]
                           ) -> dict[str, Any]:
    return _envelope("text_completion", response_id, created, model, [], usage)
