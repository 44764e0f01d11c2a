"""Per-request sampling parameters and their validation.

One struct travels from the tokenizer to the scheduler, the worker and the detokenizer, so every
stage reads the same values. `validate` is pure and raises `SamplingParamsError` naming the
offending field, which the gateway turns into a 400 and `pdserve generate` into a per-line error.
"""

from __future__ import annotations

import msgspec

from protocol.structured_output import KINDS as STRUCTURED_KINDS, StructuredOutput

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What to generate. Field order is the wire order: append new fields last, with defaults."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    stop: list[str] = []  # stop strings, matched by the detokenizer
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # The prompt tokens' logprobs (each with its top k alternatives), computed in the prefill;
    # prompt-cache hits are not used for such a request, since cached tokens have no logits.
    prompt_logprobs: int | None = None
    echo: bool = False  # /v1/completions: the detokenizer returns the prompt's text too
    structured: StructuredOutput | None = None  # grammar the output must match (the worker masks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError on the first out-of-range field."""
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature, lo=0.0, hi=2.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=-1)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=10.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**63 - 1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for tid in self.stop_token_ids:
            _check_int("stop_token_ids", tid, lo=0, hi=None if vocab_size is None else vocab_size - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", "stop strings must be non-empty strings")
        if self.structured is not None:
            if self.structured.kind not in STRUCTURED_KINDS:
                raise SamplingParamsError("structured", f"unknown kind {self.structured.kind!r}")
            # The grammar decides when EOS may come: EOS must neither be ignored nor banned.
            if self.ignore_eos:
                raise SamplingParamsError("ignore_eos", "cannot be combined with structured output")
            if self.min_tokens:
                raise SamplingParamsError("min_tokens", "cannot be combined with structured output")


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise SamplingParamsError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise SamplingParamsError(name, f"must be <= {hi}, got {value}")


def _check_float(
    name: str, value: object, lo: float, hi: float, lo_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    if value != value:  # NaN
        raise SamplingParamsError(name, "must not be NaN")
    if (value <= lo if lo_open else value < lo) or value > hi:
        bracket = "(" if lo_open else "["
        raise SamplingParamsError(name, f"must be in {bracket}{lo}, {hi}], got {value}")
