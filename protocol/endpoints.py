"""The ZeroMQ address of every socket of the pipeline, in one struct every process shares.

ipc:// (unix sockets in a run directory) is the default: no ports to collide and no network
exposure. tcp:// on consecutive ports is there for stages on other hosts. Two processes bind the
pipeline's sockets: the scheduler (scheduler_in, worker_router, detokenizer_in) and the gateway
(tokenizer_in, gateway_in); every other stage connects. Over tcp each side's sockets may live on
their own host (`scheduler_host`, `gateway_host`, e.g. compose service names), both defaulting to
`tcp_host`. The launcher owns the run directory: it decides the default (a fresh temporary
directory), hands it in, and removes `ipc_paths()` at shutdown.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import msgspec

from protocol.config import ConfigError, check_tcp_settings

# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
MAX_IPC_PATH_BYTES = 103 if sys.platform == "darwin" else 107
_IPC = "ipc://"
_TCP = "tcp://"

# Which process binds each socket (the others connect): its host is that process's host.
SOCKET_OWNER: dict[str, str] = {
    "tokenizer_in": "gateway",
    "scheduler_in": "scheduler",
    "worker_router": "scheduler",
    "detokenizer_in": "scheduler",
    "gateway_in": "gateway",
}


class Endpoints(msgspec.Struct, frozen=True, kw_only=True):
    """One address per socket; field order is the tcp port order."""

    tokenizer_in: str  # gateway <-> tokenizers (ROUTER bound by the gateway, DEALER tokenizers)
    scheduler_in: str  # gateway, tokenizers, detokenizers -> scheduler (PULL bound by the scheduler)
    worker_router: str  # scheduler <-> workers (ROUTER bound by the scheduler, DEALER workers)
    detokenizer_in: str  # scheduler <-> detokenizers (ROUTER bound by the scheduler)
    gateway_in: str  # tokenizers, detokenizers, scheduler -> gateway (PULL bound by the gateway)

    def __post_init__(self) -> None:
        for name, address in self.items():
            if address.startswith(_IPC):
                check_ipc_path(name, Path(address[len(_IPC):]))

    @classmethod
    def ipc(cls, run_dir: Path | str) -> Endpoints:
        """`ipc://{run_dir}/{name}.sock` for each socket; run_dir is made absolute, not created."""
        base = Path(os.path.abspath(run_dir))
        return cls(**{name: f"{_IPC}{base / f'{name}.sock'}" for name in field_names()})

    @classmethod
    def tcp(
        cls, host: str | None, base_port: int, *, scheduler_host: str | None = None,
        gateway_host: str | None = None,
    ) -> Endpoints:
        """`tcp://{owner's host}:{base_port + i}` for the i-th socket in field order.

        The scheduler's sockets use `scheduler_host`, the gateway's `gateway_host`; each
        defaults to `host`.
        """
        names = field_names()
        if not 1 <= base_port <= 65536 - len(names):
            raise ConfigError(
                f"tcp_base_port must be in [1, {65536 - len(names)}] so its {len(names)} "
                f"consecutive ports fit, got {base_port}"
            )
        hosts = {"scheduler": scheduler_host or host, "gateway": gateway_host or host}
        for owner, owner_host in hosts.items():
            if not owner_host:
                raise ConfigError(
                    f"tcp needs the {owner}'s host: give tcp_host or {owner}_host (not empty)"
                )
        return cls(**{
            name: f"{_TCP}{_bracket(hosts[SOCKET_OWNER[name]])}:{base_port + i}"
            for i, name in enumerate(names)
        })

    @classmethod
    def from_settings(
        cls, run_dir: str | None, tcp_host: str | None, tcp_base_port: int | None, *,
        scheduler_host: str | None = None, gateway_host: str | None = None,
    ) -> Endpoints:
        """tcp when a port and the hosts are given; else ipc under run_dir (created if missing).

        tcp needs tcp_base_port and, for the scheduler's and the gateway's sockets each, a host:
        scheduler_host / gateway_host, or tcp_host for whichever is not given. run_dir None
        means a fresh `tempfile.mkdtemp(prefix="pdserve-")` directory; the caller then finds it
        in the returned addresses (see `ipc_paths`) and removes it at shutdown.
        """
        check_tcp_settings(tcp_host, tcp_base_port, scheduler_host, gateway_host)
        if tcp_base_port is not None:
            return cls.tcp(tcp_host, tcp_base_port, scheduler_host=scheduler_host,
                           gateway_host=gateway_host)
        if run_dir is None:
            directory = Path(tempfile.mkdtemp(prefix="pdserve-"))
        else:
            directory = Path(run_dir)
            directory.mkdir(parents=True, exist_ok=True)
        return cls.ipc(directory)

    def kv_peer_address(self, worker_id: str, kv_host: str | None = None) -> str:
        """Where a worker serves its KV blocks to other workers (it binds, peers connect).

        ipc: `kv-{worker_id}.sock` beside the other sockets. tcp: `tcp://{host}:*`, a port the
        worker picks when it binds (its WorkerHello then carries the real address); the host is
        `kv_host`, or else the scheduler's host when that is an address of this machine (one
        host, or the worker beside the scheduler), or else this machine's hostname (a container
        or another host: zmq binds the address the name resolves to here, and that address is
        what peers are told).
        """
        scheduler = self.worker_router
        if scheduler.startswith(_IPC):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)
            path = Path(scheduler[len(_IPC):]).parent / f"kv-{safe}.sock"
            check_ipc_path("kv_peer", path)
            return f"{_IPC}{path}"
        host = kv_host or own_host(_host_of(scheduler))
        return f"{_TCP}{_bracket(host)}:*"

    def items(self) -> list[tuple[str, str]]:
        """(field name, address) pairs in field order."""
        return [(name, getattr(self, name)) for name in field_names()]

    def ipc_paths(self) -> list[Path]:
        """The socket files of the ipc:// addresses, to remove at shutdown."""
        return [Path(a[len(_IPC):]) for _, a in self.items() if a.startswith(_IPC)]


def field_names() -> tuple[str, ...]:
    return Endpoints.__struct_fields__


def check_ipc_path(name: str, path: Path) -> None:
    """Raise ConfigError when `path` is too long to be a unix socket address."""
    length = len(os.fsencode(path))
    if length > MAX_IPC_PATH_BYTES:
        raise ConfigError(
            f"{name}: ipc socket path is {length} bytes, longer than the OS allows "
            f"({MAX_IPC_PATH_BYTES}): {path}; choose a shorter --run-dir or use --tcp-host"
        )


def own_host(host: str) -> str:
    """`host` when it names an address of this machine, else this machine's hostname."""
    return host if is_local_address(host) else socket.gethostname()


def is_local_address(host: str) -> bool:
    """Whether a socket can bind `host` here (every address it resolves to)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)  # port 0: nothing is taken
        except OSError:  # EADDRNOTAVAIL: another machine's address; EAFNOSUPPORT: no IPv6 here
            return False
    return bool(infos)


def _host_of(tcp_address: str) -> str:
    return tcp_address[len(_TCP):].rsplit(":", 1)[0]


def _bracket(host: str) -> str:
    """An IPv6 literal in brackets, as zmq wants it in an address."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
