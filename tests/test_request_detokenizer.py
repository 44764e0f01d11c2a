"""RequestDetokenizer and logprob formatting: exact deltas for streams of engine outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from protocol.messages import (
    DetokRequest,
    FinishReason,
    RequestOutput,
    TextDelta,
    TokenLogprob,
    TokenLogprobs,
    TopLogprob,
)
from protocol.sampling import SamplingParams
from tests.toy_tokenizers import train_byte_level
from tokenizer_svc.logprobs_format import TokenTexts, format_logprobs
from tokenizer_svc.request_detokenizer import RequestDetokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, café naïve!", "hello world there"] * 20


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style) with <|im_end|> as EOS."""
    return train_byte_level(CORPUS)


@pytest.fixture(scope="module")
def spm() -> PreTrainedTokenizerFast:
    """A hand-made sentencepiece-style vocabulary: "▁hi", and byte fallback for the rest."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "i": 5, "hi": 6, "▁hi": 7}
    vocab.update({f"<0x{b:02X}>": 8 + b for b in range(256)})
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[("h", "i"), ("▁", "hi")], byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def enc(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def make(tok: Any, prompt: str = "Say:", parent_id: str = "", **params: Any) -> RequestDetokenizer:
    tail = enc(tok, prompt)
    req = DetokRequest(
        request_id="req-1#2" if parent_id else "req-1", parent_id=parent_id, index=2 if parent_id else 0,
        prompt_tail_ids=tail, num_prompt_tokens=40, params=SamplingParams(**params),
    )
    return RequestDetokenizer(tok, req)


def out(ids: list[int], finish: FinishReason | None = None, **kw: Any) -> RequestOutput:
    return RequestOutput(request_id="req-1", new_token_ids=ids, finish_reason=finish, num_prompt_tokens=40, **kw)


def texts(deltas: list[TextDelta | None]) -> list[str | None]:
    return [None if d is None else d.text for d in deltas]


def test_plain_stream_ending_by_length(tok: Any) -> None:
    ids = enc(tok, "Say: hello world")[len(enc(tok, "Say:")) :]
    state = make(tok, parent_id="req-1", max_tokens=len(ids))
    deltas = [state.step(out([t])) for t in ids[:-1]]
    deltas.append(state.step(out(ids[-1:], FinishReason.LENGTH, num_cached_tokens=32)))
    assert "".join(d.text for d in deltas if d is not None) == " hello world"
    last = deltas[-1]
    assert last == TextDelta(
        request_id="req-1", index=2, text=last.text, token_ids=ids[-1:], finish_reason="length",
        stop_reason=None, logprobs=None, num_prompt_tokens=40, num_output_tokens=len(ids),
        num_cached_tokens=32, queue_seconds=None, error="",
    )
    assert [d.num_output_tokens for d in deltas if d is not None] == list(range(1, len(ids) + 1))
    assert state.finished and state.matched_stop is None
    assert state.step(out(enc(tok, " more"))) is None  # after the end: ignored


def test_held_back_character_gives_no_delta_until_complete(tok: Any) -> None:
    emoji = enc(tok, "x😀")[1:]
    assert len(emoji) == 4
    state = make(tok)
    assert texts([state.step(out([t])) for t in emoji]) == [None, None, None, "😀"]
    delta = state.step(out([], FinishReason.STOP))
    assert delta is not None and (delta.text, delta.token_ids, delta.finish_reason) == ("", [], "stop")
    assert delta.num_output_tokens == 4


def test_held_back_character_with_logprobs_still_gives_deltas(tok: Any) -> None:
    emoji = enc(tok, "x😀")[1:]
    state = make(tok, logprobs=0)
    deltas = [state.step(out([t], logprobs=rows([[t]], [[-0.5]]))) for t in emoji]
    assert texts(deltas) == ["", "", "", "😀"]
    assert [d.logprobs for d in deltas if d is not None] == [
        [TokenLogprob(token="\ufffd", logprob=-0.5, bytes=[b], token_id=t, top=[])]
        for t, b in zip(emoji, "😀".encode())
    ]


def test_dangling_partial_character_is_dropped_at_the_end(tok: Any) -> None:
    state = make(tok)
    assert texts([state.step(out(enc(tok, "x ok")[1:]))]) == [" ok"]
    delta = state.step(out(enc(tok, "x😀")[1:3], FinishReason.LENGTH))
    assert delta is not None and delta.text == "" and delta.finish_reason == "length"


@pytest.mark.parametrize(
    ("skip", "include", "text"),
    [(True, False, " hi"), (False, False, " hi"), (True, True, " hi"), (False, True, " hi<|im_end|>")],
)
def test_eos_text(tok: Any, skip: bool, include: bool, text: str) -> None:
    state = make(tok, skip_special_tokens=skip, include_stop_str_in_output=include)
    ids = [*enc(tok, "x hi")[1:], tok.eos_token_id]
    delta = state.step(out(ids, FinishReason.STOP))
    assert delta is not None
    assert (delta.text, delta.token_ids, delta.finish_reason, delta.stop_reason) == (text, ids, "stop", None)


def test_stop_token_id_is_reported_and_not_shown(tok: Any) -> None:
    stop_id = enc(tok, ".")[0]
    state = make(tok, stop_token_ids=[stop_id])
    ids = [*enc(tok, "x hi")[1:], stop_id]
    delta = state.step(out(ids, FinishReason.STOP, stop_token_id=stop_id))
    assert delta is not None
    assert (delta.text, delta.finish_reason, delta.stop_reason) == (" hi", "stop", stop_id)
    assert state.finished and state.matched_stop is None


def test_stop_string_across_outputs_ends_the_request(tok: Any) -> None:
    state = make(tok, stop=["fox jumps"], logprobs=None)
    ids = enc(tok, "x the quick brown fox jumps over")[1:]
    deltas = [state.step(out([t])) for t in ids]
    end = next(i for i, d in enumerate(deltas) if d is not None and d.finish_reason is not None)
    assert "".join(d.text for d in deltas[: end + 1] if d is not None) == " the quick brown "
    assert (deltas[end].finish_reason, deltas[end].stop_reason) == ("stop", "fox jumps")
    assert all(d is None for d in deltas[end + 1 :])
    assert state.finished and state.matched_stop == "fox jumps"
    assert deltas[end].num_output_tokens == end + 1


def test_stop_string_included_and_winning_over_length(tok: Any) -> None:
    state = make(tok, stop=["world"], include_stop_str_in_output=True)
    delta = state.step(out(enc(tok, "x hello world there")[1:], FinishReason.LENGTH))
    assert delta is not None
    assert (delta.text, delta.finish_reason, delta.stop_reason) == (" hello world", "stop", "world")
    assert state.matched_stop == "world"


def test_finish_releases_a_held_back_stop_prefix(tok: Any) -> None:
    state = make(tok, stop=["hello world"])
    assert texts([state.step(out(enc(tok, "x the hello")[1:]))]) == [" the "]
    delta = state.step(out(enc(tok, "x wor")[1:], FinishReason.LENGTH))
    assert delta is not None and (delta.text, delta.finish_reason) == ("hello wor", "length")
    assert state.matched_stop is None


def test_error_and_abort_without_tokens(tok: Any) -> None:
    state = make(tok)
    assert state.step(out([])) is None
    delta = state.step(out([], FinishReason.ERROR, error="worker died"))
    assert delta is not None
    assert (delta.text, delta.token_ids, delta.finish_reason, delta.error) == ("", [], "error", "worker died")
    assert make(tok).step(out([], FinishReason.ABORT)).finish_reason == "abort"  # type: ignore[union-attr]


# ---------------------------------------------------------------- logprob formatting


def rows(ids: list[list[int]], lps: list[list[float]]) -> TokenLogprobs:
    return TokenLogprobs(
        token_ids=np.array(ids, dtype=np.int64), logprobs=np.array(lps, dtype=np.float32),
        ranks=np.ones(len(ids), dtype=np.int64),
    )


def test_logprobs_top_list_sorted_and_cut_to_k(tok: Any) -> None:
    space, the, eos = enc(tok, " ")[0], enc(tok, "the")[0], tok.eos_token_id
    r = rows([[the, eos, space, the]], [[-1.0, -2.0, -0.5, -1.0]])
    texts_ = TokenTexts(tok)
    assert format_logprobs(r, 3, texts_) == [
        TokenLogprob(token="the", logprob=-1.0, bytes=list(b"the"), token_id=the, top=[
            TopLogprob(token=" ", logprob=-0.5, bytes=[32], token_id=space),
            TopLogprob(token="the", logprob=-1.0, bytes=list(b"the"), token_id=the),
            TopLogprob(token="<|im_end|>", logprob=-2.0, bytes=list(b"<|im_end|>"), token_id=eos),
        ])
    ]
    assert [t.token_id for t in format_logprobs(r, 1, texts_)[0].top] == [eos]
    assert format_logprobs(r, 0, texts_)[0].top == []


def test_logprob_token_text_and_bytes(tok: Any, spm: Any) -> None:
    lt = TokenTexts(tok)
    assert [tok.convert_ids_to_tokens(i) for i in enc(tok, "x hello world")] == ["x", "Ġ", "hello", "Ġworld"]
    assert [lt.get(i) for i in enc(tok, "x hello world")] == [
        ("x", [120]), (" ", [32]), ("hello", list(b"hello")), (" world", list(b" world"))
    ]
    e_acute = enc(tok, "é")
    assert [lt.get(i) for i in e_acute] == [("é", [0xC3, 0xA9])]
    st = TokenTexts(spm)
    assert [st.get(i) for i in enc(spm, "hi 😀")] == [
        (" hi", list(b" hi")), (" ", [32]), ("\ufffd", [0xF0]), ("\ufffd", [0x9F]), ("\ufffd", [0x98]),
        ("\ufffd", [0x80]),
    ]
    assert st.get(spm.eos_token_id) == ("</s>", list(b"</s>"))


def test_logprobs_in_deltas(spm: Any) -> None:
    state = make(spm, prompt="hi", logprobs=1)
    hi = enc(spm, "hi hi")[1]
    assert spm.convert_ids_to_tokens(hi) == "▁hi"
    delta = state.step(out([hi], logprobs=rows([[hi, 3]], [[-0.25, -1.5]])))
    assert delta is not None and delta.text == " hi"
    assert delta.logprobs == [TokenLogprob(
        token=" hi", logprob=-0.25, bytes=list(b" hi"), token_id=hi,
        top=[TopLogprob(token=" ", logprob=-1.5, bytes=[32], token_id=3)],
    )]
    unasked = make(spm, logprobs=None).step(out([hi], logprobs=rows([[hi, 3]], [[-0.25, -1.5]])))
    assert unasked is not None and unasked.logprobs is None


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_chat_stream(smollm2_tokenizer: Any) -> None:
    tail = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[-6:]
    req = DetokRequest(request_id="r", parent_id="", index=0, prompt_tail_ids=tail, num_prompt_tokens=30,
                       params=SamplingParams(stop=["\n\n"], logprobs=2))
    state = RequestDetokenizer(smollm2_tokenizer, req)
    ids = smollm2_tokenizer.encode("Hi! 😀 你好\n\nBye")
    deltas = []
    for t in ids:
        top = [t, (t + 1) % 49152, (t + 2) % 49152]
        deltas.append(state.step(out([t], logprobs=rows([top], [[-0.1, -2.0, -3.0]]))))
    sent = [d for d in deltas if d is not None]
    assert "".join(d.text for d in sent) == "Hi! 😀 你好"
    assert sent[-1].finish_reason == "stop" and sent[-1].stop_reason == "\n\n"
    assert state.matched_stop == "\n\n"
    assert all(len(d.logprobs) == 1 and len(d.logprobs[0].top) == 2 for d in sent)  # type: ignore[arg-type]
    emoji_bytes = [b for d in sent for b in d.logprobs[0].bytes]  # type: ignore[index]
    assert bytes(emoji_bytes).decode() == "Hi! 😀 你好\n\n"
    hf = smollm2_tokenizer.hf_tokenizer
    partial = hf.convert_tokens_to_ids("ĠðŁĺ")  # a space and the first 3 bytes of 😀
    assert TokenTexts(smollm2_tokenizer).get(partial) == (" \ufffd", [0x20, 0xF0, 0x9F, 0x98])
