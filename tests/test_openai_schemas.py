"""OpenAI request parsing and validation: exact statuses, error params and SamplingParams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import APIError, error_body
from gateway.openai_schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_TOKENS_PLACEHOLDER,
    chat_tool_plan,
    choice_index,
    parse_chat_request,
    parse_completion_request,
    prompt_request_id,
    to_generate_requests,
)
from protocol.messages import GenerateRequest, RequestFailed
from protocol.sampling import SamplingParams

MODEL = "smollm2-135m"
USER = [{"role": "user", "content": "hi"}]


def build(endpoint: str, body: bytes | dict[str, Any]) -> list[GenerateRequest]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parse = parse_chat_request if endpoint == "chat" else parse_completion_request
    req = parse(raw)
    return to_generate_requests(req, "req1", 12.5, MODEL, chat_tool_plan(req))


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **fields}


BAD: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed json", "chat", b'{"messages": [', 400, None),
    ("empty body", "chat", b"", 400, None),
    ("trailing garbage", "comp", b'{"prompt": "x"} x', 400, None),
    ("not utf-8", "chat", b"\xff\xfe", 400, None),
    ("body is an array", "chat", b"[]", 422, None),
    ("missing messages", "chat", {"model": MODEL}, 422, "messages"),
    ("messages not a list", "chat", {"messages": "hi"}, 422, "messages"),
    ("empty messages", "chat", chat(messages=[]), 400, "messages"),
    ("message without role", "chat", chat(messages=[{"content": "x"}]), 422, "messages[0].role"),
    ("role of wrong type", "chat", chat(messages=[{"role": 1, "content": "x"}]), 422,
     "messages[0].role"),
    ("unknown role", "chat", chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role"),
    ("user without content", "chat", chat(messages=[{"role": "user"}]), 400,
     "messages[0].content"),
    ("image part", "chat", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]}]),
     400, "messages[0].content[1].type"),
    ("text part without text", "chat",
     chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0].text"),
    ("unknown model", "chat", chat(model="gpt-4o"), 404, "model"),
    ("unknown model, completions", "comp", comp(model="other"), 404, "model"),
    ("temperature a string", "chat", chat(temperature="hot"), 422, "temperature"),
    ("huge temperature", "chat", chat(temperature=1e6), 400, "temperature"),
    ("negative temperature", "comp", comp(temperature=-0.1), 400, "temperature"),
    ("zero top_p", "chat", chat(top_p=0), 400, "top_p"),
    ("negative max_tokens", "chat", chat(max_tokens=-5), 400, "max_tokens"),
    ("zero max_tokens", "comp", comp(max_tokens=0), 400, "max_tokens"),
    ("zero max_completion_tokens", "chat", chat(max_completion_tokens=0, max_tokens=10), 400,
     "max_completion_tokens"),
    ("float max_tokens", "chat", chat(max_tokens=1.5), 422, "max_tokens"),
    ("bool max_tokens", "comp", comp(max_tokens=True), 422, "max_tokens"),
    ("max_tokens beyond int64", "chat", chat(max_tokens=2**64), 422, "max_tokens"),
    ("min_tokens above max_tokens", "chat", chat(max_tokens=5, min_tokens=6), 400, "min_tokens"),
    ("seed a string", "comp", comp(seed="x"), 422, "seed"),
    ("top_logprobs without logprobs", "chat", chat(top_logprobs=3), 400, "top_logprobs"),
    ("top_logprobs with logprobs false", "chat", chat(logprobs=False, top_logprobs=2), 400,
     "top_logprobs"),
    ("top_logprobs above 20", "chat", chat(logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("chat logprobs an int", "chat", chat(logprobs=5), 422, "logprobs"),
    ("completion logprobs above 20", "comp", comp(logprobs=21), 400, "logprobs"),
    ("completion logprobs a bool", "comp", comp(logprobs=True), 422, "logprobs"),
    ("n = 0", "chat", chat(n=0), 400, "n"),
    ("n = 17", "comp", comp(n=17), 400, "n"),
    ("best_of above n", "comp", comp(best_of=3), 400, "best_of"),
    ("tool_choice without tools", "chat", chat(tool_choice="auto"), 400, "tool_choice"),
    ("tool without a function", "chat", chat(tools=[{"type": "function"}], tool_choice="required"),
     400, "tools[0].function"),
    ("tool name with spaces", "chat", chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
     400, "tools[0].function.name"),
    ("named tool_choice not among the tools", "chat", chat(
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    ("tool_choice of another shape", "chat", chat(
        tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="sometimes"), 400,
     "tool_choice"),
    ("tool parameters not a schema", "chat", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "nope"}}}]), 400, "tools[0].function.parameters"),
    ("required tools and a response_format", "chat", chat(
        tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
        response_format={"type": "json_object"}), 400, "tool_choice"),
    ("tool message without tool_call_id", "chat", chat(messages=[
        *USER, {"role": "tool", "content": "20 C"}]), 400, "messages[1].tool_call_id"),
    ("user message with tool_calls", "chat", chat(messages=[
        {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]), 400,
     "messages[0].tool_calls"),
    ("functions", "chat", chat(functions=[{"name": "f"}]), 400, "functions"),
    ("function_call", "chat", chat(function_call="auto"), 400, "function_call"),
    ("json_schema without a schema", "comp", comp(
        response_format={"type": "json_schema", "json_schema": {}}), 400,
     "response_format.json_schema"),
    ("invalid json schema", "chat", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), 400, "response_format"),
    ("unknown response_format", "chat", chat(response_format={"type": "xml"}), 400,
     "response_format.type"),
    ("logit_bias", "chat", chat(logit_bias={"50256": -100}), 400, "logit_bias"),
    ("chat echo", "chat", chat(echo=True), 400, "echo"),
    ("max_tokens 0 without echo", "comp", comp(max_tokens=0), 400, "max_tokens"),
    ("suffix", "comp", comp(suffix="end"), 400, "suffix"),
    ("audio modality", "chat", chat(modalities=["text", "audio"]), 400, "modalities"),
    ("beam search", "comp", comp(use_beam_search=True), 400, "use_beam_search"),
    ("prompt_logprobs 21", "comp", comp(prompt_logprobs=21), 400, "prompt_logprobs"),
    ("prompt_logprobs -1", "chat", chat(prompt_logprobs=-1), 400, "prompt_logprobs"),
    ("prompt_logprobs streamed", "comp", comp(prompt_logprobs=0, stream=True), 400, "prompt_logprobs"),
    ("bad guided_regex", "chat", chat(guided_regex="(ab"), 400, "guided_regex"),
    ("guided_json not JSON", "comp", comp(guided_json="{nope"), 400, "guided_json"),
    ("empty guided_choice", "chat", chat(guided_choice=[]), 400, "guided_choice"),
    ("bad grammar", "comp", comp(structured_outputs={"grammar": "start: nope"}), 400,
     "structured_outputs"),
    ("two structured_outputs kinds", "chat", chat(structured_outputs={"regex": "a", "choice": ["b"]}),
     400, "structured_outputs"),
    ("two structured output fields", "chat", chat(structured_outputs={"choice": ["a"]},
                                                  guided_regex="a"), 400, "guided_regex"),
    ("structured output with ignore_eos", "chat", chat(guided_regex="a", ignore_eos=True), 400,
     "ignore_eos"),
    ("17 stop strings", "chat", chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop a number", "chat", chat(stop=5), 422, "stop"),
    ("negative stop token", "comp", comp(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("repetition_penalty 0", "comp", comp(repetition_penalty=0), 400, "repetition_penalty"),
    ("missing prompt", "comp", {"model": MODEL}, 422, "prompt"),
    ("prompt a number", "comp", comp(prompt=5), 422, "prompt"),
    ("empty prompt list", "comp", comp(prompt=[]), 400, "prompt"),
    ("mixed prompt list", "comp", comp(prompt=[1, "a"]), 422, "prompt"),
    ("bool token ids", "comp", comp(prompt=[True, False]), 422, "prompt"),
    ("empty token-id prompt", "comp", comp(prompt=[[1, 2], []]), 400, "prompt[1]"),
    ("negative token id", "comp", comp(prompt=[[1, 2], [3, -1]]), 400, "prompt[1]"),
    ("strings inside token lists", "comp", comp(prompt=[[1], ["a"]]), 422, "prompt[1]"),
    ("stream_options without stream", "chat", chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("stream_options with stream false", "comp",
     comp(stream=False, stream_options={"include_usage": True}), 400, "stream_options"),
]


@pytest.mark.parametrize("endpoint,body,status,param",
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(endpoint: str, body: bytes | dict[str, Any], status: int,
                     param: str | None) -> None:
    with pytest.raises(APIError) as info:
        build(endpoint, body)
    err = info.value
    assert (err.status, err.param) == (status, param), err.message
    assert err.message
    assert err.body() == error_body(status, err.message, param=param, code=err.code)


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(APIError) as info:
        build("chat", chat(model="gpt-4o"))
    assert info.value.body() == {"error": {
        "message": "The model `gpt-4o` does not exist.", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}}


def test_wrong_type_message_names_the_field() -> None:
    with pytest.raises(APIError) as info:
        build("chat", chat(temperature="hot"))
    assert info.value.message == (
        "Invalid request: Expected `float | null`, got `str` - at `$.temperature`")


def test_out_of_range_message() -> None:
    with pytest.raises(APIError) as info:
        build("chat", chat(max_completion_tokens=-1))
    assert info.value.message == "max_completion_tokens must be >= 1, got -1"


def test_chat_defaults() -> None:
    [gen] = build("chat", {"messages": USER})  # no model: the served one
    assert gen == GenerateRequest(
        request_id="req1", params=SamplingParams(max_tokens=MAX_TOKENS_PLACEHOLDER),
        arrival_time=12.5, messages=USER, n=1, max_tokens_is_default=True, priority=0)
    assert gen.params.temperature == 1.0 and gen.params.top_p == 1.0
    assert not gen.params.greedy


def test_completion_defaults_to_16_tokens() -> None:
    [gen] = build("comp", {"prompt": "hello"})
    assert gen == GenerateRequest(
        request_id="req1", params=SamplingParams(max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS),
        arrival_time=12.5, prompt="hello", n=1, max_tokens_is_default=False)


def test_every_sampling_field_is_carried() -> None:
    [gen] = build("chat", chat(
        max_tokens=7, max_completion_tokens=9, temperature=0.5, top_p=0.9, n=3, seed=-4,
        presence_penalty=0.25, frequency_penalty=-0.5, stop="END", logprobs=True,
        top_logprobs=4, ignore_eos=True, top_k=40, min_p=0.05, repetition_penalty=1.1,
        stop_token_ids=[2, 3], min_tokens=2, skip_special_tokens=False,
        include_stop_str_in_output=True, priority=-2, user="u1"))
    assert gen.params == SamplingParams(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05,
        repetition_penalty=1.1, presence_penalty=0.25, frequency_penalty=-0.5, seed=-4,
        min_tokens=2, stop_token_ids=[2, 3], ignore_eos=True, logprobs=4, stop=["END"],
        include_stop_str_in_output=True, skip_special_tokens=False)
    assert (gen.n, gen.priority, gen.max_tokens_is_default) == (3, -2, False)


def test_temperature_zero_is_greedy_and_logprobs_default_to_zero_alternatives() -> None:
    [gen] = build("chat", chat(temperature=0, logprobs=True, stop=["a", "b"]))
    assert gen.params.greedy and gen.params.temperature == 0.0
    assert gen.params.logprobs == 0 and gen.params.stop == ["a", "b"]
    [gen] = build("comp", comp(logprobs=5))
    assert gen.params.logprobs == 5
    [gen] = build("chat", chat(logprobs=False))
    assert gen.params.logprobs is None


def test_nulls_mean_defaults() -> None:
    body = chat(**{k: None for k in (
        "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
        "logprobs", "top_logprobs", "ignore_eos", "top_k", "priority", "tools", "tool_choice",
        "logit_bias", "response_format", "best_of", "echo")})
    [gen] = build("chat", body)
    assert gen.params == SamplingParams(max_tokens=MAX_TOKENS_PLACEHOLDER)
    assert gen.n == 1 and gen.max_tokens_is_default


def test_unknown_and_harmless_fields_are_ignored() -> None:
    [gen] = build("chat", chat(
        user="x", service_tier="auto", store=False, metadata={"a": "b"}, parallel_tool_calls=True,
        logit_bias={}, tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="none", response_format={"type": "text"}, modalities=["text"], best_of=1,
        echo=False, chat_template_kwargs={"enable_thinking": False}, some_future_field=[1, 2]))
    assert gen.messages == USER


def test_chat_messages_join_text_parts_and_keep_names() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "developer", "content": []},
    ]
    [gen] = build("chat", chat(messages=messages))
    assert gen.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "developer", "content": ""},
    ]


def test_prompt_list_fans_out_one_request_per_prompt() -> None:
    gens = build("comp", comp(prompt=["a", "b", "c"], n=2, max_tokens=5))
    assert [g.request_id for g in gens] == ["req1-0", "req1-1", "req1-2"]
    assert [g.prompt for g in gens] == ["a", "b", "c"]
    assert all(g.n == 2 and g.params.max_tokens == 5 and g.prompt_token_ids is None
               for g in gens)
    assert [prompt_request_id("req1", p, 3) for p in range(3)] == ["req1-0", "req1-1", "req1-2"]
    assert prompt_request_id("req1", 0, 1) == "req1"
    assert [choice_index(p, 2, i) for p in range(3) for i in range(2)] == [0, 1, 2, 3, 4, 5]


def test_token_id_prompts() -> None:
    [gen] = build("comp", comp(prompt=[1, 2, 3]))
    assert (gen.request_id, gen.prompt, gen.prompt_token_ids) == ("req1", None, [1, 2, 3])
    gens = build("comp", comp(prompt=[[5], [6, 7]]))
    assert [(g.request_id, g.prompt_token_ids) for g in gens] == [
        ("req1-0", [5]), ("req1-1", [6, 7])]


def test_stream_options() -> None:
    req = parse_chat_request(json.dumps(chat(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True})).encode())
    assert req.stream and req.include_usage and req.continuous_usage_stats
    req = parse_completion_request(json.dumps(comp(stream=True)).encode())
    assert not req.include_usage and not req.continuous_usage_stats
    req = parse_completion_request(
        json.dumps(comp(stream_options={"include_usage": True})).encode())
    assert not req.include_usage  # only meaningful when streaming (and refused without it)


def test_vllm_bench_serve_payloads() -> None:
    """What `vllm bench serve` posts (openai-chat and openai backends, --ignore-eos)."""
    [gen] = build("chat", {
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "p"}]}],
        "max_completion_tokens": 128, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True})
    assert gen.messages == [{"role": "user", "content": "p"}]
    assert gen.params == SamplingParams(max_tokens=128, ignore_eos=True)
    [gen] = build("comp", {
        "model": MODEL, "prompt": [11, 12, 13], "repetition_penalty": 1.0, "max_tokens": 64,
        "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.0, "ignore_eos": True})
    assert gen.prompt_token_ids == [11, 12, 13]
    assert gen.params == SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def test_sglang_bench_serving_payloads() -> None:
    """What SGLang's `bench_serving` posts (sglang-oai and sglang-oai-chat backends)."""
    [gen] = build("comp", {"model": MODEL, "prompt": "p", "temperature": 0.0, "best_of": 1,
                           "max_tokens": 32, "stream": True, "ignore_eos": True})
    assert gen.params == SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    [gen] = build("chat", {"model": MODEL, "messages": [{"role": "user", "content": "p"}],
                           "temperature": 0.0, "max_tokens": 32, "stream": False})
    assert gen.params == SamplingParams(max_tokens=32, temperature=0.0)


def test_error_types_by_status() -> None:
    assert error_body(400, "m") == {"error": {
        "message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert error_body(401, "k")["error"] == {
        "message": "k", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    types = {s: error_body(s, "m")["error"]["type"] for s in (404, 413, 422, 429, 500, 503, 504)}
    assert types == {404: "invalid_request_error", 413: "invalid_request_error",
                     422: "invalid_request_error", 429: "requests", 500: "server_error",
                     503: "server_error", 504: "server_error"}
    assert error_body(429, "m")["error"]["code"] == "rate_limit_exceeded"
    assert error_body(503, "m", code="x", type="t", param="p")["error"] == {
        "message": "m", "type": "t", "param": "p", "code": "x"}


def test_api_error_from_request_failed() -> None:
    err = APIError.from_request_failed(RequestFailed(
        request_id="r", status=400, message="prompt too long", param="messages"))
    assert (err.status, err.message, err.type, err.param, err.code) == (
        400, "prompt too long", "invalid_request_error", "messages", None)
    assert str(err) == "prompt too long"
