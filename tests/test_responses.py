"""Response bodies and SSE chunks: exact bytes, and shapes the `openai` SDK itself parses."""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import error_body
from gateway.openai_schemas import (
    parse_chat_request,
    parse_completion_request,
    to_generate_requests,
)
from gateway.responses import (
    LOGPROB_FLOOR,
    SSE_DONE,
    ChoiceResult,
    chat_chunk,
    chat_completion_body,
    chat_completion_id,
    chat_logprobs,
    chat_usage_chunk,
    completion_body,
    completion_chunk,
    completion_id,
    completion_logprobs,
    completion_usage_chunk,
    encode_json,
    sse,
    usage_body,
)
from protocol.messages import TextDelta, TokenLogprob, TopLogprob

MODEL = "smollm2-135m"
ID = chat_completion_id("abc")


def tok(token: str, logprob: float, tid: int,
        top: tuple[tuple[str, float, int], ...] = ()) -> TokenLogprob:
    return TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), token_id=tid,
                        top=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()), token_id=i)
                             for t, lp, i in top])


TOKENS = [tok("He", -0.5, 10, (("He", -0.5, 10), ("Hi", -1.5, 11))),
          tok("llo", -0.25, 12, (("y", -0.1, 13),))]


def choice(index: int, text: str, finish: str = "stop", stop_reason: int | str | None = None,
           logprobs: list[TokenLogprob] | None = None) -> ChoiceResult:
    return ChoiceResult(index=index, text_parts=[text], finish_reason=finish,
                        stop_reason=stop_reason, logprobs=logprobs)


def test_sse_framing_is_exact() -> None:
    assert sse({"a": 1, "b": "é\n", "c": None}) == b'data: {"a":1,"b":"\xc3\xa9\\n","c":null}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert encode_json({"x": [1.5, True]}) == b'{"x":[1.5,true]}'


def test_ids_and_usage() -> None:
    assert (chat_completion_id("r1"), completion_id("r1")) == ("chatcmpl-r1", "cmpl-r1")
    assert usage_body(10, 5) == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert usage_body(10, 5, cached_tokens=4) == {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4}}


def test_chat_logprobs_exact() -> None:
    assert chat_logprobs(TOKENS) == {"content": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
            {"token": "He", "logprob": -0.5, "bytes": [72, 101]},
            {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}]},
        {"token": "llo", "logprob": -0.25, "bytes": [108, 108, 111], "top_logprobs": [
            {"token": "y", "logprob": -0.1, "bytes": [121]}]},
    ]}


def test_completion_logprobs_exact() -> None:
    assert completion_logprobs(TOKENS, text_offset=7) == {
        "tokens": ["He", "llo"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"He": -0.5, "Hi": -1.5}, {"y": -0.1, "llo": -0.25}],
        "text_offset": [7, 9],
    }


def test_infinite_and_nan_logprobs_are_floored() -> None:
    bad = [tok("a", float("-inf"), 1, (("b", float("nan"), 2),))]
    lp = chat_logprobs(bad)["content"][0]
    assert lp["logprob"] == LOGPROB_FLOOR and lp["top_logprobs"][0]["logprob"] == LOGPROB_FLOOR
    assert b"null" not in encode_json(completion_logprobs(bad))


def test_chat_completion_body_exact_and_parsed_by_sdk() -> None:
    body = chat_completion_body(ID, 1700000000, MODEL,
                                [choice(1, "b", "length"), choice(0, "Hello", "stop", 2, TOKENS)],
                                usage_body(3, 4, cached_tokens=0))
    assert body == {
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello"},
             "logprobs": chat_logprobs(TOKENS), "finish_reason": "stop", "stop_reason": 2},
            {"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": None,
             "finish_reason": "length", "stop_reason": None},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }
    parsed = ChatCompletion.model_validate(json.loads(encode_json(body)))
    assert parsed.choices[0].message.content == "Hello"
    assert parsed.choices[0].logprobs.content[1].top_logprobs[0].token == "y"
    assert parsed.choices[1].finish_reason == "length"
    assert parsed.usage.prompt_tokens_details.cached_tokens == 0


def test_completion_body_exact_and_parsed_by_sdk() -> None:
    body = completion_body(completion_id("abc"), 5, MODEL,
                           [choice(0, "Hello", "stop", "END", TOKENS)], usage_body(2, 2))
    assert body == {
        "id": "cmpl-abc", "object": "text_completion", "created": 5, "model": MODEL,
        "choices": [{"index": 0, "text": "Hello", "logprobs": completion_logprobs(TOKENS),
                     "finish_reason": "stop", "stop_reason": "END"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].logprobs.text_offset == [0, 2]
    assert parsed.choices[0].model_extra == {"stop_reason": "END"}


def test_chat_chunks_exact_and_parsed_by_sdk() -> None:
    role = chat_chunk(ID, 9, MODEL, 0, "", role=True)
    assert role == {"id": ID, "object": "chat.completion.chunk", "created": 9, "model": MODEL,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]}
    text = chat_chunk(ID, 9, MODEL, 1, "Hi", logprobs=TOKENS[:1])
    assert text["choices"] == [{"index": 1, "delta": {"content": "Hi"},
                                "logprobs": chat_logprobs(TOKENS[:1]), "finish_reason": None}]
    last = chat_chunk(ID, 9, MODEL, 0, "!", finish_reason="stop", stop_reason=None,
                      usage=usage_body(3, 2))
    assert last["choices"] == [{"index": 0, "delta": {"content": "!"}, "logprobs": None,
                                "finish_reason": "stop", "stop_reason": None}]
    assert last["usage"] == usage_body(3, 2)
    usage = chat_usage_chunk(ID, 9, MODEL, usage_body(3, 2))
    assert usage == {"id": ID, "object": "chat.completion.chunk", "created": 9, "model": MODEL,
                     "choices": [], "usage": usage_body(3, 2)}
    for chunk in (role, text, last, usage):
        ChatCompletionChunk.model_validate(chunk)


def test_completion_chunks_exact_and_parsed_by_sdk() -> None:
    cid = completion_id("abc")
    text = completion_chunk(cid, 9, MODEL, 2, "llo", logprobs=TOKENS[1:], text_offset=2)
    assert text == {"id": cid, "object": "text_completion", "created": 9, "model": MODEL,
                    "choices": [{"index": 2, "text": "llo", "finish_reason": None,
                                 "logprobs": completion_logprobs(TOKENS[1:], 2)}]}
    assert text["choices"][0]["logprobs"]["text_offset"] == [2]
    last = completion_chunk(cid, 9, MODEL, 2, "", finish_reason="length")
    assert last["choices"] == [{"index": 2, "text": "", "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    usage = completion_usage_chunk(cid, 9, MODEL, usage_body(1, 1))
    assert usage["choices"] == [] and usage["usage"] == usage_body(1, 1)
    # The SDK types a completion choice's finish_reason as never null, yet OpenAI and vLLM
    # stream null until the end and the SDK's stream reader does not validate; the mid-stream
    # chunk is covered by test_sdk_completion_stream_round_trip.
    for chunk in (last, usage):
        Completion.model_validate(chunk)
    with_reason = json.loads(encode_json(text))
    with_reason["choices"][0]["finish_reason"] = "stop"
    Completion.model_validate(with_reason)


def test_choice_result_accumulates_deltas() -> None:
    acc = ChoiceResult(index=1)
    acc.add(TextDelta(request_id="r", index=1, text="He", token_ids=[10], logprobs=TOKENS[:1],
                      num_prompt_tokens=7, num_output_tokens=1, num_cached_tokens=4))
    acc.add(TextDelta(request_id="r", index=1, text="llo", token_ids=[12], logprobs=TOKENS[1:],
                      finish_reason="stop", stop_reason=2, num_output_tokens=2))
    assert (acc.text, acc.finish_reason, acc.stop_reason) == ("Hello", "stop", 2)
    assert acc.logprobs == TOKENS
    assert (acc.num_prompt_tokens, acc.num_output_tokens, acc.num_cached_tokens) == (7, 2, 4)
    assert ChoiceResult(index=0).logprobs is None


# ---------------------------------------------------------------- through the real SDK


def sdk_client(handler: Callable[[httpx.Request], httpx.Response]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://pdserve.test/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def sse_response(events: list[dict[str, Any]]) -> httpx.Response:
    body = b"".join(sse(e) for e in events) + SSE_DONE
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def test_sdk_chat_round_trip() -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        req = parse_chat_request(request.content)
        seen.append(to_generate_requests(req, "r9", 0.0, MODEL))
        body = chat_completion_body(chat_completion_id("r9"), 1, MODEL, [choice(0, "Hey")],
                                    usage_body(5, 1))
        return httpx.Response(200, content=encode_json(body))

    out = sdk_client(handler).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=8,
        temperature=0, seed=3, stop=["x"], extra_body={"top_k": 5, "ignore_eos": True})
    assert out.choices[0].message.content == "Hey" and out.usage.total_tokens == 6
    [[gen]] = seen
    assert (gen.params.max_tokens, gen.params.seed, gen.params.top_k, gen.params.stop,
            gen.params.ignore_eos, gen.params.greedy) == (8, 3, 5, ["x"], True, True)


def test_sdk_chat_stream_round_trip() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        req = parse_chat_request(request.content)
        assert req.stream and req.include_usage
        return sse_response([
            chat_chunk(ID, 1, MODEL, 0, "", role=True),
            chat_chunk(ID, 1, MODEL, 0, "Hel"),
            chat_chunk(ID, 1, MODEL, 0, "lo", finish_reason="stop"),
            chat_usage_chunk(ID, 1, MODEL, usage_body(4, 2)),
        ])

    chunks = list(sdk_client(handler).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[2].choices[0].finish_reason == "stop"
    assert chunks[3].choices == [] and chunks[3].usage.completion_tokens == 2


def test_sdk_completion_stream_round_trip() -> None:
    cid = completion_id("r")

    def handler(request: httpx.Request) -> httpx.Response:
        gens = to_generate_requests(parse_completion_request(request.content), "r", 0.0, MODEL)
        assert [g.prompt for g in gens] == ["a", "b"]
        return sse_response([completion_chunk(cid, 1, MODEL, 1, "y"),
                             completion_chunk(cid, 1, MODEL, 0, "x", finish_reason="length"),
                             completion_chunk(cid, 1, MODEL, 1, "", finish_reason="stop")])

    chunks = list(sdk_client(handler).completions.create(
        model=MODEL, prompt=["a", "b"], max_tokens=1, stream=True))
    assert [(c.choices[0].index, c.choices[0].text, c.choices[0].finish_reason)
            for c in chunks] == [(1, "y", None), (0, "x", "length"), (1, "", "stop")]


def test_sdk_sees_our_errors() -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=encode_json(error_body(
            404, "The model `m` does not exist.", param="model", code="model_not_found")))

    with pytest.raises(openai.NotFoundError) as info:
        sdk_client(not_found).completions.create(model="m", prompt="p")
    assert (info.value.code, info.value.param, info.value.type) == (
        "model_not_found", "model", "invalid_request_error")

    def fails_mid_stream(request: httpx.Request) -> httpx.Response:
        return sse_response([chat_chunk(ID, 1, MODEL, 0, "a", role=True),
                             error_body(500, "worker died")])

    stream = sdk_client(fails_mid_stream).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="worker died"):
        list(stream)
