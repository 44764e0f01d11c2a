"""Tools and structured outputs through a real `pdserve up`, with the unmodified openai SDK and
LangChain: whatever the bundled 135M model would say, the answers parse and follow the schema."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.service_fixture import MODEL, module_server

pytestmark = pytest.mark.slow
server = module_server("structured", "--max-num-seqs", "16")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "hobbies": {"type": "array", "items": {"enum": ["chess", "golf", "music"]}, "maxItems": 3},
    },
    "required": ["name", "age", "address", "hobbies"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris and what time is it in Tokyo?"}]


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, max_tokens=kw.pop("max_tokens", 120), **kw)


def _check_calls(calls, tools) -> list[tuple[str, dict]]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, schemas[call.function.name])
        out.append((call.function.name, args))
    return out


def test_response_format_json_schema_and_json_object(client):
    resp = _chat(client, messages=[{"role": "user", "content": "Describe a person."}],
                 response_format={"type": "json_schema", "json_schema": {
                     "name": "person", "strict": True, "schema": PERSON}}, temperature=0.7, seed=3)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    resp = _chat(client, messages=[{"role": "user", "content": "Give me some JSON."}],
                 response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert resp.choices[0].finish_reason == "stop"  # the object closed before max_tokens
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_vllm_structured_outputs_and_guided_aliases(client):
    msgs = [{"role": "user", "content": "Is the sky green?"}]
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_choice": ["yes", "no"]}):
        assert _chat(client, messages=msgs, extra_body=extra).choices[0].message.content in ("yes", "no")
    phone = _chat(client, messages=[{"role": "user", "content": "A phone number?"}],
                  extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"}).choices[0].message.content
    assert len(phone) == 8 and phone[3] == "-" and (phone[:3] + phone[4:]).isdigit()
    grammar = 'root ::= "(" [a-z]+ ")"'
    comp = client.completions.create(model=MODEL, prompt="A word in brackets:", max_tokens=20,
                                     extra_body={"structured_outputs": {"grammar": grammar}})
    text = comp.choices[0].text
    assert text.startswith("(") and (text.endswith(")") or comp.choices[0].finish_reason == "length")
    with_schema = client.completions.create(model=MODEL, prompt="A person:", max_tokens=120,
                                            extra_body={"guided_json": PERSON}, n=2, seed=5, temperature=1.0)
    for c in with_schema.choices:  # n > 1: every choice under its own matcher
        jsonschema.validate(json.loads(c.text), PERSON)


def test_invalid_schema_or_grammar_is_a_400_at_once(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, messages=ASK, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
    assert e.value.status_code == 400 and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        _chat(client, messages=ASK, extra_body={"guided_regex": "(unclosed"})


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_the_vocabulary_cannot_serve_is_a_400_not_an_empty_stop(client, stream):
    """Valid without a vocabulary (the gateway's check passes), but SmolLM2 has no such special
    token: the tokenizer stage compiles it against the vocabulary and answers 400 at once."""
    with pytest.raises(openai.BadRequestError) as e:
        out = client.completions.create(model=MODEL, prompt="Say hi:", max_tokens=10, stream=stream,
                                        extra_body={"structured_outputs": {"grammar": "start: <|no_such_token|>"}})
        list(out) if stream else out
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert 'unknown special token: "<|no_such_token|>"' in err["message"]
    with pytest.raises(openai.BadRequestError, match="Token range end too large: 99999"):
        _chat(client, messages=ASK, extra_body={"guided_grammar": 'start: "a" <[99999]>'}, n=2, stream=stream)
    ok = _chat(client, messages=ASK, extra_body={"guided_grammar": 'start: "a" <|endoftext|>'}, max_tokens=5)
    assert ok.choices[0].message.content == "a" and ok.choices[0].finish_reason == "stop"


def test_required_tool_choice_and_parallel_calls(client):
    resp = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _check_calls(choice.message.tool_calls, [WEATHER, TIME])
    assert calls
    for seed in range(8):  # sampled: some seed makes the 135M model call both tools at once
        resp = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                     temperature=0.9, seed=seed, max_tokens=160)
        assert resp.choices[0].finish_reason == "tool_calls"
        calls = _check_calls(resp.choices[0].message.tool_calls, [WEATHER, TIME])
        if len(calls) >= 2:
            break
    assert len(calls) >= 2, "no seed gave parallel calls"
    assert len({c.id for c in resp.choices[0].message.tool_calls}) == len(calls)
    one = _chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                parallel_tool_calls=False, temperature=0.9, seed=1)
    assert len(_check_calls(one.choices[0].message.tool_calls, [WEATHER, TIME])) == 1


def test_named_tool_choice(client):
    resp = _chat(client, messages=ASK, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0)
    [(name, args)] = _check_calls(resp.choices[0].message.tool_calls, [WEATHER, TIME])
    assert name == "get_time" and resp.choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_gives_content_or_valid_calls(client):
    resp = _chat(client, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=48)
    msg = resp.choices[0].message
    if msg.tool_calls:
        _check_calls(msg.tool_calls, [WEATHER, TIME])
        assert resp.choices[0].finish_reason == "tool_calls"
    else:
        assert msg.content and "<tool_call>" not in msg.content


# Hermes-style text as the bundled template asks for it. The 135M model never writes it on its
# own, so a regex makes it; the "auto" path (template, hermes parser, wire format) is the real one.
HERMES_CALLS = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,12}", '
                r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", '
                r'"arguments": \{"timezone": "[A-Z][a-z]{2,12}/[A-Z][a-z]{2,12}"\}\}\n</tool_call>')


def test_auto_tool_choice_parses_calls_the_model_writes_whole_and_streamed(client):
    kw = dict(messages=ASK, tools=[WEATHER, TIME], extra_body={"guided_regex": HERMES_CALLS},
              temperature=0, max_tokens=120)
    resp = _chat(client, **kw)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert [n for n, _ in _check_calls(choice.message.tool_calls, [WEATHER, TIME])] == ["get_weather", "get_time"]
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in _chat(client, stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                calls.setdefault(d.index, [d.function.name, ""])[1] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [tuple(v) for v in calls.values()] == [
        (t.function.name, t.function.arguments) for t in choice.message.tool_calls]


def test_streamed_tool_calls_send_the_name_first_and_match_the_whole_response(client):
    kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    whole = _chat(client, **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _chat(client, stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.function.name  # the first delta names the call
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w.function.name, w.function.arguments) for w in whole]


def test_tool_results_round_trip(client):
    first = _chat(client, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = _chat(client, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0)
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > first.usage.prompt_tokens


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=130)

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                     max_tokens=48, max_retries=0)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
    assert isinstance(forced.tool_calls[0]["args"]["city"], str)
    free = llm.bind_tools([get_weather]).invoke("Weather in Oslo?")  # tool_choice auto
    assert free.tool_calls or free.content
    person = llm.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    via_tools = llm.with_structured_output(Person, method="function_calling").invoke("Invent a person.")
    assert isinstance(via_tools, Person)
