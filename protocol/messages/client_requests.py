"""A client's request on its way in: gateway -> tokenizer (`GenerateRequest`), tokenizer ->
scheduler (`AddRequest`, one per choice), and the aborts that stop requests early."""

from __future__ import annotations

from typing import Any

from protocol.messages.base import FinishReason, _Msg
from protocol.sampling import SamplingParams


class GenerateRequest(_Msg, tag="generate"):
    """A client request as the gateway validated it, before tokenization.

    Exactly one of prompt / prompt_token_ids / messages is set. The tokenizer turns it into n
    AddRequests (ids from `choice_request_id`), or one RequestFailed back to the gateway.
    """

    request_id: str
    params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    max_tokens_is_default: bool = False  # the client gave none: use what the context leaves
    priority: int = 0
    tools: list[dict[str, Any]] | None = None  # OpenAI tool objects, rendered by the chat template


def choice_request_id(request_id: str, index: int, n: int) -> str:
    """The scheduler-side id of choice `index` of a request with n choices."""
    return request_id if n == 1 else f"{request_id}#{index}"


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: seed + index (vLLM's rule, so seeded choices differ),
    wrapped into the signed 64-bit range msgpack and the sampler carry."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


class AddRequest(_Msg, tag="add"):
    """A tokenized, validated request, ready to schedule."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    priority: int = 0  # lower runs first (vLLM's convention); FCFS among equals
    parent_id: str = ""  # the client's request id when n > 1 made several of these
    index: int = 0  # which of the n choices this is


class AbortRequests(_Msg, tag="abort"):
    """Stop these requests now (client gone, stop string matched) and free their KV blocks."""

    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT
