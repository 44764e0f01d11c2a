"""What stages need to run in containers: ids unique without configuration, the scheduler's and
the gateway's hosts named separately (compose service names), a KV peer address a container
can bind, and a health probe per bound stage."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from pdserve.launcher import tcp_flags
from pdserve.probe_command import probe_scheduler
from pdserve.stage_commands import endpoints_of
from protocol import endpoints as endpoints_module
from protocol.codec import Codec
from protocol.config import ConfigError, EndpointSettings, add_settings_arguments, settings_from
from protocol.endpoints import SOCKET_OWNER, Endpoints, is_local_address, own_host
from protocol.liveness import default_stage_id
from protocol.messages import StageHeartbeat
from protocol.sockets import PullSocket, PushSocket


def endpoint_settings(argv: list[str], env: dict[str, str] | None = None) -> EndpointSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, EndpointSettings)
    return settings_from(EndpointSettings, parser.parse_args(argv), env or {})


def free_base_port() -> int:
    """A port the OS just handed out, moved down so that its five consecutive ports fit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return min(s.getsockname()[1], 65000)


# ---------------------------------------------------------------- stage ids


def test_default_stage_id_is_stage_hostname_pid() -> None:
    assert default_stage_id("tokenizer") == f"tokenizer-{socket.gethostname()}-{os.getpid()}"
    assert default_stage_id("detokenizer", "detok-a") == "detok-a"


def test_default_ids_differ_between_containers_where_every_pid_is_1(monkeypatch) -> None:
    ids = set()
    monkeypatch.setattr(os, "getpid", lambda: 1)
    for container_hostname in ("3f2a9c1d0b7e", "8be41c55aa02"):
        monkeypatch.setattr(socket, "gethostname", lambda h=container_hostname: h)
        ids |= {default_stage_id(stage) for stage in ("tokenizer", "detokenizer", "worker")}
    assert len(ids) == 6
    assert "detokenizer-8be41c55aa02-1" in ids


@pytest.mark.parametrize("module", ["tokenizer_svc.tokenizer_worker", "tokenizer_svc.detokenizer_worker",
                                    "gpu_worker.worker_process"])
def test_every_stage_takes_its_default_id_from_default_stage_id(module: str) -> None:
    source = Path(importlib.util.find_spec(module).origin).read_text()
    assert "default_stage_id(" in source
    assert "os.getpid()}\"" not in source  # no id built from the pid alone


# ---------------------------------------------------------------- per-socket hosts


def test_scheduler_and_gateway_hosts_name_their_own_sockets() -> None:
    ep = Endpoints.tcp(None, 5555, scheduler_host="scheduler", gateway_host="gateway")
    assert ep.items() == [
        ("tokenizer_in", "tcp://gateway:5555"),
        ("scheduler_in", "tcp://scheduler:5556"),
        ("worker_router", "tcp://scheduler:5557"),
        ("detokenizer_in", "tcp://scheduler:5558"),
        ("gateway_in", "tcp://gateway:5559"),
    ]
    assert {SOCKET_OWNER[name] for name, _ in ep.items()} == {"scheduler", "gateway"}


def test_one_host_overrides_tcp_host_for_its_sockets_only() -> None:
    ep = Endpoints.tcp("10.0.0.2", 7000, gateway_host="::1")
    assert ep.tokenizer_in == "tcp://[::1]:7000"
    assert ep.gateway_in == "tcp://[::1]:7004"
    assert ep.worker_router == "tcp://10.0.0.2:7002"


def test_tcp_host_alone_is_unchanged() -> None:
    assert Endpoints.from_settings(None, "127.0.0.1", 5600) == Endpoints.tcp("127.0.0.1", 5600)
    assert Endpoints.tcp("127.0.0.1", 5600).scheduler_in == "tcp://127.0.0.1:5601"


def test_settings_from_flags_and_variables() -> None:
    s = endpoint_settings(["--scheduler-host", "scheduler"],
                          {"PDSERVE_GATEWAY_HOST": "gateway", "PDSERVE_TCP_BASE_PORT": "5555"})
    assert s == EndpointSettings(scheduler_host="scheduler", gateway_host="gateway", tcp_base_port=5555)
    assert s.is_tcp
    assert endpoints_of(s) == Endpoints.tcp(None, 5555, scheduler_host="scheduler", gateway_host="gateway")
    assert tcp_flags(s) == "--tcp-base-port 5555 --scheduler-host scheduler --gateway-host gateway"


@pytest.mark.parametrize("argv, env, message", [
    (["--scheduler-host", "s", "--gateway-host", "g"], {}, "need tcp_base_port"),
    (["--scheduler-host", "s", "--tcp-base-port", "5555"], {}, "gateway_host or tcp_host"),
    (["--gateway-host", "g"], {"PDSERVE_TCP_BASE_PORT": "5555"}, "scheduler_host or tcp_host"),
    (["--tcp-host", "h"], {}, "given together"),
])
def test_incomplete_tcp_settings_are_refused(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        endpoint_settings(argv, env)


def test_one_per_socket_host_with_tcp_host_is_enough() -> None:
    s = endpoint_settings(["--tcp-host", "127.0.0.1", "--tcp-base-port", "5555",
                           "--scheduler-host", "scheduler"])
    assert endpoints_of(s).worker_router == "tcp://scheduler:5557"
    assert endpoints_of(s).gateway_in == "tcp://127.0.0.1:5559"


def test_messages_cross_sockets_bound_on_two_different_hosts() -> None:
    """The scheduler's side on one name of this machine, the gateway's on another."""
    ep = Endpoints.tcp(None, free_base_port(), scheduler_host="localhost", gateway_host="127.0.0.1")

    async def main() -> list[Any]:
        ctx = zmq.asyncio.Context()
        codec = Codec(StageHeartbeat)
        at_scheduler = PullSocket(ctx, ep.scheduler_in, codec, bind=True)
        at_gateway = PullSocket(ctx, ep.gateway_in, codec, bind=True)
        to_scheduler = PushSocket(ctx, ep.scheduler_in, codec, bind=False)
        to_gateway = PushSocket(ctx, ep.gateway_in, codec, bind=False)
        beat = StageHeartbeat("tokenizer", default_stage_id("tokenizer"), os.getpid(), "h", 1.0)
        await to_scheduler.send(beat)
        await to_gateway.send(beat)
        got = [await asyncio.wait_for(at_scheduler.recv(), 5), await asyncio.wait_for(at_gateway.recv(), 5)]
        for sock in (at_scheduler, at_gateway, to_scheduler, to_gateway):
            sock.close()
        ctx.term()
        return got

    assert asyncio.run(main()) == [
        StageHeartbeat("tokenizer", default_stage_id("tokenizer"), os.getpid(), "h", 1.0)] * 2


# ---------------------------------------------------------------- KV peer address


def test_kv_peer_address_on_one_host_is_the_stack_host() -> None:
    assert Endpoints.tcp("127.0.0.1", 5600).kv_peer_address("w") == "tcp://127.0.0.1:*"
    assert Endpoints.tcp("127.0.0.1", 5600).kv_peer_address("w", "10.1.2.3") == "tcp://10.1.2.3:*"


def test_kv_peer_address_in_a_container_is_its_own_hostname() -> None:
    """The scheduler's host is a service name (another container): bind this host instead."""
    ep = Endpoints.tcp(None, 5555, scheduler_host="192.0.2.7", gateway_host="192.0.2.8")
    assert not is_local_address("192.0.2.7")  # TEST-NET-1: never an address of this machine
    assert ep.kv_peer_address("w") == f"tcp://{socket.gethostname()}:*"
    assert own_host("name-that-does-not-resolve.invalid") == socket.gethostname()


def test_kv_peer_address_of_an_unresolvable_name_binds(monkeypatch) -> None:
    """What a worker container does: zmq binds its hostname, and the bound address is an IP."""
    monkeypatch.setattr(endpoints_module.socket, "gethostname", lambda: "localhost")
    address = Endpoints.tcp(None, 5555, scheduler_host="scheduler.invalid",
                            gateway_host="gateway.invalid").kv_peer_address("w")
    assert address == "tcp://localhost:*"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(address)
        assert sock.getsockopt(zmq.LAST_ENDPOINT).decode().startswith("tcp://127.0.0.1:")
    finally:
        sock.close(0)
        ctx.term()


# ---------------------------------------------------------------- probe


def test_probe_scheduler_fails_then_passes_once_its_sockets_are_bound() -> None:
    ep = Endpoints.tcp("127.0.0.1", free_base_port())
    assert probe_scheduler(ep, 1.0) == 1
    ctx = zmq.Context()
    bound = []
    for name, address in ep.items():
        if SOCKET_OWNER[name] == "scheduler":
            sock = ctx.socket(zmq.PULL)
            sock.bind(address)
            bound.append(sock)
    try:
        assert probe_scheduler(ep, 1.0) == 0
    finally:
        for sock in bound:
            sock.close(0)
        ctx.term()


def test_probe_command_exit_status_and_reason() -> None:
    env = {**os.environ, "PDSERVE_TCP_HOST": "127.0.0.1", "PDSERVE_TCP_BASE_PORT": "9"}
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "probe", "scheduler"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "scheduler socket scheduler_in (tcp://127.0.0.1:10)" in done.stderr
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "probe", "gateway", "--port", "9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "http://127.0.0.1:9/ready" in done.stderr
