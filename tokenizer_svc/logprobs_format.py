"""Logprob rows from the engine (numpy arrays) as the protocol's TokenLogprob lists.

A token's text is what it reads as on its own: convert_ids_to_tokens + convert_tokens_to_string,
so byte-level "Ġthe" renders as " the" and sentencepiece "▁the" as " the". Its `bytes` are the
UTF-8 bytes of that text, except for tokens that hold part of a character (byte-fallback
"<0xE2>", or a byte-level token cut inside a character), whose text is U+FFFD: those get the
raw byte values, so a client can glue them back together.
"""

from __future__ import annotations

from typing import Any

from protocol.messages import TokenLogprob, TokenLogprobs, TopLogprob
from tokenizer_svc.incremental_detok import REPLACEMENT_CHAR, hf_tokenizer_of

METASPACE = "\u2581"  # "▁", sentencepiece's word-boundary mark


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: the printable character standing for each byte.

    Bytes that are printable (and not a space) stand for themselves; the others are shifted
    to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    char_of = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in char_of.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _raw_bytes(token: str) -> list[int] | None:
    """The bytes a token holds when its text alone is not valid UTF-8; None if unknown."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return [int(token[3:5], 16)]
        except ValueError:
            return None
    if token and all(c in _BYTE_OF_CHAR for c in token):
        return [_BYTE_OF_CHAR[c] for c in token]
    return None


class TokenTexts:
    """Text and bytes per token id, cached: the same few thousand ids come up again and again."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = hf_tokenizer_of(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token; ("", []) for an id the tokenizer does not know."""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._render(token_id)
        return cached

    def _render(self, token_id: int) -> tuple[str, list[int]]:
        token = self._tok.convert_ids_to_tokens(token_id)
        if token is None:
            return "", []
        text = self._tok.convert_tokens_to_string([token])
        if token.startswith(METASPACE) and not text.startswith(" "):
            text = " " + text  # sentencepiece decoders strip the space of a sequence's first token
        if REPLACEMENT_CHAR in text:
            raw = _raw_bytes(token)
            if raw is not None:
                return text, raw
        return text, list(text.encode("utf-8"))


def format_logprobs(rows: TokenLogprobs, num_top: int, texts: TokenTexts) -> list[TokenLogprob]:
    """One TokenLogprob per row: the sampled token, then its `num_top` best alternatives
    (fewer if the engine sent fewer), highest logprob first."""
    token_ids = rows.token_ids.tolist()
    logprobs = rows.logprobs.tolist()
    result: list[TokenLogprob] = []
    for ids, lps in zip(token_ids, logprobs):
        top: list[TopLogprob] = []
        if num_top > 0:
            candidates = sorted(zip(ids[1 : num_top + 1], lps[1 : num_top + 1]), key=lambda c: -c[1])
            for tid, lp in candidates:
                text, raw = texts.get(int(tid))
                top.append(TopLogprob(token=text, logprob=float(lp), bytes=raw, token_id=int(tid)))
        text, raw = texts.get(int(ids[0]))
        result.append(
            TokenLogprob(token=text, logprob=float(lps[0]), bytes=raw, token_id=int(ids[0]), top=top)
        )
    return result
