"""check_stop: one table row per rule (EOS, ignore_eos, stop tokens, min_tokens, max_tokens, context)."""

from __future__ import annotations

import pytest

from protocol.messages import FinishReason
from protocol.sampling import SamplingParams
from scheduler_svc.stop_checker import check_stop

EOS = [2, 3]
MAX_LEN = 50
STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH

# (case, last token, output tokens, all tokens, params, expected (reason, stop token id))
CASES: list[tuple[str, int, int, int, SamplingParams, tuple[FinishReason | None, int | None]]] = [
    ("plain token goes on", 9, 1, 11, SamplingParams(), (None, None)),
    ("first eos id stops", 2, 1, 11, SamplingParams(), (STOP, None)),
    ("second eos id stops", 3, 4, 14, SamplingParams(), (STOP, None)),
    ("eos ignored with ignore_eos", 2, 1, 11, SamplingParams(ignore_eos=True), (None, None)),
    ("ignore_eos still ends at max_tokens", 2, 16, 26, SamplingParams(ignore_eos=True),
     (LENGTH, None)),
    ("stop token reports its id", 7, 1, 11, SamplingParams(stop_token_ids=[7, 8]), (STOP, 7)),
    ("second stop token", 8, 1, 11, SamplingParams(stop_token_ids=[7, 8]), (STOP, 8)),
    ("stop token works with ignore_eos", 7, 1, 11,
     SamplingParams(stop_token_ids=[7], ignore_eos=True), (STOP, 7)),
    ("eos that is also a stop token: eos wins", 2, 1, 11, SamplingParams(stop_token_ids=[2]), (STOP, None)),
    ("eos before min_tokens goes on", 2, 2, 12, SamplingParams(min_tokens=3), (None, None)),
    ("eos at min_tokens stops", 2, 3, 13, SamplingParams(min_tokens=3), (STOP, None)),
    ("stop token before min_tokens goes on", 7, 2, 12,
     SamplingParams(min_tokens=3, stop_token_ids=[7]), (None, None)),
    ("stop token at min_tokens stops", 7, 3, 13,
     SamplingParams(min_tokens=3, stop_token_ids=[7]), (STOP, 7)),
    ("one short of max_tokens goes on", 9, 3, 13, SamplingParams(max_tokens=4), (None, None)),
    ("max_tokens reached", 9, 4, 14, SamplingParams(max_tokens=4), (LENGTH, None)),
    ("eos on the last allowed token is a stop", 2, 4, 14, SamplingParams(max_tokens=4), (STOP, None)),
    ("min_tokens == max_tokens ends by length", 9, 4, 14,
     SamplingParams(max_tokens=4, min_tokens=4), (LENGTH, None)),
    ("one short of the context goes on", 9, 5, MAX_LEN - 1, SamplingParams(max_tokens=100), (None, None)),
    ("context full", 9, 6, MAX_LEN, SamplingParams(max_tokens=100), (LENGTH, None)),
    ("context full under min_tokens", 2, 6, MAX_LEN,
     SamplingParams(max_tokens=100, min_tokens=50), (LENGTH, None)),
]


@pytest.mark.parametrize(
    "last_token, num_output, num_tokens, params, expected",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_check_stop(
    last_token: int,
    num_output: int,
    num_tokens: int,
    params: SamplingParams,
    expected: tuple[FinishReason | None, int | None],
) -> None:
    assert check_stop(last_token, num_output, num_tokens, params, EOS, MAX_LEN) == expected


def test_no_eos_ids_means_no_eos_stop() -> None:
    assert check_stop(2, 1, 11, SamplingParams(), [], MAX_LEN) == (None, None)
