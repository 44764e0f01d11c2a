"""Streaming detokenization: turn output token ids into new text, a few tokens at a time.

Decoding the whole output after every token costs O(n) per token, and decoding each token on
its own is wrong: sentencepiece decoders drop the leading space of the first token they see,
and one character may be split over several byte tokens. So we decode a small sliding window
(the prefix/read-offset technique): ids[prefix:read] were already emitted and only give
context, ids[read:] are new. The new text is decode(ids[prefix:]) minus decode(ids[prefix:read]);
both decodes start at the same token, so any first-token quirk cancels out.

What a stream emits in total (the contract the tests check): decode(tail + out) minus
decode(tail), where tail is the prompt tail without leading tokens that start inside a
character (and, if the prompt ends inside a character, without those last bytes: the output's
first text then completes that character), decoded without
`clean_up_tokenization_spaces` (a lossy, non-local rewrite that cannot be streamed), and with
any U+FFFD that a dangling, never-finished byte sequence at the very end would produce dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8


def hf_tokenizer_of(tokenizer: Any) -> Any:
    """The transformers tokenizer behind our Tokenizer wrapper, or the argument itself."""
    return getattr(tokenizer, "hf_tokenizer", tokenizer)


def special_token_ids(hf_tokenizer: Any) -> frozenset[int]:
    """Ids that `skip_special_tokens=True` removes before decoding."""
    return frozenset(i for i, tok in hf_tokenizer.added_tokens_decoder.items() if tok.special)


class IncrementalDetokenizer:
    """Detokenizes one output stream; `add` returns only the text that is new and final."""

    def __init__(self, tokenizer: Any, prompt_tail_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tok = hf_tokenizer_of(tokenizer)
        self._skip = skip_special_tokens
        self._skipped = special_token_ids(self._tok) if skip_special_tokens else frozenset()
        ids = [int(i) for i in prompt_tail_ids]
        # The window must start on a character boundary: a tail cut inside a character decodes
        # to a leading U+FFFD, which is no context at all.
        while ids and self._decode(ids).startswith(REPLACEMENT_CHAR):
            ids.pop(0)
        read = len(ids)
        # A prompt that ends inside a character: its last bytes are read again with the output,
        # so the character the output completes is emitted whole (at most 3 tokens: 4-byte UTF-8).
        if ids and self._decode(ids).endswith(REPLACEMENT_CHAR):
            for cut in range(len(ids) - 1, max(len(ids) - 4, -1), -1):
                if not self._decode(ids[:cut]).endswith(REPLACEMENT_CHAR):
                    read = cut
                    break
        self._ids: list[int] = ids
        self._prefix = 0  # start of the context window
        self._read = read  # ids before this are already emitted
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose text is held back (an unfinished character at the end)."""
        return len(self._ids) - self._read

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete (may be "" while held back)."""
        self._ids.extend(int(i) for i in token_ids)
        if self._read == len(self._ids):
            return ""
        prefix_text, full_text = self._window_texts()
        if full_text.endswith(REPLACEMENT_CHAR):
            return ""  # an unfinished UTF-8 sequence: wait for the bytes that complete it
        self._advance()
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back, at the end of the stream; a dangling partial character is
        dropped rather than emitted as U+FFFD."""
        if self._read == len(self._ids):
            return ""
        prefix_text, full_text = self._window_texts()
        self._advance()
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)

    def _window_texts(self) -> tuple[str, str]:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return self._prefix_text, self._decode(self._ids[self._prefix :])

    def _advance(self) -> None:
        """Everything up to the end is emitted: the newly read tokens become the context."""
        newly_read = self._ids[self._read :]
        # Keep the old context while the new tokens are all skipped specials: a window whose
        # context decodes to nothing would let a sentencepiece decoder strip a real space.
        if any(i not in self._skipped for i in newly_read):
            self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = None
        # Drop ids that no window can reach again, so memory stays bounded on long outputs.
        if self._prefix > 1024:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)
