"""`pdserve probe gateway|scheduler`: a health check for one stage, exit 0 when it answers.

Container health checks run it with the stage's own PDSERVE_* variables. `gateway` asks
`http://127.0.0.1:{--port}/ready` (200: every stage is connected); `scheduler` connects to each
socket the scheduler binds (a tcp connection, or the ipc socket file), which proves its process
is up with its sockets bound. Both print why when they fail and never import torch.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request

from protocol.config import ConfigError, EndpointSettings, GatewaySettings, add_settings_arguments, settings_from
from protocol.endpoints import SOCKET_OWNER, Endpoints


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="health check of the gateway (/ready) or the scheduler (its sockets)")
    p.add_argument("stage", choices=("gateway", "scheduler"))
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default 3)")
    add_settings_arguments(p, GatewaySettings)
    add_settings_arguments(p, EndpointSettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.stage == "gateway":
            gw = settings_from(GatewaySettings, args)
            return probe_gateway(f"http://127.0.0.1:{gw.port}/ready", args.timeout)
        ep = settings_from(EndpointSettings, args)
        if ep.run_dir is None and not ep.is_tcp:
            raise ConfigError("probe scheduler needs --run-dir or the tcp settings of the stack")
        endpoints = Endpoints.from_settings(ep.run_dir, ep.tcp_host, ep.tcp_base_port,
                                            scheduler_host=ep.scheduler_host,
                                            gateway_host=ep.gateway_host)
        return probe_scheduler(endpoints, args.timeout)
    except ConfigError as exc:
        print(f"pdserve probe: {exc}", file=sys.stderr)
        return 2


def probe_gateway(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            print(resp.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as exc:  # 503 with the reason
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


def probe_scheduler(endpoints: Endpoints, timeout: float) -> int:
    for name, address in endpoints.items():
        if SOCKET_OWNER[name] != "scheduler":
            continue
        try:
            _connect(address, timeout)
        except OSError as exc:
            print(f"scheduler socket {name} ({address}): {exc}", file=sys.stderr)
            return 1
    print("scheduler sockets accept connections")
    return 0


def _connect(address: str, timeout: float) -> None:
    if address.startswith("ipc://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address[len("ipc://"):])
        return
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass
