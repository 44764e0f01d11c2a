"""KV block transport between two caches over real ZeroMQ sockets (ipc:// and tcp://), on CPU.

A destination pulls shuffled source blocks into shuffled destination blocks; the copied blocks
must equal their sources bit for bit and every other destination block must stay as it was.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from gpu_worker.kv_transfer.wire import block_bytes
from gpu_worker.kv_transfer.write_gate import WriteGate
from protocol.codec import Codec
from protocol.messages import KVIpcHandle, KVIpcHandleRequest, KVPeerReply, KVPeerRequest, KVPull, KVPullDone
from protocol.sockets import DealerSocket

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


# ---------------------------------------------------------------------------- cancel


def test_cancel_mid_transfer_stops_every_later_write(address: str) -> None:
    src, dst = make_cache(64, seed=11), make_cache(64, seed=12)
    before = dst.clone()
    src_ids, dst_ids = shuffled_pairs(64, 64, 40, seed=13)

    async def body(server: CountingServer, puller: KVPuller) -> None:
        pulling = asyncio.create_task(puller.pull(order(9, server.address, src_ids, dst_ids), "dst"))
        deadline = time.perf_counter() + TIMEOUT_S
        while torch.equal(dst, before):  # wait for the first chunk to land
            assert time.perf_counter() < deadline and not pulling.done()
            await asyncio.sleep(0.005)
        assert puller.cancel(9)
        frozen = dst.clone()
        gathers_at_cancel = server.gathers
        done: KVPullDone = await asyncio.wait_for(pulling, TIMEOUT_S)
        assert not done.ok and done.error == "cancelled"
        assert not puller.cancel(9)  # gone
        await asyncio.sleep(0.5)  # the source answers the fetches still outstanding...
        assert server.gathers > gathers_at_cancel
        assert torch.equal(dst, frozen)  # ...and none of them is written
        written = [d for d in dst_ids if not torch.equal(dst[:, :, d], before[:, :, d])]
        assert 0 < len(written) < len(dst_ids)

    asyncio.run(with_peers(src, dst, address, body, slow_server(0.05), chunk_bytes=block_bytes(src)))


def test_cancel_of_an_unknown_transfer_is_false() -> None:
    puller = KVPuller(make_cache(2))
    try:
        assert puller.cancel(123) is False
    finally:
        puller.close()


def test_write_gate_close_waits_for_the_write_in_progress() -> None:
    gate = WriteGate()
    started, release = threading.Event(), threading.Event()
    log: list[str] = []

    def slow_write() -> None:
        started.set()
        release.wait(TIMEOUT_S)
        log.append("write")

    writer = threading.Thread(target=gate.run, args=(slow_write,))
    writer.start()
    assert started.wait(TIMEOUT_S)
    closer = threading.Thread(target=lambda: (gate.close(), log.append("closed")))
    closer.start()
    time.sleep(0.05)
    assert log == []  # close() is waiting for the write
    release.set()
    writer.join(TIMEOUT_S)
    closer.join(TIMEOUT_S)
    assert log == ["write", "closed"]
    assert gate.run(lambda: log.append("late")) is False
    assert log == ["write", "closed"] and not gate.is_open


class SlowDeviceWork:
    """Stands for a CUDA event of a copy still running: synchronize() blocks until released."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.waiting = threading.Event()
        self.release = threading.Event()

    def synchronize(self) -> None:
        self.waiting.set()
        assert self.release.wait(TIMEOUT_S)
        self.log.append("device work done")


def test_write_gate_close_waits_for_device_work_a_write_left_running() -> None:
    """A cuda-ipc write returns once its copy is queued; close() (cancel) must still return only
    after that copy is done, also when a second close() comes from another thread meanwhile."""
    gate = WriteGate()
    log: list[str] = []
    work = SlowDeviceWork(log)
    assert gate.run(lambda: (log.append("queued"), work)[1]) is True
    assert log == ["queued"]  # run() returned without waiting for the device
    closers = [threading.Thread(target=lambda: (gate.close(), log.append("closed"))) for _ in range(2)]
    closers[0].start()
    assert work.waiting.wait(TIMEOUT_S)
    closers[1].start()
    time.sleep(0.05)
    assert log == ["queued"]  # neither close() has returned while the copy runs
    work.release.set()
    for closer in closers:
        closer.join(TIMEOUT_S)
    assert log == ["queued", "device work done", "closed", "closed"]
    assert gate.run(lambda: log.append("late")) is False
    assert "late" not in log


def test_cancelling_the_awaiting_task_also_stops_the_writes(tmp_path: Path) -> None:
    """A worker shutting down cancels its pulls' tasks: that propagates, and writes stop too."""
    src, dst = make_cache(32, seed=14), make_cache(32, seed=15)
    before = dst.clone()

    async def body(server: CountingServer, puller: KVPuller) -> None:
        pulling = asyncio.create_task(puller.pull(order(4, server.address, list(range(20)),
                                                        list(range(20))), "dst"))
        deadline = time.perf_counter() + TIMEOUT_S
        while torch.equal(dst, before):
            assert time.perf_counter() < deadline and not pulling.done()
            await asyncio.sleep(0.005)
        pulling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pulling
        frozen = dst.clone()
        await asyncio.sleep(0.3)
        assert torch.equal(dst, frozen)
        assert not torch.equal(dst[:, :, 19], src[:, :, 19])  # it really stopped midway
        assert not puller.cancel(4)  # forgotten

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body, slow_server(0.05),
                           chunk_bytes=block_bytes(src)))


def test_a_transfer_id_already_running_is_refused(tmp_path: Path) -> None:
    src, dst = make_cache(16), make_cache(16, seed=1)

    async def body(server: CountingServer, puller: KVPuller) -> None:
        first = asyncio.create_task(puller.pull(order(8, server.address, [0, 1, 2], [0, 1, 2]), "dst"))
        await asyncio.sleep(0.01)
        second = await puller.pull(order(8, server.address, [3], [3]), "dst")
        assert not second.ok and "already running" in second.error
        done = await asyncio.wait_for(first, TIMEOUT_S)
        assert done.ok, done.error

    asyncio.run(with_peers(src, dst, addresses(tmp_path)["ipc"], body, slow_server(0.05),
                           chunk_bytes=block_bytes(src)))
    assert torch.equal(dst[:, :, [0, 1, 2]], src[:, :, [0, 1, 2]])
    assert not torch.equal(dst[:, :, 3], src[:, :, 3])


def test_no_block_is_written_before_write_after_returns(tmp_path: Path) -> None:
    """The worker passes "the steps received before this pull have run": until then the
    destination cache stays untouched, although the fetches are already under way."""
    src, dst = make_cache(16, seed=1), make_cache(16, seed=2)
    before = dst.clone()
    src_ids, dst_ids = shuffled_pairs(16, 16, 6, seed=3)

    async def body(server: KVPeerServer, puller: KVPuller) -> None:
        released = asyncio.Event()
        asked = []

        async def steps_ran() -> None:
            asked.append(True)
            await released.wait()

        task = asyncio.create_task(puller.pull(order(3, server.address, src_ids, dst_ids), "dst", steps_ran))
        for _ in range(100):
            if asked:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert asked and not task.done() and torch.equal(dst, before)  # fetched, not written
        released.set()
        done = await asyncio.wait_for(task, TIMEOUT_S)
        assert done.ok, done.error

    asyncio.run(with_peers(src, dst, f"ipc://{tmp_path}/kv.sock", body, chunk_bytes=1))
    assert_copied(src, dst, before, src_ids, dst_ids)
