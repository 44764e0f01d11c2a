"""Per-sequence grammar matchers (llguidance), started from the compiler's cached grammars.

A matcher's state is a pure function of the output tokens it has consumed, so the worker never
ships it anywhere: a sequence the worker meets as a `NewSeq` (first scheduling, recompute after
preemption, migration, the decode side of a disaggregated request) gets a fresh matcher that
`sync` replays over the outputs generated so far, and the next token is sampled under exactly
the state the previous worker had. `sync` also catches up with tokens appended since the last
mask, so the matcher never has to be advanced in lockstep with the runner.

EOS is allowed only where the grammar accepts (llguidance marks the tokenizer's EOS ids, which
are the sequence's own), and once the grammar is complete EOS is the only token allowed, so a
finished structure ends the request with finish_reason "stop". A grammar that does not compile
for the vocabulary (the tokenizer stage rejects those with a 400; this is defence in depth) or a
matcher that reaches an error is `failed`: its row allows only EOS so the step can still sample
it harmlessly, and the step reports the request's `error`, which the scheduler turns into an
error the client sees. Nothing else in the batch is affected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from protocol.grammar_compiler import GrammarCompiler
from protocol.structured_output import StructuredOutput, StructuredOutputError

log = logging.getLogger(__name__)


class SeqGrammar:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher, eos_ids: Sequence[int], error: str = "") -> None:
        self.matcher = matcher
        self.eos_ids = list(eos_ids)
        self.num_consumed = 0
        self.error = error

    @classmethod
    def start(cls, compiler: GrammarCompiler, spec: StructuredOutput, eos_ids: Sequence[int]) -> SeqGrammar:
        """A fresh matcher at the grammar's start (a copy of the cached compiled one), or a
        failed SeqGrammar that says why there is none."""
        try:
            template = compiler.compiled(spec, eos_ids)
        except StructuredOutputError as exc:
            log.warning("structured output %s does not compile: %s", spec.kind, exc)
            return cls(None, eos_ids, f"the structured output cannot be compiled: {exc}")
        return cls(template.deep_copy(), eos_ids)

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.matcher is None or self.matcher.is_error()

    def fail(self, error: str) -> None:
        if not self.error:
            self.error = error or "the grammar matcher failed"
            log.warning("structured output failed: %s", self.error)

    def sync(self, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """Consume the outputs (token_ids past the prompt) not yet consumed: the whole output
        after a move (replay), the last sampled token otherwise."""
        num_outputs = len(token_ids) - num_prompt_tokens
        if self.num_consumed >= num_outputs or self.failed:
            self.num_consumed = max(self.num_consumed, num_outputs)
            return
        pending = list(token_ids[num_prompt_tokens + self.num_consumed:])
        self.num_consumed = num_outputs
        consumed = self.matcher.try_consume_tokens(pending)
        # Past a stop (EOS ended the output) come only tokens of steps launched before that EOS
        # was read back (overlapped or pipelined steps); the scheduler drops them.
        if consumed < len(pending) and not self.matcher.is_stopped():
            self.fail("the output does not match the grammar: "
                      + (self.matcher.get_error() or f"tokens {pending[consumed:consumed + 8]} were refused"))

    def fill(self, row: np.ndarray) -> None:
        """Write the next token's allowed set into `row` (int32 words): the grammar's, or
        EOS alone once failed."""
        if not self.failed:
            self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            if not self.matcher.is_error():
                return
            self.fail(f"the grammar matcher failed: {self.matcher.get_error()}")
        self.fill_eos_only(row)

    def fill_eos_only(self, row: np.ndarray) -> None:
        row[:] = 0
        words = row.view(np.uint32)
        for tok in self.eos_ids:
            if 0 <= tok < row.size * 32:
                words[tok // 32] |= np.uint32(1 << (tok % 32))
