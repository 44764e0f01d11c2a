"""The ZeroMQ address of every socket of the pipeline, in one struct every process shares.

ipc:// (unix sockets in a run directory) is the default: no ports to collide and no network
exposure. tcp:// on consecutive ports is there for workers on other hosts. The launcher owns the
run directory: it decides the default (a fresh temporary directory), hands it in, and removes
`ipc_paths()` at shutdown.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import msgspec

from protocol.config import ConfigError

# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
MAX_IPC_PATH_BYTES = 103 if sys.platform == "darwin" else 107
_IPC = "ipc://"


class Endpoints(msgspec.Struct, frozen=True, kw_only=True):
    """One address per socket; field order is the tcp port order."""

    tokenizer_in: str  # gateway -> tokenizer (PULL, bound by the tokenizer)
    scheduler_in: str  # tokenizer -> scheduler and detokenizer -> scheduler (PULL)
    worker_router: str  # scheduler <-> workers (ROUTER bound by the scheduler, DEALER workers)
    detokenizer_in: str  # scheduler -> detokenizer (PULL)
    gateway_in: str  # detokenizer -> gateway (PULL)

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
    def tcp(cls, host: str, base_port: int) -> Endpoints:
        """`tcp://{host}:{base_port + i}` for the i-th socket in field order."""
        names = field_names()
        if not 1 <= base_port <= 65536 - len(names):
            raise ConfigError(
                f"tcp_base_port must be in [1, {65536 - len(names)}] so its {len(names)} "
                f"consecutive ports fit, got {base_port}"
            )
        if not host:
            raise ConfigError("tcp_host must not be empty")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return cls(**{name: f"tcp://{host}:{base_port + i}" for i, name in enumerate(names)})

    @classmethod
    def from_settings(
        cls, run_dir: str | None, tcp_host: str | None, tcp_base_port: int | None
    ) -> Endpoints:
        """tcp when host and port are both given; else ipc under run_dir (created if missing).

        run_dir None means a fresh `tempfile.mkdtemp(prefix="pdserve-")` directory; the caller
        then finds it in the returned addresses (see `ipc_paths`) and removes it at shutdown.
        """
        if (tcp_host is None) != (tcp_base_port is None):
            raise ConfigError("tcp_host and tcp_base_port must be given together")
        if tcp_host is not None and tcp_base_port is not None:
            return cls.tcp(tcp_host, tcp_base_port)
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
        `kv_host`, or the stack's tcp host when none is given.
        """
        scheduler = self.worker_router
        if scheduler.startswith(_IPC):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_id)
            path = Path(scheduler[len(_IPC):]).parent / f"kv-{safe}.sock"
            check_ipc_path("kv_peer", path)
            return f"{_IPC}{path}"
        host = kv_host or scheduler[len("tcp://"):].rsplit(":", 1)[0]
        return f"tcp://{host}:*"

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
