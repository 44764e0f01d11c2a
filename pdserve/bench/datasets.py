"""Benchmark prompts: `random` (synthetic, length-controlled), `shared-prefix` (random questions
behind a few long shared system prompts) and `sharegpt` (real conversations).

Lengths are only as exact as the length unit allows. Without a tokenizer a length is counted in
*words*: random prompts are that many common English words (most of them one token each in
BPE vocabularies, so the token count lands near the asked length but not on it), and ShareGPT
texts count as words * 1.3 tokens. With a tokenizer (any Hugging Face tokenizer: the
`Tokenizer` protocol below) random prompts have exactly the asked number of tokens (as a plain
completion prompt; a chat template adds its own tokens) and ShareGPT lengths are token counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the prompt, its expected length, and how many tokens to ask for."""

    prompt: str
    prompt_len: int  # tokens with a tokenizer, else an estimate (see module docstring)
    max_tokens: int


# Short, frequent words: with a leading space nearly every one is a single BPE token.
WORDS: tuple[str, ...] = tuple("""
the of and to in is was for on are with as at be by this had not but from or have an they which
one you were her all she there would their we him been has when who will more no if out so said
what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state
good very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used
take three states himself few house use during without again place around however home small found
thought went say part once general high upon school every does got united left number course war
until always away something fact though water less public put think almost hand enough far took
head yet government system better set told nothing night end why called didn find look asked later
point knew city next program business give group toward young days let room president side social
given present several order national second possible rather per face among form important often
things looking early white case large become big need four within felt children along saw best
church ever least power development light thing seemed family interest want members others mind
country area done although open problem sense help line word red river book tree music green road
""".split())


def length_range(mean: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] around `mean`: mean*(1-r) .. mean*(1+r), at least 1."""
    if mean < 1:
        raise ValueError(f"a length must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, round(mean * (1.0 - range_ratio)))
    return low, max(low, round(mean * (1.0 + range_ratio)))


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    tokenizer: Tokenizer | None = None) -> list[BenchRequest]:
    """`num` prompts of random words; input/output lengths drawn uniformly from length_range."""
    rng = random.Random(seed)
    in_low, in_high = length_range(input_len, range_ratio)
    out_low, out_high = length_range(output_len, range_ratio)
    words = WORDS if tokenizer is None else single_token_words(tokenizer)
    requests = []
    for _ in range(num):
        n_in, n_out = rng.randint(in_low, in_high), rng.randint(out_low, out_high)
        if tokenizer is None:
            prompt = " ".join(rng.choice(words) for _ in range(n_in))
        else:
            prompt = exact_token_prompt(tokenizer, words, n_in, rng)
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


def shared_prefix_requests(num: int, num_prefixes: int, prefix_len: int, input_len: int, output_len: int,
                           range_ratio: float, seed: int, tokenizer: Tokenizer | None = None
                           ) -> list[BenchRequest]:
    """`num` prompts, each one of `num_prefixes` long shared "system prompts" (`prefix_len`
    tokens, or words without a tokenizer) followed by its own random question (`input_len`,
    drawn as in random_requests): the load where prefix caching and KV-aware routing pay.
    Prompts cycle through the prefixes in a seeded shuffled order."""
    if num_prefixes < 1 or prefix_len < 1:
        raise ValueError("--num-prefixes and --prefix-len must be >= 1")
    rng = random.Random(seed)
    words = WORDS if tokenizer is None else single_token_words(tokenizer)
    prefixes = []
    for _ in range(num_prefixes):
        if tokenizer is None:
            prefixes.append(" ".join(rng.choice(words) for _ in range(prefix_len)))
        else:
            prefixes.append(exact_token_prompt(tokenizer, words, prefix_len, rng))
    questions = random_requests(num, input_len, output_len, range_ratio, seed + 1, None if tokenizer is None else tokenizer)
    order = [i % num_prefixes for i in range(num)]
    rng.shuffle(order)
    requests = []
    for which, q in zip(order, questions):
        prompt = prefixes[which] + " " + q.prompt.lstrip()
        n = len(tokenizer.encode(prompt, add_special_tokens=True)) if tokenizer is not None else prefix_len + q.prompt_len
        requests.append(BenchRequest(prompt, n, q.max_tokens))
    return requests


def single_token_words(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The words of WORDS that are one token when preceded by a space (the usual BPE case)."""
    words = tuple(w for w in WORDS if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1)
    return words or WORDS


def exact_token_prompt(tokenizer: Tokenizer, words: Sequence[str], n_tokens: int, rng: random.Random) -> str:
    """Random words whose encoding (special tokens included) is exactly `n_tokens` long.

    Start from a word per token, then trim by decoding a cut of the ids or pad with more
    words until the count matches; a tokenizer that never settles is an error, not a silent
    length mismatch.
    """
    special = len(tokenizer.encode("", add_special_tokens=True))
    if n_tokens <= special:
        raise ValueError(f"a prompt of {n_tokens} tokens is shorter than the tokenizer's "
                         f"{special} special tokens")
    text = "".join(" " + rng.choice(words) for _ in range(n_tokens - special))
    for _ in range(16):
        ids = tokenizer.encode(text, add_special_tokens=False)
        body = n_tokens - special
        if len(ids) == body:
            return text
        if len(ids) > body:
            text = tokenizer.decode(ids[:body])
        else:
            text += "".join(" " + rng.choice(words) for _ in range(body - len(ids)))
    raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens")


def estimated_tokens(text: str) -> int:
    """Tokens guessed from words (x1.3, rounded half up in integer arithmetic: no float drift)."""
    return (len(text.split()) * 13 + 5) // 10


@dataclass(frozen=True)
class ShareGPTLimits:
    """The filter vLLM's benchmark applies: drop tiny turns and ones too long for small models."""

    min_len: int = 4
    max_prompt_len: int = 1024
    max_total_len: int = 2048

    def keep(self, prompt_len: int, output_len: int) -> bool:
        return (prompt_len >= self.min_len and output_len >= self.min_len
                and prompt_len <= self.max_prompt_len and prompt_len + output_len <= self.max_total_len)


HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant", "chatgpt")


def first_exchange(entry: Any) -> tuple[str, str] | None:
    """(first human turn, the gpt reply right after it) of one ShareGPT entry, or None."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for turn, reply in zip(turns, turns[1:]):
        if not (isinstance(turn, dict) and isinstance(reply, dict)):
            return None
        if turn.get("from") in HUMAN_ROLES:
            if reply.get("from") not in GPT_ROLES:
                return None
            prompt, completion = turn.get("value"), reply.get("value")
            if isinstance(prompt, str) and isinstance(completion, str) and prompt and completion:
                return prompt, completion
            return None
    return None


def sharegpt_requests(path: Path, num: int, seed: int, tokenizer: Tokenizer | None = None,
                      output_len: int | None = None, limits: ShareGPTLimits = ShareGPTLimits()
                      ) -> list[BenchRequest]:
    """Up to `num` requests from a ShareGPT JSON file, in a seeded shuffled order.

    Entries are measured lazily (tokenizing a whole dump is slow) until `num` pass the filter;
    `output_len` overrides the reply length as max_tokens (the filter still uses the reply).
    """
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    requests: list[BenchRequest] = []
    for i in order:
        if len(requests) >= num:
            break
        exchange = first_exchange(entries[i])
        if exchange is None:
            continue
        prompt, completion = exchange
        if tokenizer is None:
            p_len, o_len = estimated_tokens(prompt), estimated_tokens(completion)
        else:
            p_len = len(tokenizer.encode(prompt, add_special_tokens=True))
            o_len = len(tokenizer.encode(completion, add_special_tokens=False))
        if limits.keep(p_len, o_len):
            requests.append(BenchRequest(prompt, p_len, output_len if output_len is not None else o_len))
    return requests
