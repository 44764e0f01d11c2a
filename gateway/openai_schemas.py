"""Request bodies of POST /v1/chat/completions and /v1/completions, and their GenerateRequests.

Unknown fields are ignored: clients send fields we have no use for (`user`, `service_tier`,
...). Fields that would change what is generated and that we cannot honour (logit_bias, chat
echo, suffix, best_of != n, beam search, legacy `functions`) get a 400 naming them instead.
Optional fields accept `null` (vLLM's benchmark sends some). Structured outputs
(response_format, structured_outputs, guided_*) are read by `gateway/structured_request.py`,
tools by `gateway/tool_calls/tool_request.py`; both turn into a grammar in the sampling params.
Completions `echo` and `prompt_logprobs` are gateway.prompt_echo's.

Status codes: body not JSON -> 400; JSON of the wrong shape (wrong type, missing required
field) -> 422 with `param` the field's path, e.g. "temperature" or "messages[0].role"; a value
out of range or unsupported -> 400 with `param`; a model we do not serve -> 404
"model_not_found". A missing `model` means the served one.

max_tokens: chat without max_tokens/max_completion_tokens generates until the context is full
(`max_tokens_is_default` with MAX_TOKENS_PLACEHOLDER, which the tokenizer replaces by what the
context leaves); /v1/completions defaults to 16 tokens, as OpenAI and vLLM do.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from gateway.chat_messages import ChatMessage, chat_messages
from gateway.errors import APIError
from gateway.prompt_echo import prompt_fields
from gateway.structured_request import structured_output_of
from gateway.tool_calls.tool_request import ToolPlan, plan_tools
from protocol.messages import GenerateRequest
from protocol.sampling import SamplingParams, SamplingParamsError
from protocol.structured_output import StructuredOutput

MAX_N = 16
MAX_TOKENS_PLACEHOLDER = 2**31 - 1  # "as many as fit"; the tokenizer clamps it to the context
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # what msgpack carries


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None  # a final chunk with usage and no choices
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk too


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: Any = None  # {"name": ..., "schema": {...}, "strict": ...}


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields both endpoints share: OpenAI's, then the vLLM/SGLang extras."""

    model: str | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Int64 | None = None
    best_of: Int64 | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    echo: bool | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[Int64] | None = None
    min_tokens: Int64 | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: Int64 | None = None
    use_beam_search: bool | None = None
    prompt_logprobs: Int64 | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @property
    def include_usage(self) -> bool:
        """Streaming: end with a usage chunk (`"choices": []`) before [DONE]."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage_stats(self) -> bool:
        """Streaming: every chunk carries the usage so far (needs include_usage, as in vLLM)."""
        options = self.stream_options
        return self.include_usage and options is not None and bool(options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Int64 | None = None  # wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]  # str | list[str] | list[int] | list[list[int]], checked by hand
    logprobs: Int64 | None = None
    suffix: str | None = None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return _decode(body, ChatCompletionRequest)


def parse_completion_request(body: bytes) -> CompletionRequest:
    return _decode(body, CompletionRequest)


def _decode(body: bytes, type_: type) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise APIError(422, f"Invalid request: {e}", param=_param_of(str(e))) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None


_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")


def _param_of(error: str) -> str | None:
    """msgspec's "... - at `$.messages[0]`" (plus a missing field's name) as "messages[0].role"."""
    at = _AT.search(error)
    path = at.group(1) if at else ""
    missing = _MISSING.match(error)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def prompt_request_id(request_id: str, prompt_index: int, num_prompts: int) -> str:
    """The GenerateRequest id of one prompt of a /v1/completions request with several."""
    return request_id if num_prompts == 1 else f"{request_id}-{prompt_index}"


def choice_index(prompt_index: int, n: int, index: int) -> int:
    """The client-visible choice index of choice `index` (of n) of prompt `prompt_index`."""
    return prompt_index * n + index


def to_generate_requests(
    req: ChatCompletionRequest | CompletionRequest,
    request_id: str,
    arrival_time: float,
    served_model: str,
    tools: ToolPlan | None = None,
) -> list[GenerateRequest]:
    """Validate `req` and build one GenerateRequest per prompt; raises APIError. `tools` is
    `chat_tool_plan(req)` (computed once by the caller, which also parses the output with it).

    A chat request gives one. A completion with a list of prompts gives one per prompt, in
    order: item p (p = the prompt index) has id `prompt_request_id(request_id, p, len)` and its
    choices i in [0, n) are the client's choices `choice_index(p, n, i)` = p * n + i.
    """
    if req.model is not None and req.model != served_model:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model",
                       code="model_not_found")
    _reject_unsupported(req)
    if req.stream_options is not None and not req.stream:  # as OpenAI and vLLM answer
        raise APIError(400, "stream_options can only be given when stream is true",
                       param="stream_options")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {n}", param="n")
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    common: dict[str, Any] = dict(arrival_time=arrival_time, n=n, priority=req.priority or 0)
    structured = structured_output_of(req)
    if tools is not None and tools.structured is not None:
        if structured is not None:
            raise APIError(400, f"tool_choice {tools.mode!r} already constrains the output; "
                           "drop response_format / structured_outputs", param="tool_choice")
        structured = tools.structured
    if isinstance(req, ChatCompletionRequest):
        messages = chat_messages(req.messages)
        params, is_default = _sampling_params(req, _chat_max_tokens(req), _chat_logprobs(req),
                                              structured)
        params = msgspec.structs.replace(params, **prompt_fields(req, True, params.max_tokens)[0])
        return [GenerateRequest(request_id=request_id, params=params, messages=messages,
                                max_tokens_is_default=is_default,
                                tools=None if tools is None else tools.tools, **common)]
    fields, run_max_tokens = prompt_fields(
        req, False, req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS)
    params, is_default = _sampling_params(req, ("max_tokens", run_max_tokens), req.logprobs, structured)
    params = msgspec.structs.replace(params, **fields)
    prompts = _completion_prompts(req.prompt)
    out = []
    for p, prompt in enumerate(prompts):
        rid = prompt_request_id(request_id, p, len(prompts))
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        out.append(GenerateRequest(request_id=rid, params=params, prompt=text,
                                   prompt_token_ids=ids, max_tokens_is_default=is_default,
                                   **common))
    return out


def _reject_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for fields that would change the output in ways we cannot honour."""
    for name in ("logit_bias", "suffix", "use_beam_search"):  # refused when truthy
        if getattr(req, name, None):
            raise APIError(400, f"{name} is not supported", param=name)
    if req.echo and isinstance(req, ChatCompletionRequest):
        raise APIError(400, "echo is supported on /v1/completions only", param="echo")
    if isinstance(req, CompletionRequest):
        return
    if req.function_call not in (None, "none"):
        raise APIError(400, 'function_call other than "none" is not supported; use tools and '
                       "tool_choice", param="function_call")
    if req.functions and req.function_call is None:
        raise APIError(400, 'functions are not supported (use tools; with function_call "none" '
                       "they are accepted and ignored)", param="functions")
    if req.modalities is not None and req.modalities != ["text"]:
        raise APIError(400, 'only the "text" modality is supported', param="modalities")


def chat_tool_plan(req: ChatCompletionRequest | CompletionRequest) -> ToolPlan | None:
    """The request's tools and tool_choice, checked (None: no tool may be called)."""
    if not isinstance(req, ChatCompletionRequest):
        return None
    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)


def _chat_max_tokens(req: ChatCompletionRequest) -> tuple[str, int | None]:
    if req.max_completion_tokens is not None:
        return "max_completion_tokens", req.max_completion_tokens
    return "max_tokens", req.max_tokens


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {req.top_logprobs}",
                       param="top_logprobs")
    if not req.logprobs:
        if req.top_logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true",
                           param="top_logprobs")
        return None
    return req.top_logprobs or 0


def _sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: tuple[str, int | None],
    logprobs: int | None,
    structured: StructuredOutput | None = None,
) -> tuple[SamplingParams, bool]:
    """SamplingParams with OpenAI's defaults for what the client left out, validated."""
    max_tokens_param, max_tokens_value = max_tokens
    is_default = max_tokens_value is None

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    params = SamplingParams(
        max_tokens=MAX_TOKENS_PLACEHOLDER if max_tokens_value is None else max_tokens_value,
        temperature=float(given(req.temperature, 1.0)),
        top_p=float(given(req.top_p, 1.0)),
        top_k=given(req.top_k, 0),
        min_p=float(given(req.min_p, 0.0)),
        repetition_penalty=float(given(req.repetition_penalty, 1.0)),
        presence_penalty=float(given(req.presence_penalty, 0.0)),
        frequency_penalty=float(given(req.frequency_penalty, 0.0)),
        seed=req.seed,
        min_tokens=given(req.min_tokens, 0),
        stop_token_ids=list(given(req.stop_token_ids, [])),
        ignore_eos=given(req.ignore_eos, False),
        logprobs=logprobs,
        stop=[req.stop] if isinstance(req.stop, str) else list(given(req.stop, [])),
        include_stop_str_in_output=given(req.include_stop_str_in_output, False),
        skip_special_tokens=given(req.skip_special_tokens, True),
        structured=structured,
    )
    try:
        params.validate()
    except SamplingParamsError as e:
        param = max_tokens_param if e.param == "max_tokens" else e.param
        detail = str(e).removeprefix(f"{e.param}: ")
        raise APIError(400, f"{param} {detail}", param=param) from None
    return params, is_default


_PROMPT_SHAPE = ("prompt must be a string, a list of strings, a list of token ids or a list of "
                 "lists of token ids")


def _completion_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """One entry per prompt: a string, or a non-empty list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(_is_token_id(t) for t in prompt):
        return [_token_ids(prompt, "prompt")]
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise APIError(422, _PROMPT_SHAPE, param="prompt")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(ids: list[Any], param: str) -> list[int]:
    if not ids:
        raise APIError(400, "a token-id prompt must not be empty", param=param)
    if not all(_is_token_id(t) for t in ids):
        raise APIError(422, _PROMPT_SHAPE, param=param)
    if not all(0 <= t < 2**63 for t in ids):
        raise APIError(400, "token ids must be >= 0", param=param)
    return ids
