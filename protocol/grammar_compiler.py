"""Structured outputs compiled against one model's vocabulary (llguidance), cached by source.

The gateway's check (`check_structured_output`) has no vocabulary, so it cannot see a grammar
that names a special token the model lacks (`<|no_such_token|>`) or a token id past its
vocabulary (`<[99999]>`): llguidance rejects those only when it compiles with the tokenizer.
The tokenizer stage therefore compiles every structured request here before queueing it (a
failure is the client's 400), and the worker compiles here to make its matchers, so both run
exactly the same code on the same vocabulary and EOS ids. Each (spec, EOS ids) pair is
compiled once (LRU, failures included), which keeps compiling off both hot paths; the
llguidance tokenizer (the vocabulary's bytes and a token trie, ~0.5 s) is built on the first
structured request. Thread-safe: the worker compiles on its mask thread, the tokenizer stage
on its executor threads. No torch: tokenizer processes import this.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protocol.structured_output import StructuredOutput, StructuredOutputError, grammar_text

log = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256
MAX_ERROR_CHARS = 400  # llguidance lists every special token after "unknown special token"


class GrammarCompiler:
    """Compiles specs for one vocabulary: `compiled` gives a matcher at the grammar's start
    (callers deep-copy it), `check` only says whether it compiles."""

    def __init__(self, load_hf_tokenizer: Callable[[], Any], vocab_size: int, name: str = "",
                 cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.name = name
        self._load_hf_tokenizer = load_hf_tokenizer
        self._hf_tokenizer: Any = None
        self._tokenizers: dict[tuple[int, ...], object] = {}
        self._cache: OrderedDict[tuple, object] = OrderedDict()  # matcher, or the error's text
        self._lock = threading.Lock()
        self.compile_seconds: list[float] = []  # cache misses, for benchmarks and logs

    @classmethod
    def for_dir(cls, hf_dir: Path | str, vocab_size: int,
                cache_size: int = GRAMMAR_CACHE_SIZE) -> GrammarCompiler:
        """A compiler that loads the tokenizer of a Hugging Face directory when first needed."""
        def load() -> Any:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(hf_dir))

        return cls(load, vocab_size, Path(hf_dir).name, cache_size)

    def check(self, spec: StructuredOutput, eos_ids: Sequence[int]) -> None:
        """Raise StructuredOutputError if `spec` does not compile for this vocabulary."""
        self.compiled(spec, eos_ids)

    def compiled(self, spec: StructuredOutput, eos_ids: Sequence[int]):
        """The cached matcher for `spec` at its start; StructuredOutputError if it cannot be."""
        key = (spec.cache_key, tuple(eos_ids))
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                hit = self._cache[key] = self._compile(spec, key[1])
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if isinstance(hit, str):
            raise StructuredOutputError(hit)
        return hit

    def _compile(self, spec: StructuredOutput, eos: tuple[int, ...]):
        import llguidance

        try:
            grammar = grammar_text(spec)
        except StructuredOutputError as exc:
            return str(exc)
        tokenizer = self._tokenizer(eos)
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.compile_seconds.append(time.perf_counter() - start)
        if matcher.is_error():
            return vocabulary_error(spec, matcher.get_error())
        return matcher

    def _tokenizer(self, eos: tuple[int, ...]):
        tokenizer = self._tokenizers.get(eos)
        if tokenizer is None:
            import llguidance.hf

            start = time.perf_counter()
            if self._hf_tokenizer is None:
                self._hf_tokenizer = self._load_hf_tokenizer()
            tokenizer = self._tokenizers[eos] = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(eos) or None)
            log.info("grammar tokenizer for %s (EOS %s) built in %.2f s", self.name or "the model",
                     list(eos), time.perf_counter() - start)
        return tokenizer


def vocabulary_error(spec: StructuredOutput, error: str) -> str:
    """The client's message for a spec llguidance rejects with the model's vocabulary."""
    error = " ".join(error.split())
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "..."
    return f"the {spec.kind} cannot be used with this model's vocabulary: {error}"
