"""Caches, orders, peers and the ipc/tcp `address` fixture shared by the KV-transfer tests
(tests/test_kv_transfer*.py): a source `KVPeerServer` and a destination `KVPuller` over real
ZeroMQ sockets, on CPU.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from protocol.messages import KVPull


TIMEOUT_S = 10.0
LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 8


def make_cache(num_blocks: int, dtype: torch.dtype = torch.float32, seed: int = 0,
               head_dim: int = HEAD_DIM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def order(transfer_id: int, address: str, src: list[int], dst: list[int], *,
          timeout: float = TIMEOUT_S, transport: str = "zmq") -> KVPull:
    return KVPull(transfer_id=transfer_id, request_id=f"r{transfer_id}", src_worker_id="src",
                  src_address=address, src_block_ids=src, dst_block_ids=dst, transport=transport,
                  timeout=timeout)


def shuffled_pairs(num_src: int, num_dst: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return rng.sample(range(num_src), n), rng.sample(range(num_dst), n)


def assert_copied(src: torch.Tensor, dst: torch.Tensor, before: torch.Tensor,
                  src_ids: list[int], dst_ids: list[int]) -> None:
    """dst blocks dst_ids equal src blocks src_ids; every other dst block equals `before`."""
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(dst[:, :, d], src[:, :, s]), f"dst block {d} != src block {s}"
    untouched = sorted(set(range(dst.shape[2])) - set(dst_ids))
    assert torch.equal(dst[:, :, untouched], before[:, :, untouched])


def addresses(tmp_path: Path) -> dict[str, str]:
    return {"ipc": f"ipc://{tmp_path}/kv-src.sock", "tcp": "tcp://127.0.0.1:*"}


@pytest.fixture(params=["ipc", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return addresses(tmp_path)[request.param]


async def with_peers(src: torch.Tensor, dst: torch.Tensor, address: str,
                     body: Callable[[KVPeerServer, KVPuller], Awaitable[None]],
                     server_cls: type[KVPeerServer] = KVPeerServer, **puller_kwargs) -> None:
    """Run `body` with a serving source over `src` and a puller over `dst`, then close both."""
    ctx = zmq.asyncio.Context()
    server = server_cls(src, address, ctx=ctx)
    serving = asyncio.create_task(server.run())
    puller = KVPuller(dst, ctx=ctx, **puller_kwargs)
    try:
        await body(server, puller)
    finally:
        puller.close()
        server.close()
        await asyncio.wait_for(serving, TIMEOUT_S)  # run() returns once closed
        ctx.term()


class CountingServer(KVPeerServer):
    """Counts gathers; sleeps `delay` seconds in each (a slow source: see `slow_server`)."""

    delay = 0.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gathers = 0

    def _gather(self, block_ids: list[int]) -> np.ndarray:
        time.sleep(self.delay)
        self.gathers += 1
        return super()._gather(block_ids)


def slow_server(delay: float) -> type[CountingServer]:
    return type("SlowServer", (CountingServer,), {"delay": delay})
