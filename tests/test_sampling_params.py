"""SamplingParams.validate: defaults and boundaries pass, each out-of-range field is named."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol.sampling import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams, SamplingParamsError
from protocol.structured_output import StructuredOutput

NAN = float("nan")
INF = float("inf")


def params(**fields: Any) -> SamplingParams:
    return msgspec.structs.replace(SamplingParams(), **fields)


def test_defaults_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams().validate(vocab_size=1)


ACCEPTED: list[dict[str, Any]] = [
    {"max_tokens": 1},
    {"max_tokens": 1_000_000},
    {"temperature": 0.0},
    {"temperature": 2.0},
    {"temperature": 1},  # an int is a number
    {"top_p": 1e-9},
    {"top_p": 1.0},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 50_000},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"repetition_penalty": 1e-6},
    {"repetition_penalty": 10.0},
    {"presence_penalty": -2.0},
    {"presence_penalty": 2.0},
    {"frequency_penalty": -2.0},
    {"frequency_penalty": 2.0},
    {"seed": None},
    {"seed": -(2**63)},
    {"seed": 2**63 - 1},
    {"min_tokens": 0},
    {"min_tokens": 16, "max_tokens": 16},
    {"stop_token_ids": [0, 5, 10**9]},
    {"logprobs": None},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
    {"stop": ["x"] * MAX_STOP_STRINGS},
    {"stop": []},
    {"ignore_eos": True, "include_stop_str_in_output": True, "skip_special_tokens": False},
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_accepts_boundary_values(fields: dict[str, Any]) -> None:
    params(**fields).validate()


REJECTED: list[tuple[str, dict[str, Any]]] = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("max_tokens", {"max_tokens": True}),
    ("temperature", {"temperature": -0.01}),
    ("temperature", {"temperature": 2.01}),
    ("temperature", {"temperature": NAN}),
    ("temperature", {"temperature": INF}),
    ("temperature", {"temperature": "hot"}),
    ("temperature", {"temperature": False}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": NAN}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 3.0}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": 10.5}),
    ("presence_penalty", {"presence_penalty": -2.1}),
    ("presence_penalty", {"presence_penalty": 2.1}),
    ("frequency_penalty", {"frequency_penalty": -2.1}),
    ("frequency_penalty", {"frequency_penalty": 2.1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": -(2**63) - 1}),
    ("seed", {"seed": "42"}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 17, "max_tokens": 16}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": [1, "2"]}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": MAX_LOGPROBS + 1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": MAX_LOGPROBS + 1}),
    ("stop", {"stop": ["x"] * (MAX_STOP_STRINGS + 1)}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["ok", 5]}),
    ("structured", {"structured": StructuredOutput("xml", "<a/>")}),
]


@pytest.mark.parametrize(
    "param, fields", REJECTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REJECTED)]
)
def test_rejects_out_of_range_field(param: str, fields: dict[str, Any]) -> None:
    with pytest.raises(SamplingParamsError) as info:
        params(**fields).validate()
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ")
    assert isinstance(info.value, ValueError)


def test_every_validated_field_has_a_rejection_case() -> None:
    bounded = {f for f in SamplingParams.__struct_fields__} - {
        "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "echo",
    }
    assert {p for p, _ in REJECTED} == bounded


def test_stop_token_ids_bounded_by_vocab_size() -> None:
    p = params(stop_token_ids=[0, 99])
    p.validate()  # no vocabulary known: only the lower bound applies
    p.validate(vocab_size=100)
    with pytest.raises(SamplingParamsError) as info:
        p.validate(vocab_size=99)
    assert info.value.param == "stop_token_ids"
    assert "<= 98" in str(info.value)


def test_greedy_is_temperature_zero() -> None:
    assert params(temperature=0.0).greedy
    assert not params(temperature=0.01).greedy
