"""`pdserve generate`: the offline engine over a JSON-lines file of prompts.

Every line is checked before any compute is spent; a bad line is reported with its line number
and the run stops (exit status 2) without generating. Results are one JSON line per input in
input order; a stats line goes to stderr at the end (generation time excludes model loading).
Text is made as the service makes it (tokenizer_svc.request_detokenizer): `stop` strings end a
request and are cut from its text unless `include_stop_str_in_output`, and the text of a stop
token (EOS or one of `stop_token_ids`) is not shown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from protocol.config import (
    CacheSettings,
    ConfigError,
    ModelSettings,
    SchedulerSettings,
    add_settings_arguments,
    settings_from,
)
from protocol.messages import DETOK_PROMPT_TAIL, DetokRequest, RequestOutput
from protocol.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 128


class PromptLine(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One input line: a prompt or chat messages, plus optional per-line sampling fields."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = None
    skip_special_tokens: bool | None = None
    priority: int = 0


class InputError(ValueError):
    """A bad prompts file; the message names every bad line."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="offline generation over a JSON-lines prompts file")
    p.add_argument("--prompts-file", required=True, type=Path,
                   help='JSON lines: {"prompt": ...} or {"messages": [...]}, optional sampling fields')
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"default max_tokens per line (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=1.0, help="default temperature (0 = greedy)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line (else text)")
    for group in (ModelSettings, CacheSettings, SchedulerSettings):
        add_settings_arguments(p, group)
    p.set_defaults(run=run)


def parse_prompt_lines(text: str, defaults: SamplingParams, vocab_size: int | None = None) -> list[tuple[PromptLine, SamplingParams]]:
    """Decode and validate every line; raise InputError listing each bad one."""
    decoder = msgspec.json.Decoder(PromptLine)
    parsed, errors = [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = decoder.decode(raw)
            if (line.prompt is None) == (line.messages is None):
                raise ValueError('give exactly one of "prompt" or "messages"')
            params = _line_params(line, defaults)
            params.validate(vocab_size)
            parsed.append((line, params))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            errors.append(f"line {lineno}: {exc}")
    if errors:
        raise InputError("\n".join(errors))
    if not parsed:
        raise InputError("the prompts file has no prompts")
    return parsed


def _line_params(line: PromptLine, defaults: SamplingParams) -> SamplingParams:
    names = (f.name for f in msgspec.structs.fields(SamplingParams))
    overrides = {n: getattr(line, n) for n in names if getattr(line, n, None) is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    return msgspec.structs.replace(defaults, **overrides)


def run(args: argparse.Namespace) -> int:
    try:
        model = settings_from(ModelSettings, args)
        cache = settings_from(CacheSettings, args)
        sched = settings_from(SchedulerSettings, args)
        defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=model.seed)
        text = args.prompts_file.read_text()
        lines = parse_prompt_lines(text, defaults)
    except (ConfigError, InputError, OSError, ValueError) as exc:
        print(f"pdserve generate: {exc}", file=sys.stderr)
        return 2

    from pdserve.offline_engine import OfflineEngine, make_request
    from tokenizer_svc.request_detokenizer import RequestDetokenizer
    from tokenizer_svc.tokenizer import Tokenizer

    engine = OfflineEngine(model, cache, sched)
    tokenizer = Tokenizer.from_dir(engine.runner.hf_dir, name=model.model, chat_template=model.chat_template)
    requests, errors = [], []
    for index, (line, params) in enumerate(lines):
        try:
            ids = tokenizer.encode(line.prompt) if line.prompt is not None else tokenizer.apply_chat_template(line.messages)
            if len(ids) >= engine.max_model_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens but the model's context is {engine.max_model_len}"
                )
            params.validate(engine.runner.vocab_size)
        except ValueError as exc:
            errors.append(f"prompt {index + 1}: {exc}")
            continue
        requests.append(make_request(str(index), ids, params, tokenizer.eos_token_ids, line.priority))
    if errors:
        print("pdserve generate: " + "\n".join(errors), file=sys.stderr)
        return 2

    # Text comes out as the service's detokenizer makes it: incrementally, with stop strings
    # held back and matched, and a match ends the request at once.
    texts = {r.request_id: [] for r in requests}
    detoks = {r.request_id: RequestDetokenizer(tokenizer, DetokRequest(
        r.request_id, "", 0, r.prompt_token_ids[-DETOK_PROMPT_TAIL:], len(r.prompt_token_ids), r.params,
    )) for r in requests}

    def on_output(output: RequestOutput) -> bool:
        detok = detoks[output.request_id]
        delta = detok.step(output)
        if delta is not None:
            texts[output.request_id].append(delta.text)
        return detok.matched_stop is not None

    start = time.perf_counter()
    completions = engine.generate(requests, on_output)
    seconds = time.perf_counter() - start
    out = sys.stdout
    for index, c in enumerate(completions):
        text_out = "".join(texts[c.request_id])
        record = {
            "index": index,
            "prompt_token_ids": c.prompt_token_ids,
            "token_ids": c.token_ids,
            "text": text_out,
            "finish_reason": c.finish_reason.openai_name if c.finish_reason is not None else None,
        }
        if c.logprobs:
            record["logprobs"] = [
                {"token_id": int(lp.token_ids[0, 0]), "logprob": float(lp.logprobs[0, 0]),
                 "rank": int(lp.ranks[0]),
                 "top": [[int(t), float(v)] for t, v in zip(lp.token_ids[0, 1:], lp.logprobs[0, 1:])]}
                for lp in c.logprobs
            ]
        if args.json:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write(f"[{index}] ({record['finish_reason']}) {text_out}\n")
    out.flush()
    prompt_tokens = sum(len(c.prompt_token_ids) for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    stats = {
        "generation_seconds": round(seconds, 4),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "tokens_per_second": round(generated / seconds, 2) if seconds > 0 else 0.0,
    }
    print(json.dumps(stats), file=sys.stderr)
    return 0
