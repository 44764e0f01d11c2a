"""Per-sequence grammar matchers (llguidance) and the compiler that makes them, cached by source.

A matcher's state is a pure function of the output tokens it has consumed, so the worker never
ships it anywhere: a sequence the worker meets as a `NewSeq` (first scheduling, recompute after
preemption, migration, the decode side of a disaggregated request) gets a fresh matcher that
`sync` replays over the outputs generated so far, and the next token is sampled under exactly
the state the previous worker had. `sync` also catches up with tokens appended since the last
mask, so the matcher never has to be advanced in lockstep with the runner.

EOS is allowed only where the grammar accepts (llguidance marks the tokenizer's EOS ids, which
are the sequence's own), and once the grammar is complete EOS is the only token allowed, so a
finished structure ends the request with finish_reason "stop". A matcher that reaches an error
(it cannot by sampling under its own mask; a grammar that fails to compile against the
vocabulary can) allows only EOS, so the request ends at once instead of failing the whole step;
the log says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protocol.structured_output import StructuredOutput, StructuredOutputError, grammar_text

log = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256


class SeqGrammar:
    """One sequence's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher, eos_ids: Sequence[int], error: str = "") -> None:
        self.matcher = matcher
        self.eos_ids = list(eos_ids)
        self.num_consumed = 0
        self.error = error

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.matcher is None or self.matcher.is_error()

    def sync(self, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """Consume the outputs (token_ids past the prompt) not yet consumed: the whole output
        after a move (replay), the last sampled token otherwise."""
        num_outputs = len(token_ids) - num_prompt_tokens
        if self.num_consumed >= num_outputs or self.failed:
            self.num_consumed = max(self.num_consumed, num_outputs)
            return
        pending = list(token_ids[num_prompt_tokens + self.num_consumed:])
        self.num_consumed = num_outputs
        if not self.matcher.consume_tokens(pending):
            self.error = self.matcher.get_error() or "the output does not match the grammar"

    def fill(self, row: np.ndarray) -> None:
        """Write the next token's allowed set into `row` (int32 words)."""
        if not self.failed:
            self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            if not self.matcher.is_error():
                return
            self.error = self.matcher.get_error()
        row[:] = 0
        words = row.view(np.uint32)
        for tok in self.eos_ids:
            if 0 <= tok < row.size * 32:
                words[tok // 32] |= np.uint32(1 << (tok % 32))


class GrammarCompiler:
    """Compiles specs into matchers for one model's vocabulary; each source once (LRU cache).

    The llguidance tokenizer (the vocabulary's bytes and a token trie, ~0.5 s to build) is made
    on the first structured request, one per set of EOS ids. Compiling is thread-safe: the
    worker compiles on the mask thread while the model's forward runs.
    """

    def __init__(self, hf_dir: Path | str, vocab_size: int, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.hf_dir = Path(hf_dir)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._hf_tokenizer = None
        self._tokenizers: dict[tuple[int, ...], object] = {}
        self._matchers: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.compile_seconds: list[float] = []  # cache misses, for benchmarks and logs

    def seq_grammar(self, spec: StructuredOutput, eos_ids: Sequence[int]) -> SeqGrammar:
        """A fresh matcher at the grammar's start (a copy of the cached compiled one)."""
        try:
            template = self._compiled(spec, tuple(eos_ids))
        except StructuredOutputError as exc:
            log.warning("structured output %s does not compile: %s", spec.kind, exc)
            return SeqGrammar(None, eos_ids, str(exc))
        return SeqGrammar(template.deep_copy(), eos_ids)

    def _compiled(self, spec: StructuredOutput, eos: tuple[int, ...]):
        import llguidance

        key = (spec.cache_key, eos)
        with self._lock:
            hit = self._matchers.get(key)
            if hit is not None:
                self._matchers.move_to_end(key)
                return hit
            tokenizer = self._tokenizer(eos)
            start = time.perf_counter()
            matcher = llguidance.LLMatcher(tokenizer, grammar_text(spec), log_level=0)
            self.compile_seconds.append(time.perf_counter() - start)
            if matcher.is_error():
                raise StructuredOutputError(matcher.get_error())
            self._matchers[key] = matcher
            if len(self._matchers) > self.cache_size:
                self._matchers.popitem(last=False)
            return matcher

    def _tokenizer(self, eos: tuple[int, ...]):
        tokenizer = self._tokenizers.get(eos)
        if tokenizer is None:
            import llguidance.hf
            from transformers import AutoTokenizer

            start = time.perf_counter()
            if self._hf_tokenizer is None:
                self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.hf_dir))
            tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(eos) or None)
            self._tokenizers[eos] = tokenizer
            log.info("grammar tokenizer for %s (EOS %s) built in %.2f s", self.hf_dir.name,
                     list(eos), time.perf_counter() - start)
        return tokenizer
