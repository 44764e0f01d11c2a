"""Completions `echo` and `prompt_logprobs` (gateway.prompt_echo), and seeds of n > 1 choices."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gateway.openai_schemas import parse_chat_request, parse_completion_request, to_generate_requests
from gateway.prompt_echo import EchoSpec
from gateway.responses import ChoiceResult, completion_body
from protocol.messages import PromptOutput, TextDelta, TokenLogprob, TopLogprob

MODEL = "m"


def build(chat: bool, **fields: Any):
    body = {"model": MODEL, **fields}
    body.setdefault("messages" if chat else "prompt", [{"role": "user", "content": "hi"}] if chat else "Hi there")
    parse = parse_chat_request if chat else parse_completion_request
    parsed = parse(json.dumps(body).encode())
    return parsed, to_generate_requests(parsed, "r", 0.0, MODEL)


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    _, [g] = build(False, echo=True, logprobs=2, max_tokens=1)
    assert (g.params.echo, g.params.prompt_logprobs, g.params.logprobs, g.params.max_tokens) == (True, 2, 2, 1)
    _, [g] = build(False, echo=True)
    assert (g.params.echo, g.params.prompt_logprobs) == (True, None)
    _, [g] = build(False, echo=True, logprobs=1, prompt_logprobs=4)
    assert g.params.prompt_logprobs == 4  # the larger of the two: both views are cut from it


def test_echo_with_max_tokens_zero_runs_one_token():
    parsed, [g] = build(False, echo=True, max_tokens=0)
    assert g.params.max_tokens == 1
    spec = EchoSpec.of(parsed, False, ["Hi there"])
    assert spec is not None and spec.hide_output


def test_prompt_logprobs_on_both_endpoints_and_no_echo_on_chat():
    _, [g] = build(True, prompt_logprobs=3)
    assert (g.params.prompt_logprobs, g.params.echo) == (3, False)
    _, [g] = build(False, prompt_logprobs=0)
    assert (g.params.prompt_logprobs, g.params.echo) == (0, False)
    parsed, _ = build(False, max_tokens=3)
    assert EchoSpec.of(parsed, False, ["x"]) is None


def _token(text: str, tid: int, lp: float, rank: int, top: list[tuple[str, int, float]]) -> TokenLogprob:
    return TokenLogprob(text, lp, list(text.encode()), tid,
                        [TopLogprob(t, v, list(t.encode()), i) for t, i, v in top], rank)


PROMPT = PromptOutput(
    text="Hi there", first_token="Hi",
    logprobs=[_token(" there", 7, -2.5, 3, [(" you", 5, -0.5), (" all", 6, -1.0)])],
)


def _choice(spec: EchoSpec, output: list[TokenLogprob] | None, text: str = "!") -> dict[str, Any]:
    result = ChoiceResult(0)
    result.add(TextDelta("r", 0, text, [1], "length", logprobs=output, prompt=PROMPT))
    body = completion_body("cmpl-r", 0, MODEL, [result], {})
    choice = body["choices"][0]
    spec.completion_choice(choice, result.prompt, result.logprobs)
    return choice


def test_echo_body_prepends_prompt_text_and_logprobs():
    spec = EchoSpec(True, ["Hi there"], None, False, 1, logprobs=1)
    out = [_token("!", 1, -0.25, 1, [("!", 1, -0.25)])]
    choice = _choice(spec, out)
    assert choice["text"] == "Hi there!"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hi", " there", "!"]
    assert lp["token_logprobs"] == [None, -2.5, -0.25]
    assert lp["top_logprobs"] == [None, {" you": -0.5, " there": -2.5}, {"!": -0.25}]  # top 1 + the token
    assert lp["text_offset"] == [0, 2, 8]
    assert "prompt_logprobs" not in choice


def test_echo_of_a_token_prompt_uses_the_decoded_text():
    spec = EchoSpec(True, [None], None, False, 1)
    assert _choice(spec, None)["text"] == "Hi there!"


def test_max_tokens_zero_returns_the_prompt_only():
    spec = EchoSpec(True, ["Hi there"], None, True, 1, logprobs=0)
    choice = _choice(spec, [_token("!", 1, -0.25, 1, [])])
    assert choice["text"] == "Hi there"
    assert choice["logprobs"]["tokens"] == ["Hi", " there"]
    assert choice["logprobs"]["top_logprobs"] == [None, {" there": -2.5}]


def test_vllm_prompt_logprobs_field():
    spec = EchoSpec(False, ["Hi there"], 1, False, 1)
    choice = _choice(spec, None)
    assert choice["text"] == "!"
    assert choice["prompt_logprobs"] == [
        None,
        {"7": {"logprob": -2.5, "rank": 3, "decoded_token": " there"},
         "5": {"logprob": -0.5, "rank": 1, "decoded_token": " you"}},
    ]


def test_prompt_logprob_floor_for_minus_infinity():
    prompt = PromptOutput("a b", "a", [_token(" b", 2, -math.inf, 9, [])])
    spec = EchoSpec(False, [None], 0, False, 1)
    assert spec.vllm_prompt_logprobs(prompt) == [None, {"2": {"logprob": -9999.0, "rank": 9, "decoded_token": " b"}}]


@pytest.mark.parametrize("n,index,expected", [(2, 3, "second"), (1, 0, "first")])
def test_echo_text_of_each_prompt(n, index, expected):
    spec = EchoSpec(True, ["first", "second"], None, False, n)
    assert spec.echo_text(index, PROMPT) == expected


def test_choice_seeds_are_seed_plus_index_in_int64():
    from protocol.messages import choice_seed
    from protocol.sampling import SamplingParams
    from tokenizer_svc.tokenizer_worker import _choice_params

    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(None, 2) is None
    assert choice_seed(2**63 - 1, 1) == -(2**63)  # wraps instead of overflowing msgpack's int64
    params = SamplingParams(seed=100)
    assert _choice_params(params, 0) is params and _choice_params(params, 3).seed == 103
    assert _choice_params(SamplingParams(), 3).seed is None
