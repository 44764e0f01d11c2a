"""KV block transport between two caches over real ZeroMQ sockets (ipc:// and tcp://), on CPU:
pulls that succeed (failures: test_kv_transfer_failures.py; cancel: test_kv_transfer_cancel.py).

A destination pulls shuffled source blocks into shuffled destination blocks; the copied blocks
must equal their sources bit for bit and every other destination block must stay as it was.
"""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import pytest
import torch

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from gpu_worker.kv_transfer.wire import block_bytes
from tests import kv_transfer_helpers
from tests.kv_transfer_helpers import (
    TIMEOUT_S,
    CountingServer,
    addresses,
    assert_copied,
    make_cache,
    order,
    shuffled_pairs,
    with_peers,
)


address = kv_transfer_helpers.address  # the ipc/tcp fixture (a module attribute, so pytest finds it here)


# ---------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_pull_copies_exactly_the_requested_blocks(address: str, dtype: torch.dtype) -> None:
    src, dst = make_cache(32, dtype, seed=1), make_cache(40, dtype, seed=2)
    before = dst.clone()
    src_ids, dst_ids = shuffled_pairs(32, 40, 12, seed=3)

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        assert "*" not in server.address  # a tcp port was picked and reported
        done = await asyncio.wait_for(puller.pull(order(7, server.address, src_ids, dst_ids), "dst"),
                                      TIMEOUT_S)
        assert done.ok, done.error
        assert (done.worker_id, done.transfer_id, done.transport) == ("dst", 7, "zmq")
        assert done.num_bytes == 12 * block_bytes(src)
        assert done.seconds > 0
        assert puller.transports == ["zmq"]

    asyncio.run(with_peers(src, dst, address, body))
    assert_copied(src, dst, before, src_ids, dst_ids)


def test_many_blocks_travel_in_several_pipelined_chunks(tmp_path: Path) -> None:
    src, dst = make_cache(80, seed=4), make_cache(90, seed=5)
    before = dst.clone()
    src_ids, dst_ids = shuffled_pairs(80, 90, 50, seed=6)

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await puller.pull(order(1, server.address, src_ids, dst_ids), "dst")
        assert done.ok, done.error
        assert server.gathers == math.ceil(50 / 3)  # 3 blocks per chunk
        assert done.num_bytes == 50 * block_bytes(src)

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body, CountingServer,
                           chunk_bytes=3 * block_bytes(src) + 5, max_inflight=4))
    assert_copied(src, dst, before, src_ids, dst_ids)


def test_two_concurrent_pulls_from_one_source(address: str) -> None:
    src, dst = make_cache(64, torch.bfloat16, seed=7), make_cache(64, torch.bfloat16, seed=8)
    before = dst.clone()
    rng = random.Random(9)
    dst_all = rng.sample(range(64), 40)
    a_src, b_src = rng.sample(range(64), 20), rng.sample(range(64), 20)  # may overlap: reads
    a_dst, b_dst = dst_all[:20], dst_all[20:]

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        a, b = await asyncio.wait_for(asyncio.gather(
            puller.pull(order(1, server.address, a_src, a_dst), "dst"),
            puller.pull(order(2, server.address, b_src, b_dst), "dst"),
        ), TIMEOUT_S)
        assert a.ok and b.ok, (a.error, b.error)
        assert (a.transfer_id, b.transfer_id) == (1, 2)

    asyncio.run(with_peers(src, dst, address, body, chunk_bytes=2 * block_bytes(src), max_inflight=2))
    assert_copied(src, dst, before, a_src + b_src, a_dst + b_dst)


def test_an_empty_pull_succeeds_at_once(tmp_path: Path) -> None:
    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await asyncio.wait_for(puller.pull(order(3, server.address, [], []), "dst"), TIMEOUT_S)
        assert done.ok and done.num_bytes == 0

    asyncio.run(with_peers(make_cache(4), make_cache(4), addresses(tmp_path)["ipc"], body))
