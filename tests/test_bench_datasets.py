"""`pdserve bench` datasets: random, shared-prefix and ShareGPT requests (pure parts).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.datasets import (
    WORDS,
    ShareGPTLimits,
    estimated_tokens,
    length_range,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
)


# ---------------------------------------------------------------- datasets

def test_random_requests_in_words():
    reqs = random_requests(40, 20, 8, 0.5, seed=5)
    assert reqs == random_requests(40, 20, 8, 0.5, seed=5)
    assert reqs != random_requests(40, 20, 8, 0.5, seed=6)
    assert length_range(20, 0.5) == (10, 30) and length_range(8, 0.5) == (4, 12)
    for r in reqs:
        words = r.prompt.split(" ")
        assert len(words) == r.prompt_len and set(words) <= set(WORDS)
        assert 10 <= r.prompt_len <= 30 and 4 <= r.max_tokens <= 12
    assert len({r.prompt_len for r in reqs}) > 5
    fixed = random_requests(3, 7, 5, 0.0, seed=0)
    assert [(r.prompt_len, r.max_tokens) for r in fixed] == [(7, 5)] * 3
    with pytest.raises(ValueError):
        length_range(10, 1.0)


def test_shared_prefix_requests_share_few_long_prefixes_in_words():
    reqs = shared_prefix_requests(12, 3, 50, 10, 6, 0.0, seed=4)
    assert reqs == shared_prefix_requests(12, 3, 50, 10, 6, 0.0, seed=4)
    heads = [" ".join(r.prompt.split(" ")[:50]) for r in reqs]
    assert len(set(heads)) == 3 and all(heads.count(h) == 4 for h in set(heads))  # each used 4 times
    tails = [" ".join(r.prompt.split(" ")[50:]) for r in reqs]
    assert len(set(tails)) == 12  # every request has its own question
    assert [(r.prompt_len, r.max_tokens) for r in reqs] == [(60, 6)] * 12
    assert all(len(r.prompt.split(" ")) == 60 for r in reqs)
    with pytest.raises(ValueError):
        shared_prefix_requests(4, 0, 50, 10, 6, 0.0, seed=4)


def _conv(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def _words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def test_sharegpt_parsing_and_filtering(tmp_path: Path):
    entries = [
        _conv(("human", _words(10, "a")), ("gpt", _words(20))),             # 13 / 26: kept
        _conv(("gpt", "hello"), ("human", _words(5, "b")), ("gpt", _words(5))),  # first human turn: 7 / 7
        _conv(("human", "hi"), ("gpt", _words(50))),                        # prompt 1 token: dropped
        _conv(("human", _words(10, "c")), ("gpt", "ok")),                   # reply 1 token: dropped
        _conv(("human", _words(800, "d")), ("gpt", _words(10))),            # prompt 1040 > 1024
        _conv(("human", _words(700, "e")), ("gpt", _words(900))),           # total 910 + 1170 > 2048
        _conv(("human", _words(10, "f"))),                                  # no reply
        _conv(("human", _words(10, "g")), ("human", _words(10))),           # reply not from gpt
        {"no": "conversations"},
        _conv(("user", _words(3, "h")), ("assistant", _words(4))),          # 4 / 5: kept (role aliases)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    reqs = sharegpt_requests(path, 100, seed=0)
    got = sorted((r.prompt.split()[0], r.prompt_len, r.max_tokens) for r in reqs)
    assert got == [("a", 13, 26), ("b", 7, 7), ("h", 4, 5)]
    assert reqs == sharegpt_requests(path, 100, seed=0)
    two = sharegpt_requests(path, 2, seed=1)
    assert len(two) == 2 and {r.prompt for r in two} <= {r.prompt for r in reqs}
    fixed = sharegpt_requests(path, 100, seed=0, output_len=9)
    assert sorted(r.max_tokens for r in fixed) == [9, 9, 9]
    strict = sharegpt_requests(path, 100, seed=0, limits=ShareGPTLimits(min_len=6))
    assert sorted(r.prompt_len for r in strict) == [7, 13]
    assert estimated_tokens("one two three four five") == 7  # 6.5 rounds half up


def test_sharegpt_rejects_a_non_list(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(path, 1, seed=0)


@pytest.mark.slow
def test_random_and_sharegpt_with_smollm2_tokenizer(smollm2_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    reqs = random_requests(30, 64, 16, 0.5, seed=2, tokenizer=tok)
    for r in reqs:
        assert len(tok.encode(r.prompt, add_special_tokens=True)) == r.prompt_len
        assert 32 <= r.prompt_len <= 96 and 8 <= r.max_tokens <= 24
    assert [len(tok.encode(r.prompt)) for r in random_requests(3, 5, 4, 0.0, 1, tok)] == [5, 5, 5]
    prompt, reply = "Tell me a story about a dragon.", "Once upon a time there was a dragon."
    path = tmp_path / "s.json"
    path.write_text(json.dumps([_conv(("human", prompt), ("gpt", reply))]))
    (r,) = sharegpt_requests(path, 1, seed=0, tokenizer=tok)
    assert r.prompt_len == len(tok.encode(prompt)) and r.max_tokens == len(tok.encode(reply, add_special_tokens=False))
    shared = shared_prefix_requests(8, 2, 64, 16, 4, 0.0, seed=3, tokenizer=tok)
    ids = [tok.encode(r.prompt, add_special_tokens=True) for r in shared]
    assert [len(i) for i in ids] == [r.prompt_len for r in shared]
    assert len({tuple(i[:64]) for i in ids}) == 2  # token-level sharing: what prefix caching sees
