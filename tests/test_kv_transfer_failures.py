"""KV block transport over real ZeroMQ sockets, on CPU: pulls that fail (bad ids, malformed orders,
absent or closed sources, layout mismatches, cuda-ipc on CPU, garbage) fail cleanly, without
writing, and the source keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from protocol.codec import Codec
from protocol.messages import KVIpcHandle, KVIpcHandleRequest, KVPeerReply, KVPeerRequest
from protocol.sockets import DealerSocket
from tests import kv_transfer_helpers
from tests.kv_transfer_helpers import (
    HEAD_DIM,
    TIMEOUT_S,
    addresses,
    assert_copied,
    make_cache,
    order,
    with_peers,
)


address = kv_transfer_helpers.address  # the ipc/tcp fixture (a module attribute, so pytest finds it here)


# ---------------------------------------------------------------------------- failures


def test_bad_source_block_id_fails_with_the_sources_reason(address: str) -> None:
    src, dst = make_cache(8), make_cache(8, seed=1)
    before = dst.clone()

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await asyncio.wait_for(puller.pull(order(5, server.address, [1, 99], [2, 3]), "dst"),
                                      TIMEOUT_S)
        assert not done.ok
        assert "out of range" in done.error and "99" in done.error and "src" in done.error
        # the source survived the bad request and keeps serving
        again = await asyncio.wait_for(puller.pull(order(6, server.address, [1], [2]), "dst"), TIMEOUT_S)
        assert again.ok, again.error

    asyncio.run(with_peers(src, dst, address, body))
    assert_copied(src, dst, before, [1], [2])


@pytest.mark.parametrize("src_ids,dst_ids,timeout,message", [
    ([0, 1], [0], 5.0, "2 source blocks but 1 destination blocks"),
    ([0], [8], 5.0, "destination block ids out of range"),
    ([0, 1], [3, 3], 5.0, "destination block ids repeat"),
    ([0], [1], 0.0, "timeout must be positive"),
])
def test_a_malformed_order_fails_without_writing(tmp_path: Path, src_ids, dst_ids, timeout, message) -> None:
    src, dst = make_cache(8), make_cache(8, seed=1)
    before = dst.clone()

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await puller.pull(order(1, server.address, src_ids, dst_ids, timeout=timeout), "dst")
        assert not done.ok and message in done.error

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body))
    assert torch.equal(dst, before)


def test_pull_from_a_source_that_is_not_running_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        puller = KVPuller(make_cache(4))
        try:
            start = time.perf_counter()
            done = await puller.pull(order(1, f"ipc://{tmp_path}/nobody.sock", [0], [1], timeout=0.5), "dst")
            elapsed = time.perf_counter() - start
        finally:
            puller.close()
        assert not done.ok and "timed out after 0.5 s" in done.error
        assert 0.45 <= elapsed < 1.5

    asyncio.run(main())


def test_pull_from_a_closed_source_times_out(address: str) -> None:
    src, dst = make_cache(8), make_cache(8, seed=1)

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        first = await asyncio.wait_for(puller.pull(order(1, server.address, [0], [0]), "dst"), TIMEOUT_S)
        assert first.ok, first.error
        server.close()
        before = dst.clone()
        start = time.perf_counter()
        done = await puller.pull(order(2, server.address, [1, 2], [3, 4], timeout=0.5), "dst")
        assert time.perf_counter() - start < 1.5
        assert not done.ok and "timed out after 0.5 s" in done.error
        assert torch.equal(dst, before)

    asyncio.run(with_peers(src, dst, address, body))


@pytest.mark.parametrize("src_dtype,src_head_dim,message", [
    (torch.float32, HEAD_DIM, "arrived as float32 but this cache holds bfloat16"),
    (torch.bfloat16, HEAD_DIM * 2, "shape"),
], ids=["dtype", "shape"])
def test_a_layout_mismatch_fails_cleanly(tmp_path: Path, src_dtype, src_head_dim, message) -> None:
    src = make_cache(8, src_dtype, head_dim=src_head_dim)
    dst = make_cache(8, torch.bfloat16, seed=1)
    before = dst.clone()

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await asyncio.wait_for(puller.pull(order(1, server.address, [0, 1], [2, 3]), "dst"),
                                      TIMEOUT_S)
        assert not done.ok and message in done.error and "chunk 0 from src" in done.error

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body))
    assert torch.equal(dst, before)


def test_cuda_ipc_is_refused_cleanly_on_cpu(tmp_path: Path) -> None:
    src, dst = make_cache(8), make_cache(8, seed=1)
    before = dst.clone()

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        done = await puller.pull(order(1, server.address, [0], [1], transport="cuda-ipc"), "dst")
        assert not done.ok and "cuda-ipc needs a CUDA cache" in done.error
        assert done.transport == "cuda-ipc"
        unknown = await puller.pull(order(2, server.address, [0], [1], transport="carrier-pigeon"), "dst")
        assert not unknown.ok and "unknown KV transport" in unknown.error
        # the source side answers a handle request with a reason, not silence
        peer: DealerSocket[KVPeerReply, KVPeerRequest] = DealerSocket(
            zmq.asyncio.Context.instance(), server.address, Codec(KVPeerReply), Codec(KVPeerRequest),
            bind=False)
        try:
            await peer.send(KVIpcHandleRequest("node"))
            reply = await asyncio.wait_for(peer.recv(), TIMEOUT_S)
        finally:
            peer.close()
        assert isinstance(reply, KVIpcHandle) and "not on a CUDA device" in reply.error

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body))
    assert torch.equal(dst, before)


def test_the_server_survives_garbage(tmp_path: Path) -> None:
    src, dst = make_cache(8), make_cache(8, seed=1)

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.connect(server.address)
        try:
            await raw.send_multipart([b"not msgpack"])
            await raw.send_multipart([b"\x93\x01\x02\x03"])
        finally:
            raw.close(linger=0)
        done = await asyncio.wait_for(puller.pull(order(1, server.address, [5], [6]), "dst"), TIMEOUT_S)
        assert done.ok, done.error

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body))
    assert torch.equal(dst[:, :, 6], src[:, :, 5])
