"""Tokenizer wrapper over the converted SmolLM2 directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from protocol.model_files.model_source import bundled_gguf_path, resolve_model
from tokenizer_svc.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3? Ünïcödé ✓"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    return smollm2_tokenizer


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_ids_match_transformers(smollm2_dir: Path, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> None:
    reference = AutoTokenizer.from_pretrained(str(smollm2_dir))
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = tokenizer.apply_chat_template(messages)
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert ids == list(expected)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_converted_tokenizer_matches_the_gguf_tokenizer(tokenizer: Tokenizer) -> None:
    gguf_path = bundled_gguf_path()
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for messages in CONVERSATIONS:
        expected = from_gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert tokenizer.apply_chat_template(messages) == list(expected)
    text = "The quick brown fox, 1234 — naïve café!\n\tEnd."
    assert tokenizer.encode(text) == from_gguf(text)["input_ids"]


def test_first_chat_turn_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n after SmolLM2's default system turn
    assert ids[0] == 1
    assert ids[-10:] == [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]


@pytest.mark.parametrize("text", ["hello world", "", "  leading spaces", "Ünïcödé ✓ 日本語\n\nlines", "a" * 500])
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert tokenizer.decode(ids) == text


def test_encode_known_ids(tokenizer: Tokenizer) -> None:
    # SmolLM2 adds no BOS for plain prompts (add_bos_token is false in the GGUF).
    assert tokenizer.encode("hello world") == [28120, 905]


def test_decode_skips_special_tokens_by_default(tokenizer: Tokenizer) -> None:
    ids = [1, 28120, 905, 2]
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>hello world<|im_end|>"


def test_properties(smollm2_dir: Path, tokenizer: Tokenizer) -> None:
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.vocab_size == 49152
    assert tokenizer.name == smollm2_dir.name
    assert Tokenizer.from_dir(smollm2_dir, name="smollm2-135m").name == "smollm2-135m"


def test_eos_ids_union_generation_config_first(smollm2_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tok"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (copy / name).write_bytes((smollm2_dir / name).read_bytes())
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 7, 0]}))
    assert Tokenizer.from_dir(copy).eos_token_ids == [7, 2, 0]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(copy).eos_token_ids == [5, 2]
    (copy / "generation_config.json").unlink()
    assert Tokenizer.from_dir(copy).eos_token_ids == [2]


@pytest.mark.parametrize(
    "messages",
    [
        {"role": "user", "content": "hi"},
        "hi",
        None,
        [],
        ["hi"],
        [{"content": "hi"}],
        [{"role": "", "content": "hi"}],
        [{"role": 3, "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["hi"]}],
        [{"role": "user", "content": 5}],
    ],
)
def test_malformed_messages_raise_value_error(tokenizer: Tokenizer, messages: Any) -> None:
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)


def test_missing_chat_template_raises_value_error(smollm2_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-template"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((smollm2_dir / name).read_bytes())
    tokenizer = Tokenizer.from_dir(copy)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tokenizer.encode("hello world") == [28120, 905]
