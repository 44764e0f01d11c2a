"""What a request's client gets back, as the gateway receives it: text deltas with rendered
logprobs and prompt (`TextOutputs`), or a failure before any output (`RequestFailed`)."""

from __future__ import annotations

from protocol.messages.base import _Msg, _Part


class TopLogprob(_Part):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int


class TokenLogprob(_Part):
    token: str
    logprob: float
    bytes: list[int]
    token_id: int
    top: list[TopLogprob] = []  # highest first: the i-th has rank i + 1
    rank: int | None = None  # 1-based rank of this token among all (sent for prompt tokens)


class PromptOutput(_Part):
    """The prompt as a client gets it back (completions `echo`, `prompt_logprobs`)."""

    text: str  # the prompt decoded ("" unless echo was asked)
    first_token: str  # prompt token 0's text: it has no logprob (nothing precedes it)
    logprobs: list[TokenLogprob] = []  # prompt tokens 1.., when prompt logprobs were asked


class TextDelta(_Part):
    """New text of one choice, and how it ended when it has."""

    request_id: str  # the client's request id
    index: int  # choice index
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, all deltas included
    num_cached_tokens: int = 0
    queue_seconds: float | None = None  # arrival to first scheduling, on the first delta
    error: str = ""
    prompt: PromptOutput | None = None  # on a choice's first delta, when echo or prompt logprobs


class TextOutputs(_Msg, tag="text"):
    deltas: list[TextDelta]


class RequestFailed(_Msg, tag="failed"):
    """A request ended before producing output: the gateway answers with this HTTP status."""

    request_id: str
    status: int
    message: str
    param: str | None = None
    code: str | None = None
