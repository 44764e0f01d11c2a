"""Structured output's cost: 32 concurrent requests under nested JSON schemas vs the same load free.

    python tests/benchmarks/bench_structured.py [--device cpu] [--rounds 3] [-- extra pdserve up flags]
    python tests/benchmarks/bench_structured.py --device cuda --synthetic llama-3.1-8b

A script, not a test. One `pdserve up` serves both loads (start-up excluded). The constrained load
sends every request at once with `response_format` json_schema (four nested schemas, so the
grammar cache sees repeats), seeded sampling; each output must parse and validate. The
unconstrained load sends the same prompts with the same seeds, `max_tokens = min_tokens =` the
length the constrained request produced and ignore_eos, so both do exactly the same number of
forward steps and tokens. Throughput = output tokens / wall time from the first request to the
last response. Rounds alternate which load goes first (the machine's speed drifts); the figure is
the median of the per-round ratios constrained / unconstrained (a round that starts with the free
load copies the previous round's lengths).

Grammar compile time: every schema compiled cold (no cache) --compile-repeats times with the
worker's own compiler against the served model's vocabulary, p50/p99 in milliseconds.

--synthetic NAME builds a dummy-weight model directory (tests/benchmarks/synthetic_model.py) with
a byte-level tokenizer, so JSON has tokens; its random weights make the text meaningless, but the
grammar keeps it valid JSON and the step shapes are the real model's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

try:  # validates every complete answer; without it (a bare GPU image) answers are only parsed
    import jsonschema
except ImportError:
    jsonschema = None

sys.path.insert(0, str(Path(__file__).parent))
from bench_stack import REPO, save_result, served  # noqa: E402 (puts REPO on sys.path)
from synthetic_model import write_model_dir  # noqa: E402

STR = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {
        "name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"street": STR, "city": STR,
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "hobbies": {"type": "array", "items": STR, "maxItems": 3}},
     "required": ["name", "age", "address", "hobbies"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": STR, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "director": {"type": "object", "properties": {"name": STR, "born": {"type": "integer"}},
                     "required": ["name", "born"], "additionalProperties": False},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "horror"]},
                   "minItems": 1, "maxItems": 2}},
     "required": ["title", "year", "director", "genres"], "additionalProperties": False},
    {"type": "object", "properties": {
        "order_id": {"type": "integer"}, "paid": {"type": "boolean"},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": STR, "qty": {"type": "integer", "minimum": 1},
                                             "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}}},
     "required": ["order_id", "paid", "items"], "additionalProperties": False},
    {"type": "object", "properties": {
        "event": STR, "when": {"type": "object", "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}},
            "required": ["date", "time"], "additionalProperties": False},
        "guests": {"type": "array", "items": {"type": "object", "properties": {"name": STR,
                   "vip": {"type": "boolean"}}, "required": ["name", "vip"],
                   "additionalProperties": False}, "maxItems": 2}},
     "required": ["event", "when", "guests"], "additionalProperties": False},
]
SUBJECTS = ["a person", "a film", "an online order", "a party"]


def prompt(i: int) -> str:
    return f"Describe {SUBJECTS[i % 4]} (example {i}) as JSON."


async def _post(client: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with client.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {await r.text()}")
        return await r.json()


async def timed_posts(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    """Every body sent at once; seconds from the first request to the last response, and the answers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(_post(client, url, b) for b in bodies))
        return time.perf_counter() - start, answers


async def constrained_load(url: str, n: int, max_tokens: int) -> tuple[float, list[int], list[int]]:
    bodies = [{"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
               "temperature": 0.7, "seed": i, "response_format": {"type": "json_schema", "json_schema": {
                   "name": f"s{i % 4}", "strict": True, "schema": SCHEMAS[i % 4]}}} for i in range(n)]
    seconds, answers = await timed_posts(url, bodies)
    lengths, complete = [], []
    for i, a in enumerate(answers):
        choice = a["choices"][0]
        lengths.append(a["usage"]["completion_tokens"])
        if choice["finish_reason"] == "stop":  # a cut answer is a valid prefix, not a document
            answer = json.loads(choice["message"]["content"])
            if jsonschema is not None:
                jsonschema.validate(answer, SCHEMAS[i % 4])
            complete.append(i)
    return seconds, lengths, complete


async def free_load(url: str, lengths: list[int]) -> tuple[float, list[int]]:
    bodies = [{"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": n, "min_tokens": n,
               "ignore_eos": True, "temperature": 0.7, "seed": i} for i, n in enumerate(lengths)]
    seconds, answers = await timed_posts(url, bodies)
    return seconds, [a["usage"]["completion_tokens"] for a in answers]


def compile_times(model_dir: Path, vocab_size: int, eos: list[int], repeats: int) -> dict:
    from protocol.grammar_compiler import GrammarCompiler
    from protocol.structured_output import json_schema_output

    compiler = GrammarCompiler.for_dir(model_dir, vocab_size, cache_size=0)  # every compile cold
    compiler.compiled(json_schema_output({"type": "object"}), eos)  # builds the tokenizer
    compiler.compile_seconds.clear()
    for _ in range(repeats):
        for schema in SCHEMAS:
            compiler.compiled(json_schema_output(schema), eos)
    ms = sorted(s * 1e3 for s in compiler.compile_seconds)
    return {"compiles": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * (len(ms) - 1) + 0.5))], 3),
            "max_ms": round(ms[-1], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--synthetic", default=None, help="dummy-weight model of these shapes (e.g. llama-3.1-8b)")
    p.add_argument("--compile-repeats", type=int, default=25)
    p.add_argument("--output", default="bench-results/structured.json")
    p.add_argument("extra", nargs="*", help="flags for `pdserve up`")
    args = p.parse_args()
    from protocol.model_files.model_source import resolve_model
    from tokenizer_svc.tokenizer import Tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    if args.synthetic:
        model_dir = write_model_dir(args.synthetic, workdir / args.synthetic, byte_level=True)
        model_flags = ["--model", str(model_dir), "--load-format", "dummy"]
    else:
        model_dir = resolve_model("smollm2-135m", Path("~/.cache/pdserve").expanduser())
        model_flags = ["--model", str(model_dir)]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    compile_stats = compile_times(model_dir, vocab, Tokenizer.from_dir(model_dir).eos_token_ids,
                                  args.compile_repeats)
    print(f"compile: {compile_stats}", flush=True)

    rounds = []
    with served(["--device", args.device, *model_flags, *args.extra], workdir / "up.log", ready_timeout=900,
                stop_timeout=120, log_tail=3000, not_ready=SystemExit, cwd=REPO) as (url, cmd):
        asyncio.run(constrained_load(url, 2, 16))  # warm-up: grammar tokenizer, first steps
        lengths = None
        for r in range(args.rounds):
            result: dict = {}
            order = ("constrained", "free") if r % 2 == 0 or lengths is None else ("free", "constrained")
            for phase in order:
                if phase == "constrained":
                    seconds, got, complete = asyncio.run(constrained_load(url, args.num_requests, args.max_tokens))
                    # Seeded draws repeat, but batch composition can shift a float enough to
                    # change a token, so each round's free load copies the latest lengths.
                    lengths = got
                    result["constrained"] = {"seconds": round(seconds, 3), "tokens": sum(got),
                                             "tok_s": round(sum(got) / seconds, 2), "complete": len(complete)}
                else:
                    seconds, got = asyncio.run(free_load(url, lengths))
                    assert got == lengths, (got, lengths)
                    result["free"] = {"seconds": round(seconds, 3), "tokens": sum(got),
                                      "tok_s": round(sum(got) / seconds, 2)}
            result["ratio"] = round(result["constrained"]["tok_s"] / result["free"]["tok_s"], 3)
            rounds.append(result)
            print(f"round {r + 1}: {json.dumps(result)}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    save_result(args.output, {"server": " ".join(cmd[3:]), "num_requests": args.num_requests,
                              "output_lengths": lengths, "compile": compile_stats, "rounds": rounds,
                              "ratio_constrained_over_free": ratio})
    print(f"median constrained/free throughput ratio over {len(rounds)} rounds: {ratio:.3f}; "
          f"compile p50 {compile_stats['p50_ms']} ms, p99 {compile_stats['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
