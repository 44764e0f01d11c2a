"""KV block transport over real ZeroMQ sockets, on CPU: a cancelled pull writes nothing more (the
write gate waits for a write in progress), duplicate ids are refused, and no block is written
before the worker's earlier steps have run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from gpu_worker.kv_transfer import KVPeerServer, KVPuller
from gpu_worker.kv_transfer.wire import block_bytes
from gpu_worker.kv_transfer.write_gate import WriteGate
from protocol.messages import KVPullDone
from tests import kv_transfer_helpers
from tests.kv_transfer_helpers import (
    TIMEOUT_S,
    CountingServer,
    addresses,
    assert_copied,
    make_cache,
    order,
    shuffled_pairs,
    slow_server,
    with_peers,
)


address = kv_transfer_helpers.address  # the ipc/tcp fixture (a module attribute, so pytest finds it here)


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
