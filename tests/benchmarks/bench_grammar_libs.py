"""xgrammar vs llguidance on pdserve's workloads: compile time and per-token mask time.

A script, not a test (pytest does not collect it). For each library and each grammar (a nested
JSON schema, a regex, a choice of strings, a Lark/EBNF grammar) it measures, on SmolLM2's
49,152-token vocabulary:
  - tokenizer setup (once per process, cached by both libraries' users);
  - compile: grammar source -> ready matcher (cold: a fresh compiler per grammar, so no cache);
  - mask: one next-token bitmask, over a whole valid output driven token by token (the tokens
    of a fixed valid answer), p50/p99/max per token; the matcher advance is timed separately.
Prints one JSON line per (library, grammar) and a markdown table.

    .venv/bin/python tests/benchmarks/bench_grammar_libs.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from quiet_machine import machine_info  # noqa: E402 (beside this script)

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {"type": "object", "properties": {"lat": {"type": "number"},
                                                          "lon": {"type": "number"}},
                        "required": ["lat", "lon"], "additionalProperties": False},
            },
            "required": ["street", "city", "zip", "geo"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                 "maxItems": 3},
        "orders": {"type": "array", "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "total": {"type": "number"},
                           "status": {"enum": ["open", "shipped", "closed"]}},
            "required": ["id", "total", "status"], "additionalProperties": False}},
    },
    "required": ["name", "age", "email", "address", "tags", "orders"],
    "additionalProperties": False,
}
NESTED_ANSWER = json.dumps({
    "name": "Ada Lovelace", "age": 36, "email": "ada@analytical.com",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "12345",
                "geo": {"lat": 51.507, "lon": -0.134}},
    "tags": ["a", "c"],
    "orders": [{"id": 1, "total": 12.5, "status": "open"}, {"id": 2, "total": 3.0, "status": "closed"}],
}, separators=(",", ":"))
REGEX = r"(\+?1 )?\(?[0-9]{3}\)?[ -][0-9]{3}-[0-9]{4}"
REGEX_ANSWER = "+1 (555) 123-4567"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
CHOICE_ANSWER = "mixed feelings"
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
LARK_ANSWER = "(12+3)*4-5/6"


def _choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Llg:
    name = "llguidance"

    def __init__(self, hf_tok, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.llg, self.np = llguidance, llguidance.numpy
        start = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab_size)
        self.setup_s = time.perf_counter() - start
        self.vocab_size = vocab_size

    def grammar(self, kind: str) -> str:
        M = self.llg.LLMatcher
        if kind == "json":
            return M.grammar_from_json_schema(NESTED_SCHEMA, defaults={"whitespace_flexible": False})
        if kind == "regex":
            return M.grammar_from_regex(REGEX)
        if kind == "choice":
            return M.grammar_from_regex(_choice_regex(CHOICES))
        return M.grammar_from_lark(LARK)

    def compile(self, kind: str):
        matcher = self.llg.LLMatcher(self.tok, self.grammar(kind), log_level=0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher

    def new_mask(self):
        return self.np.allocate_token_bitmask(1, self.vocab_size)

    def fill(self, matcher, mask) -> None:
        self.np.fill_next_token_bitmask(matcher, mask, 0)

    def advance(self, matcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(matcher.get_error())


class Xgr:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        start = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab_size)
        self.setup_s = time.perf_counter() - start
        self.vocab_size = vocab_size

    def compile(self, kind: str):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind == "json":
            compiled = compiler.compile_json_schema(json.dumps(NESTED_SCHEMA), any_whitespace=False,
                                                    separators=(",", ":"))
        elif kind == "regex":
            compiled = compiler.compile_regex(REGEX)
        elif kind == "choice":
            compiled = compiler.compile_regex(_choice_regex(CHOICES))
        else:
            compiled = compiler.compile_grammar(GBNF)
        return self.xgr.GrammarMatcher(compiled)

    def new_mask(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab_size)

    def fill(self, matcher, mask) -> None:
        matcher.fill_next_token_bitmask(mask, 0)

    def advance(self, matcher, token: int) -> None:
        if not matcher.accept_token(token):
            raise RuntimeError(f"token {token} rejected")


ANSWERS = {"json": NESTED_ANSWER, "regex": REGEX_ANSWER, "choice": CHOICE_ANSWER, "grammar": LARK_ANSWER}


def measure(lib, kind: str, answer_ids: list[int], repeats: int) -> dict:
    compiles, masks, advances = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        matcher = lib.compile(kind)
        compiles.append(time.perf_counter() - start)
        mask = lib.new_mask()
        for tok in answer_ids:
            start = time.perf_counter()
            lib.fill(matcher, mask)
            masks.append(time.perf_counter() - start)
            start = time.perf_counter()
            lib.advance(matcher, tok)
            advances.append(time.perf_counter() - start)
    return {
        "library": lib.name, "grammar": kind, "tokens": len(answer_ids),
        "tokenizer_setup_ms": round(lib.setup_s * 1e3, 1),
        "compile_ms_p50": round(statistics.median(compiles) * 1e3, 2),
        "compile_ms_max": round(max(compiles) * 1e3, 2),
        "mask_us_p50": round(statistics.median(masks) * 1e6, 1),
        "mask_us_p99": round(percentile(masks, 0.99) * 1e6, 1),
        "mask_us_max": round(max(masks) * 1e6, 1),
        "advance_us_p50": round(statistics.median(advances) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--libs", default="llguidance,xgrammar")
    args = parser.parse_args()
    from protocol.model_files.model_source import resolve_model
    from transformers import AutoTokenizer

    hf_dir = resolve_model("smollm2-135m", Path("~/.cache/pdserve").expanduser(), need_weights=False)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    print(json.dumps({"machine": machine_info(), "vocab_size": vocab_size}), flush=True)
    rows = []
    for name in args.libs.split(","):
        lib = {"llguidance": Llg, "xgrammar": Xgr}[name](hf_tok, vocab_size)
        for kind, answer in ANSWERS.items():
            ids = hf_tok.encode(answer, add_special_tokens=False)
            row = measure(lib, kind, ids, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["library", "grammar", "tokens", "tokenizer_setup_ms", "compile_ms_p50", "compile_ms_max",
            "mask_us_p50", "mask_us_p99", "mask_us_max", "advance_us_p50"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
