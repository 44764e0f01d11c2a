"""Heartbeats of pipeline stages: a coroutine each process runs beside its main loop."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from protocol.messages import StageHeartbeat


def default_stage_id(stage: str, configured: str | None = None) -> str:
    """`configured`, else `{stage}-{hostname}-{pid}`: unique across hosts and containers (where
    every stage is pid 1 but each container has its own hostname), with no configuration."""
    return configured or f"{stage}-{socket.gethostname()}-{os.getpid()}"


async def send_heartbeats(sockets: list[Any], stage: str, stage_id: str, interval: float) -> None:
    """Tell every socket's peer that this stage is alive, every `interval` seconds, forever."""
    host = socket.gethostname()
    while True:
        beat = StageHeartbeat(stage, stage_id, os.getpid(), host, time.time())
        for sock in sockets:
            await sock.send(beat)
        await asyncio.sleep(interval)
