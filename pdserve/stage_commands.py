"""`pdserve gateway|tokenizer|detokenizer|scheduler|worker`: each stage as its own process.

Every stage takes its endpoints from --run-dir (ipc) or --tcp-host/--tcp-base-port (the
scheduler's and the gateway's hosts each overridable: --scheduler-host, --gateway-host), or the
PDSERVE_* variables; this is what `pdserve up` and docker compose run. A stage exits cleanly on
SIGTERM or SIGINT (its sockets closed, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, Awaitable, Callable

from protocol.config import (
    CacheSettings,
    ConfigError,
    EndpointSettings,
    GatewaySettings,
    LaunchSettings,
    ModelSettings,
    SchedulerSettings,
    StageSettings,
    add_settings_arguments,
    settings_from,
)
from protocol.endpoints import Endpoints

log = logging.getLogger("pdserve")

STAGE_GROUPS: dict[str, tuple[type, ...]] = {
    "gateway": (ModelSettings, GatewaySettings, LaunchSettings, StageSettings, EndpointSettings),
    "tokenizer": (ModelSettings, StageSettings, EndpointSettings),
    "detokenizer": (ModelSettings, StageSettings, EndpointSettings),
    "scheduler": (ModelSettings, CacheSettings, SchedulerSettings, StageSettings, EndpointSettings),
    "worker": (ModelSettings, CacheSettings, SchedulerSettings, StageSettings, EndpointSettings),
}
HELP = {
    "gateway": "the OpenAI-compatible HTTP gateway",
    "tokenizer": "a tokenizer worker (chat template, tokenize, validate)",
    "detokenizer": "a detokenizer worker (incremental text, stop strings)",
    "scheduler": "the central scheduler",
    "worker": "a model worker (one per GPU or CPU)",
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for stage, groups in STAGE_GROUPS.items():
        p = sub.add_parser(stage, help=HELP[stage])
        for group in groups:
            add_settings_arguments(p, group)
        p.set_defaults(run=lambda args, stage=stage: run_stage(stage, args))


def load_settings(stage: str, args: argparse.Namespace | None) -> dict[str, Any]:
    return {g.__name__: settings_from(g, args) for g in STAGE_GROUPS[stage]}


def endpoints_of(ep: EndpointSettings) -> Endpoints:
    if ep.run_dir is None and not ep.is_tcp:
        raise ConfigError(
            "stages find each other through --run-dir (ipc) or --tcp-host/--tcp-base-port "
            "(or --scheduler-host/--gateway-host with --tcp-base-port); set them (or their "
            "PDSERVE_* variables), or use `pdserve up` to start everything"
        )
    return Endpoints.from_settings(ep.run_dir, ep.tcp_host, ep.tcp_base_port,
                                   scheduler_host=ep.scheduler_host, gateway_host=ep.gateway_host)


def run_stage(stage: str, args: argparse.Namespace) -> int:
    try:
        s = load_settings(stage, args)
        endpoints = endpoints_of(s["EndpointSettings"])
    except (ConfigError, ValueError) as exc:
        print(f"pdserve {stage}: {exc}", file=sys.stderr)
        return 2
    main = _stage_main(stage, s, endpoints)
    return run_until_signal(main)


def _stage_main(stage: str, s: dict[str, Any], endpoints: Endpoints) -> Callable[[], Awaitable[None]]:
    if stage == "gateway":
        from gateway.server import serve_gateway

        return lambda: serve_gateway(s["ModelSettings"], s["GatewaySettings"], s["LaunchSettings"],
                                     s["StageSettings"], endpoints)
    if stage in ("tokenizer", "detokenizer"):
        from tokenizer_svc.torch_free import hide_torch_from_transformers

        hide_torch_from_transformers()
    if stage == "tokenizer":
        from tokenizer_svc.tokenizer_worker import serve_tokenizer

        return lambda: serve_tokenizer(s["ModelSettings"], s["StageSettings"], endpoints)
    if stage == "detokenizer":
        from tokenizer_svc.detokenizer_worker import serve_detokenizer

        return lambda: serve_detokenizer(s["ModelSettings"], s["StageSettings"], endpoints)
    if stage == "scheduler":
        from scheduler_svc.scheduler_process import SchedulerService

        return lambda: SchedulerService(s["SchedulerSettings"], s["CacheSettings"], s["StageSettings"],
                                        endpoints, s["ModelSettings"].seed).run()
    from gpu_worker.worker_process import serve_worker

    return lambda: serve_worker(s["ModelSettings"], s["CacheSettings"], s["SchedulerSettings"],
                                s["StageSettings"], endpoints)


def run_until_signal(main: Callable[[], Awaitable[None]]) -> int:
    """Run `main` on uvloop until it returns or SIGTERM/SIGINT arrives; exit status 0 on a signal."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(main())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return 0
        return 0

    try:
        return asyncio.run(runner())
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
