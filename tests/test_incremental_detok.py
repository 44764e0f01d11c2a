"""IncrementalDetokenizer against full decoding, for byte-level BPE and sentencepiece-style
tokenizers (toy ones trained here, and the bundled SmolLM2).

The contract: all `add` results plus `flush` equal decode(tail + out) minus decode(tail), with a
trailing U+FFFD from a never-finished character dropped; and no piece holds a U+FFFD that the
full text does not.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.toy_tokenizers import train_byte_level
from tokenizer_svc.incremental_detok import REPLACEMENT_CHAR, IncrementalDetokenizer, hf_tokenizer_of

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, café naïve résumé, señor!",
    "hello world hello there, say hello again",
    "numbers 12345 and symbols #$% (parens)",
] * 20
TEXT = "Say: Héllo wörld 😀 中文 café, naïve 🎉!"
NON_ASCII_CHARS = ["é", "ö", "ñ", "ß", "€", "中", "文", "😀", "🎉", "ü"]


def train_sentencepiece_style(decoder: str) -> PreTrainedTokenizerFast:
    """A Llama-style BPE: "▁" word boundaries, and byte-fallback tokens <0x00>..<0xFF> for any
    character outside the (ASCII plus a few accents) vocabulary."""
    raw = RawTokenizer(models.BPE(byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    raw.train_from_iterator(CORPUS, trainer)
    state = json.loads(raw.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):  # ordinary (not special) vocabulary entries, as in Llama's tokenizer
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    raw = RawTokenizer.from_str(json.dumps(state))
    if decoder == "llama":  # Replace, ByteFallback, Fuse, then Strip one leading space
        raw.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:  # the Metaspace decoder, which drops the space of the first token it sees
        raw.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def char_ids(spm: PreTrainedTokenizerFast, char: str) -> list[int]:
    """The ids of one character, without the word-start "▁" the pre-tokenizer puts first."""
    ids = spm.encode(char, add_special_tokens=False)
    return ids[1:] if spm.convert_ids_to_tokens(ids[0]) == "▁" else ids


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return train_byte_level(CORPUS)


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def spm(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return train_sentencepiece_style(request.param)


def decode(tok: Any, ids: Sequence[int], skip: bool) -> str:
    return hf_tokenizer_of(tok).decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def expected_text(tok: Any, tail: Sequence[int], out: Sequence[int], skip: bool) -> str:
    before, full = decode(tok, tail, skip), decode(tok, [*tail, *out], skip)
    assert full.startswith(before)
    return full[len(before) :].rstrip(REPLACEMENT_CHAR)


def stream(
    tok: Any, tail: Sequence[int], out: Sequence[int], skip: bool, rng: random.Random | None = None
) -> list[str]:
    """The pieces a stream emits, out fed one token at a time (or in random chunks), then flush."""
    detok = IncrementalDetokenizer(tok, tail, skip)
    pieces, i = [], 0
    while i < len(out):
        step = 1 if rng is None else rng.randint(1, 3)
        pieces.append(detok.add(out[i : i + step]))
        i += step
    pieces.append(detok.flush())
    return pieces


def check_stream(
    tok: Any, tail: Sequence[int], out: Sequence[int], skip: bool, rng: random.Random | None = None
) -> str:
    pieces = stream(tok, tail, out, skip, rng)
    want = expected_text(tok, tail, out, skip)
    assert "".join(pieces) == want, (tail, out, pieces)
    if REPLACEMENT_CHAR not in want:
        assert not any(REPLACEMENT_CHAR in p for p in pieces), (tail, out, pieces)
    return want


def split_after(tok: Any, ids: list[int], prefix_text: str) -> int:
    """The index splitting `ids` right after the tokens spelling `prefix_text`."""
    for k in range(len(ids) + 1):
        if decode(tok, ids[:k], True) == prefix_text:
            return k
    raise AssertionError(f"no token boundary after {prefix_text!r}")


# ---------------------------------------------------------------- sentencepiece style


def test_spm_splits_non_ascii_into_byte_fallback_tokens(spm: PreTrainedTokenizerFast) -> None:
    ids = spm.encode("😀", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_spm_text_streams_exactly(spm: PreTrainedTokenizerFast) -> None:
    ids = [spm.bos_token_id, *spm.encode(TEXT, add_special_tokens=False)]
    k = split_after(spm, ids, "Say:")
    assert check_stream(spm, ids[:k], ids[k:], skip=True) == " Héllo wörld 😀 中文 café, naïve 🎉!"
    assert check_stream(spm, ids[:k], ids[k:], skip=False) == " Héllo wörld 😀 中文 café, naïve 🎉!"


def test_spm_first_output_token_keeps_its_space(spm: PreTrainedTokenizerFast) -> None:
    ids = spm.encode("Say: hello", add_special_tokens=False)
    k = split_after(spm, ids, "Say:")
    assert spm.convert_ids_to_tokens(ids[k])[0] == "▁"
    assert decode(spm, ids[k:], True) == "hello"  # decoded alone, the space is lost
    assert "".join(stream(spm, ids[:k], ids[k:], True)) == " hello"
    assert "".join(stream(spm, [], ids[k:], True)) == "hello"  # no context: like decode()


def test_spm_holds_back_a_character_until_its_last_byte(spm: PreTrainedTokenizerFast) -> None:
    tail = spm.encode("hi", add_special_tokens=False)
    emoji = spm.encode("hi😀", add_special_tokens=False)[len(tail) :]
    assert len(emoji) == 4
    detok = IncrementalDetokenizer(spm, tail, True)
    assert [detok.add([t]) for t in emoji] == ["", "", "", "😀"]
    assert detok.flush() == ""


def test_spm_special_tokens_in_the_output(spm: PreTrainedTokenizerFast) -> None:
    tail = [spm.bos_token_id, *spm.encode("Say:", add_special_tokens=False)]
    hello = spm.encode("Say: hello", add_special_tokens=False)[len(tail) - 1 :]
    there = spm.encode("Say: there", add_special_tokens=False)[len(tail) - 1 :]
    out = [*hello, spm.eos_token_id, *there, spm.eos_token_id]
    assert check_stream(spm, tail, out, skip=True) == " hello there"
    assert check_stream(spm, tail, out, skip=False) == " hello</s> there</s>"
    # only specials right after the context: the space of the next word must survive
    assert check_stream(spm, tail, [spm.eos_token_id, spm.eos_token_id, *there], skip=True) == " there"


def test_spm_random_token_sequences(spm: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1234)
    byte_ids = set(spm.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
    specials = [spm.bos_token_id, spm.eos_token_id]
    plain = [i for i in range(len(spm)) if i not in byte_ids and i not in specials and i != spm.unk_token_id]
    for _ in range(300):
        out: list[int] = []
        for _ in range(rng.randint(0, 30)):  # whole characters only: byte runs stay valid UTF-8
            kind = rng.random()
            if kind < 0.6:
                out.append(rng.choice(plain))
            elif kind < 0.9:
                out.extend(char_ids(spm, rng.choice(NON_ASCII_CHARS)))
            else:
                out.append(rng.choice(specials))
        tail = [spm.bos_token_id, *spm.encode(rng.choice(["Q:", "a b", "😀"]), add_special_tokens=False)]
        for skip in (True, False):
            check_stream(spm, tail, out, skip, rng)


# ---------------------------------------------------------------- byte-level BPE


def test_byte_level_text_streams_exactly(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode(TEXT, add_special_tokens=False)
    k = split_after(byte_level, ids, "Say:")
    assert check_stream(byte_level, ids[:k], ids[k:], skip=True) == " Héllo wörld 😀 中文 café, naïve 🎉!"
    pieces = stream(byte_level, ids[:k], ids[k:], True)
    assert "😀" in pieces and "中" in pieces  # emitted whole, once their last byte came


def test_byte_level_special_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    tail = byte_level.encode("Say:", add_special_tokens=False)
    out = [*byte_level.encode(" hi", add_special_tokens=False), byte_level.eos_token_id]
    assert check_stream(byte_level, tail, out, skip=True) == " hi"
    assert check_stream(byte_level, tail, out, skip=False) == " hi<|im_end|>"


def test_byte_level_dangling_partial_character_is_dropped(byte_level: PreTrainedTokenizerFast) -> None:
    tail = byte_level.encode("x", add_special_tokens=False)
    ok = byte_level.encode("xok", add_special_tokens=False)[1:]
    emoji = byte_level.encode("x😀", add_special_tokens=False)[1:]
    detok = IncrementalDetokenizer(byte_level, tail, True)
    assert detok.add(ok) == "ok"
    assert detok.add(emoji[:2]) == ""
    assert detok.num_pending_tokens == 2
    assert detok.flush() == ""
    assert detok.flush() == ""


def test_byte_level_prompt_tail_cut_inside_a_character(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode("😀 hi 中", add_special_tokens=False)
    hi = split_after(byte_level, ids, "😀 hi ")
    # the tail starts inside 😀: those bytes are not context, the rest is
    assert "".join(stream(byte_level, ids[1:hi], ids[hi:], True)) == "中"
    # the prompt ends inside 中 and the output finishes it: the character comes out whole
    assert "".join(stream(byte_level, ids[:-1], ids[-1:], True)) == "中"


def test_byte_level_random_token_sequences(byte_level: PreTrainedTokenizerFast) -> None:
    rng = random.Random(99)
    tails = [byte_level.encode(t, add_special_tokens=False) for t in ["", "Q:", "café ", "😀"]]
    for _ in range(400):
        out = [rng.randrange(len(byte_level)) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            check_stream(byte_level, rng.choice(tails), out, skip, rng)


class DecodeSpy:
    """Wraps a tokenizer, recording how many ids each decode call saw."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.window_sizes.append(len(ids))
        return self._tok.decode(ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_decoding_window_stays_small(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode(" ".join([TEXT] * 60), add_special_tokens=False)
    assert len(ids) > 1000
    spy = DecodeSpy(byte_level)
    detok = IncrementalDetokenizer(spy, ids[:5], True)
    text = "".join(detok.add([t]) for t in ids[5:]) + detok.flush()
    assert text == decode(byte_level, ids, True)[len(decode(byte_level, ids[:5], True)) :]
    assert max(spy.window_sizes) <= 8  # a 4-byte character at most, plus its context


# ---------------------------------------------------------------- SmolLM2 (byte-level, real)


@pytest.mark.slow
def test_smollm2_streams_exactly(smollm2_tokenizer: Any) -> None:
    hf = smollm2_tokenizer.hf_tokenizer
    tail = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[-6:]
    text = "Hello! 😀 你好, café — naïve 🎉 ✓ Ünïcödé"
    out = [*hf.encode(text, add_special_tokens=False), smollm2_tokenizer.eos_token_ids[0]]
    assert check_stream(hf, tail, out, skip=True) == text
    assert check_stream(smollm2_tokenizer, tail, out, skip=False) == text + "<|im_end|>"
    # the same as the wrapper's own decode (SmolLM2 does no clean-up of spaces)
    assert smollm2_tokenizer.decode([*tail, *out]) == smollm2_tokenizer.decode(tail) + text
    rng = random.Random(7)
    for _ in range(200):
        out = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 40))]
        check_stream(hf, tail, out, rng.random() < 0.5, rng)
