"""Tool calling and structured-output requests: plans, schemas, output parsers, the template."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.openai_schemas import chat_tool_plan, parse_chat_request, parse_completion_request, to_generate_requests
from gateway.tool_calls.parsers import HermesParser, Llama3JsonParser, NamedCallParser, RequiredCallsParser
from gateway.tool_calls.wire_format import delta_dicts
from gateway.tool_calls.tool_request import plan_tools
from protocol.structured_output import StructuredOutput, json_schema_output

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _run(parser, text: str, step: int) -> tuple[str, list[dict], list[tuple[str, str]]]:
    """Feed `text` in pieces of `step` characters; rebuild calls from the deltas as a client does."""
    content, calls = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    outs = [parser.feed(p) for p in pieces] + [parser.finish()]
    for out in outs:
        content += out.content
        for d in delta_dicts(out.deltas):
            if "id" in d:
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["name"]
                calls.append({"name": d["function"]["name"], "arguments": ""})
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls, [(c.name, c.arguments) for c in parser.calls]


HERMES_TEXT = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}\\" x", '
               '"days": [1, {"a": "]"}]}}\n</tool_call>\n<tool_call>{"arguments": {}, "name": "get_time"}'
               '</tool_call>')
CASES = [
    (HermesParser, HERMES_TEXT, "Let me check.\n",
     [("get_weather", '{"city": "Paris \\"}\\" x", "days": [1, {"a": "]"}]}'), ("get_time", "{}")]),
    (HermesParser, "no call here, just <tool text", "no call here, just <tool text", []),
    (HermesParser, "a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),
    (HermesParser, 'cut <tool_call>{"name": 3', 'cut <tool_call>{"name": 3', []),
    (RequiredCallsParser, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
     '{"name": "get_time", "parameters": {}}]', "",
     [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]),
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
     '{"name": "get_time", "parameters": {}}', "",
     [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")]),
    (Llama3JsonParser, "The answer is 4.", "The answer is 4.", []),
    (Llama3JsonParser, '{"answer": 4}', '{"answer": 4}', []),
    (lambda: NamedCallParser("get_weather"), '{"city": "Lima"}', "", [("get_weather", '{"city": "Lima"}')]),
]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize("make, text, content, calls", CASES)
def test_parsers_stream_the_same_calls_at_any_split(make, text, content, calls, step):
    got_content, streamed, finished = _run(make(), text, step)
    assert got_content == content
    assert finished == calls
    assert [(c["name"], c["arguments"]) for c in streamed] == calls  # what a client rebuilds
    for _, arguments in calls:
        json.loads(arguments)


def test_a_call_streams_its_name_before_its_arguments_are_complete():
    parser = HermesParser()
    first = parser.feed('<tool_call>{"name": "get_weather", "arguments": {"ci')
    assert [(d.name, d.arguments) for d in first.deltas] == [("get_weather", '{"ci')]
    more = parser.feed('ty": "Paris"}}</tool_call>')
    assert [(d.name, d.arguments) for d in more.deltas] == [(None, 'ty": "Paris"}')]


def test_required_schema_accepts_one_of_the_tools_and_parallel_limits_it():
    plan = plan_tools([WEATHER, TIME], "required", None)
    assert plan.mode == "required"
    schema = json.loads(plan.structured.source)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    names = [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    single = json.loads(plan_tools([WEATHER], "required", False).structured.source)
    assert single["maxItems"] == 1 and single["items"]["properties"]["name"] == {"const": "get_weather"}


def test_named_choice_generates_the_functions_arguments():
    plan = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, True)
    assert plan.mode == "named" and plan.function_name == "get_weather"
    assert plan.structured == json_schema_output(WEATHER["function"]["parameters"])
    assert plan_tools([WEATHER], None, None).mode == "auto"
    assert plan_tools([WEATHER], "auto", None).structured is None
    assert plan_tools([WEATHER], "none", None).reads_calls is False  # tools still in the prompt
    assert plan_tools(None, None, None) is None and plan_tools(None, "none", None) is None


def _build(body: dict[str, Any], chat: bool = True):
    raw = json.dumps({"model": "m", **body}).encode()
    req = parse_chat_request(raw) if chat else parse_completion_request(raw)
    return to_generate_requests(req, "r", 0.0, "m", chat_tool_plan(req))[0]


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fields, spec", [
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "strict": True, "schema": {"type": "object"}}}},
     json_schema_output({"type": "object"})),
    ({"structured_outputs": {"json": {"type": "integer"}}}, json_schema_output({"type": "integer"})),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput("regex", "[a-z]+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutput("choice", '["a", "b"]')),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutput("grammar", 'root ::= "x"')),
    ({"guided_json": '{"type": "integer"}'}, json_schema_output({"type": "integer"})),
    ({"guided_regex": "[0-9]"}, StructuredOutput("regex", "[0-9]")),
    ({"guided_choice": ["y", "n"]}, StructuredOutput("choice", '["y", "n"]')),
    ({"guided_grammar": 'start: "x"'}, StructuredOutput("grammar", 'start: "x"')),
    ({"response_format": {"type": "text"}}, None),
])
@pytest.mark.parametrize("chat", [True, False])
def test_every_structured_output_spelling(fields, spec, chat):
    body = {"messages": USER} if chat else {"prompt": "hi"}
    assert _build({**body, **fields}, chat).params.structured == spec


def test_tools_reach_the_template_and_history_arguments_become_objects():
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
    ]
    gen = _build({"messages": messages, "tools": [WEATHER], "tool_choice": "required"})
    assert gen.tools == [WEATHER]
    assert gen.params.structured is not None
    assert gen.messages[1] == {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert gen.messages[2] == {"role": "tool", "content": "20 C", "tool_call_id": "call_1"}


def test_history_round_trips_through_the_bundled_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.tools_template() is not None  # SmolLM2's own template ignores tools
    gen = _build({"messages": USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20 C"}], "tools": [WEATHER]})
    text = tok.hf_tokenizer.decode(tok.apply_chat_template(gen.messages, gen.tools))
    assert '"name": "get_weather", "description": "Current weather"' in text  # the tool is offered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n20 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    content, _, calls = _run(HermesParser(), text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0], 3)
    assert calls == [("get_weather", '{"city": "Paris"}')]  # what the template writes, the parser reads
