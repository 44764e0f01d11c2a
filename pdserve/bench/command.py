"""`pdserve bench`: load-test any OpenAI-compatible server (pdserve, vLLM, SGLang).

Build the requests, resolve the model, send them on the schedule, then print the table and
write the JSON (and optionally a PNG plot). Exit status: 0 when every request succeeded,
1 when some failed, 2 for bad arguments or an unreachable server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the real imports wait for run(): `pdserve --help` stays instant
    import httpx

    from pdserve.bench.client import RequestRecord
    from pdserve.bench.datasets import BenchRequest
    from pdserve.bench.runner import RunResult

DEFAULT_RESULTS_DIR = Path("bench-results")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test an OpenAI-compatible server (streaming)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="chat = /v1/chat/completions, completions = /v1/completions (default chat)")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "sharegpt"), default="random")
    p.add_argument("--dataset-path", type=Path, help="the ShareGPT JSON file (--dataset sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default 0)")
    p.add_argument("--tokenizer", type=Path,
                   help="a Hugging Face tokenizer directory: exact token lengths (else word counts)")
    p.add_argument("--random-input-len", type=int, default=256,
                   help="prompt length: exact tokens with --tokenizer, else words (~tokens)")
    p.add_argument("--random-output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from len*(1-r)..len*(1+r), 0 <= r < 1")
    p.add_argument("--sharegpt-output-len", type=int, help="override max_tokens of ShareGPT requests")
    p.add_argument("--num-prefixes", type=int, default=4,
                   help="shared-prefix: distinct shared system prompts (default 4)")
    p.add_argument("--prefix-len", type=int, default=512,
                   help="shared-prefix: length of each shared prompt, like --random-input-len (default 512)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf = all at once)")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate max_tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit in s (default 600)")
    p.add_argument("--max-duration", type=float, default=3600.0,
                   help="stop sending and cancel what is in flight after this many s (default 3600)")
    p.add_argument("--slo", help='goodput SLOs in ms, e.g. "ttft=500,tpot=50" (ttft, tpot, e2e)')
    p.add_argument("--output-json", type=Path,
                   help="results file (default bench-results/bench-<timestamp>.json)")
    p.add_argument("--plot", type=Path, help="also write a PNG of latency distributions")
    p.set_defaults(run=run)


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    from pdserve.bench.datasets import random_requests, shared_prefix_requests, sharegpt_requests

    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, tokenizer)
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(args.num_prompts, args.num_prefixes, args.prefix_len,
                                      args.random_input_len, args.random_output_len,
                                      args.random_range_ratio, args.seed, tokenizer)
    if args.dataset_path is None:
        raise ValueError("--dataset sharegpt needs --dataset-path")
    requests = sharegpt_requests(args.dataset_path, args.num_prompts, args.seed, tokenizer,
                                 args.sharegpt_output_len)
    if not requests:
        raise ValueError(f"{args.dataset_path}: no conversation passed the length filter")
    if len(requests) < args.num_prompts:
        print(f"pdserve bench: only {len(requests)} of {args.num_prompts} ShareGPT prompts pass "
              "the length filter", file=sys.stderr)
    return requests


def is_local_url(url: str) -> bool:
    """Loopback hosts skip proxy settings from the environment (a proxy cannot reach them)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data or "id" not in data[0]:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def bench(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[str, RunResult]:
    import httpx

    from pdserve.bench import server_phases
    from pdserve.bench.client import ENDPOINT_PATHS, build_payload, send_request, stream_session
    from pdserve.bench.runner import poisson_arrival_times, run_schedule

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    trust_env = not is_local_url(base_url)
    # httpx for the few plain GETs around the run, aiohttp for the streams (see bench.client)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout), trust_env=trust_env) as client, \
            stream_session(args.max_concurrency, headers, trust_env) as session:
        model = args.model or await resolve_model(client, base_url)
        url = base_url + ENDPOINT_PATHS[args.endpoint]

        async def send(index: int, request: BenchRequest) -> RequestRecord:
            payload = build_payload(args.endpoint, model, request, args.ignore_eos, args.temperature)
            return await send_request(session, url, payload, index, request.prompt_len, args.timeout)

        arrivals = poisson_arrival_times(len(requests), args.request_rate, args.seed)
        before = await server_phases.scrape(client, base_url)
        workers_before = await server_phases.scrape_workers(client, base_url)
        result = await run_schedule(requests, send, arrivals, args.max_concurrency, args.max_duration)
        await asyncio.sleep(1.0)  # the server publishes its phase records about twice a second
        result.server_phases = server_phases.breakdown(before, await server_phases.scrape(client, base_url))
        use = server_phases.worker_use(workers_before, await server_phases.scrape_workers(client, base_url))
        if result.server_phases is not None and use is not None:
            result.server_phases["workers"] = use
    return model, result


def run_config(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The arguments as JSON values (request_rate inf becomes the string 'inf')."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("run", "command", "api_key", "log_level")}
    config["model"] = model
    if math.isinf(config["request_rate"]):
        config["request_rate"] = "inf"
    return config


def run(args: argparse.Namespace) -> int:
    import httpx

    from pdserve.bench import report
    from pdserve.bench.runner import poisson_arrival_times

    try:
        slo = report.parse_slo(args.slo)
        if args.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if not (args.timeout > 0 and args.max_duration > 0):
            raise ValueError("--timeout and --max-duration must be > 0")
        poisson_arrival_times(0, args.request_rate, args.seed)  # validates the rate
        requests = build_requests(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        model, result = asyncio.run(bench(args, requests))
    except (httpx.HTTPError, ValueError) as exc:
        print(f"pdserve bench: cannot use {args.base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = report.summarize(result.records, result.duration, slo, result.not_sent)
    if result.server_phases is not None:
        summary["server_phases"] = result.server_phases
    print(report.format_table(summary))
    failures = [r for r in result.records if not r.success]
    for r in failures[:5]:
        print(f"request {r.index} failed: {r.error}", file=sys.stderr)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.output_json or DEFAULT_RESULTS_DIR / f"bench-{stamp}.json"
    report.write_json(out, run_config(args, model), summary, result.records, result.start)
    print(f"results: {out}")
    if args.plot is not None:
        report.plot(args.plot, result.records, result.start)
        print(f"plot: {args.plot}")
    return 1 if failures or result.not_sent else 0
