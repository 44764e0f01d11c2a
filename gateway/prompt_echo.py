"""Completions `echo` and the `prompt_logprobs` extra field, as vLLM serves them.

Request side (`prompt_fields`): `echo` (completions only) sends the prompt back before the
output; with `logprobs: k` the prompt tokens get logprobs too (the first one null, as it has
nothing before it) with their top k, so the worker computes prompt logprobs with k
alternatives. `prompt_logprobs: k` (both endpoints) adds vLLM's `prompt_logprobs` list: null, then
per prompt token a dict of token id -> {logprob, rank, decoded_token} holding the token and its
top k. `echo` with `max_tokens: 0` returns the prompt only (one token is generated and dropped,
as vLLM does). Prompt logprobs are not streamed (vLLM refuses them with `stream` too).

Response side (`EchoSpec`): the detokenizer's `PromptOutput` on a choice's first delta becomes
the prompt text in front of the choice's text (the client's own string when the prompt was one,
otherwise the decoded ids) and the prompt entries in front of its logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import APIError
from gateway.responses import LOGPROB_FLOOR, completion_logprobs
from protocol.messages import PromptOutput, TokenLogprob
from protocol.sampling import MAX_LOGPROBS


def prompt_fields(req: Any, chat: bool, max_tokens: int | None) -> tuple[dict[str, Any], int | None]:
    """SamplingParams fields for echo / prompt logprobs, and max_tokens to run with (1 for
    echo with max_tokens 0, else unchanged); raises APIError for what vLLM also refuses."""
    k = req.prompt_logprobs
    if k is not None:
        if not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {k}",
                           param="prompt_logprobs")
        if req.stream:
            raise APIError(400, "prompt_logprobs are not available when stream is true",
                           param="prompt_logprobs")
    echo = bool(req.echo) and not chat
    if echo and req.logprobs is not None:
        k = max(k or 0, req.logprobs)
    if echo and max_tokens == 0:
        max_tokens = 1
    return {"echo": echo, "prompt_logprobs": k}, max_tokens


@dataclass
class EchoSpec:
    """What a response does with the prompt; None from `of` when nothing."""

    echo: bool
    prompt_strings: list[str | None]  # per prompt: the client's string, None for token ids
    prompt_logprobs: int | None  # the explicit field: its k, or None (no prompt_logprobs)
    hide_output: bool  # echo with max_tokens 0: only the prompt
    n: int
    logprobs: int | None = None  # completions `logprobs`: the echoed prompt tokens' top k

    @classmethod
    def of(cls, req: Any, chat: bool, prompts: list[Any]) -> EchoSpec | None:
        echo = bool(req.echo) and not chat
        if not echo and req.prompt_logprobs is None:
            return None
        return cls(echo, [p if isinstance(p, str) else None for p in prompts], req.prompt_logprobs,
                   echo and req.max_tokens == 0, 1 if req.n is None else req.n,
                   None if chat else req.logprobs)

    def echo_text(self, index: int, prompt: PromptOutput) -> str:
        given = self.prompt_strings[index // self.n] if self.prompt_strings else None
        return given if given is not None else prompt.text

    def vllm_prompt_logprobs(self, prompt: PromptOutput | None) -> list[dict[str, Any] | None] | None:
        """vLLM's `prompt_logprobs`: [null, {id: {logprob, rank, decoded_token}}, ...]."""
        if self.prompt_logprobs is None or prompt is None:
            return None
        out: list[dict[str, Any] | None] = [None]
        for t in prompt.logprobs:
            entry = {str(t.token_id): _entry(t.logprob, t.rank, t.token)}
            for rank, alt in enumerate(t.top[: self.prompt_logprobs], start=1):
                entry.setdefault(str(alt.token_id), _entry(alt.logprob, rank, alt.token))
            out.append(entry)
        return out

    def completion_choice(self, choice: dict[str, Any], prompt: PromptOutput | None,
                          output_logprobs: list[TokenLogprob] | None, text_offset: int = 0) -> None:
        """Rewrite one completions choice (a body's or a chunk's) in place: echo text and prompt
        logprobs in front, the output dropped under max_tokens 0, `prompt_logprobs` added.
        `text_offset`: the choice's text already sent (streaming)."""
        if self.hide_output:
            choice["text"] = ""
            output_logprobs = [] if output_logprobs is not None else None
            choice["logprobs"] = None if output_logprobs is None else completion_logprobs([])
        if prompt is None:
            return
        if self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(prompt)
        if not self.echo:
            return
        choice["text"] = self.echo_text(choice["index"], prompt) + choice["text"]
        if output_logprobs is not None:
            choice["logprobs"] = _echo_logprobs(prompt, output_logprobs, text_offset, self.logprobs or 0)


def _entry(logprob: float, rank: int | None, token: str) -> dict[str, Any]:
    return {"logprob": _finite(logprob), "rank": rank, "decoded_token": token}


def _finite(value: float) -> float:
    value = float(value)
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares False


def _echo_logprobs(prompt: PromptOutput, output: list[TokenLogprob], text_offset: int, k: int
                   ) -> dict[str, Any]:
    """Completions logprobs of prompt then output (top k each): the first prompt token's are
    null."""
    offset = text_offset + len(prompt.first_token)
    trimmed = [t if len(t.top) <= k else msgspec.structs.replace(t, top=t.top[:k]) for t in prompt.logprobs]
    rest = completion_logprobs(trimmed, offset)
    offset += sum(len(t.token) for t in prompt.logprobs)
    generated = completion_logprobs(output, offset)
    return {
        "tokens": [prompt.first_token, *rest["tokens"], *generated["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"], *generated["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"], *generated["top_logprobs"]],
        "text_offset": [text_offset, *rest["text_offset"], *generated["text_offset"]],
    }
