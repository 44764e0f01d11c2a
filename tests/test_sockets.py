"""Real ZeroMQ sockets carry a StepResult with a large array, over ipc:// and tcp://."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from protocol.codec import Codec, CodecError
from protocol.messages import (
    FromWorker,
    Heartbeat,
    Shutdown,
    StepPlan,
    StepResult,
    TokenLogprobs,
    ToWorker,
)
from protocol.sockets import DealerSocket, PullSocket, PushSocket, RouterSocket

TIMEOUT_S = 5.0


def big_result(step_id: int) -> StepResult:
    n = 50_000
    return StepResult(
        step_id=step_id,
        worker_id="w0",
        request_ids=[f"r{i}" for i in range(3)],
        sampled_token_ids=np.arange(n, dtype=np.int64) * 7,
        logprobs=TokenLogprobs(
            token_ids=np.arange(n * 2, dtype=np.int64).reshape(n, 2),
            logprobs=np.linspace(-5, 0, n * 2, dtype=np.float32).reshape(n, 2),
            ranks=np.ones(n, dtype=np.int64),
        ),
        execute_seconds=0.5,
    )


def assert_result_equal(got: StepResult, want: StepResult) -> None:
    assert (got.step_id, got.worker_id, got.request_ids, got.execute_seconds) == (
        want.step_id, want.worker_id, want.request_ids, want.execute_seconds,
    )
    assert got.sampled_token_ids.dtype == np.int64
    assert np.array_equal(got.sampled_token_ids, want.sampled_token_ids)
    assert got.logprobs is not None and want.logprobs is not None
    for name in ("token_ids", "logprobs", "ranks"):
        g, w = getattr(got.logprobs, name), getattr(want.logprobs, name)
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), name


def addresses(tmp_path: Path) -> dict[str, str]:
    return {"ipc": f"ipc://{tmp_path}/test.sock", "tcp": "tcp://127.0.0.1:*"}


@pytest.fixture(params=["ipc", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return addresses(tmp_path)[request.param]


def test_push_pull_carries_large_arrays(address: str) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        codec: Codec[FromWorker] = Codec(FromWorker)
        pull: PullSocket[FromWorker] = PullSocket(ctx, address, codec, bind=True)
        push: PushSocket[FromWorker] = PushSocket(ctx, pull.bound_address, codec, bind=False)
        try:
            sent = [big_result(1), Heartbeat("w0", 3.0), big_result(2)]
            for msg in sent:
                await push.send(msg)
            got = [await asyncio.wait_for(pull.recv(), TIMEOUT_S) for _ in sent]
            assert isinstance(got[0], StepResult) and isinstance(got[2], StepResult)
            assert_result_equal(got[0], sent[0])  # type: ignore[arg-type]
            assert got[1] == Heartbeat("w0", 3.0)
            assert_result_equal(got[2], sent[2])  # type: ignore[arg-type]
        finally:
            push.close()
            pull.close()
            ctx.term()

    asyncio.run(main())


def test_router_dealer_both_ways(address: str) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router: RouterSocket[FromWorker, ToWorker] = RouterSocket(
            ctx, address, Codec(FromWorker), Codec(ToWorker), bind=True
        )
        dealer: DealerSocket[ToWorker, FromWorker] = DealerSocket(
            ctx, router.bound_address, Codec(ToWorker), Codec(FromWorker), bind=False,
            identity=b"worker-0",
        )
        try:
            want = big_result(9)
            await dealer.send(want)
            identity, got = await asyncio.wait_for(router.recv(), TIMEOUT_S)
            assert identity == b"worker-0"
            assert isinstance(got, StepResult)
            assert_result_equal(got, want)

            await router.send(identity, StepPlan(10, finished_request_ids=["r1"]))
            await router.send(identity, Shutdown("done"))
            assert await asyncio.wait_for(dealer.recv(), TIMEOUT_S) == StepPlan(
                10, finished_request_ids=["r1"]
            )
            assert await asyncio.wait_for(dealer.recv(), TIMEOUT_S) == Shutdown("done")
        finally:
            dealer.close()
            router.close()
            ctx.term()

    asyncio.run(main())


def test_router_refuses_unknown_identity(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router: RouterSocket[FromWorker, ToWorker] = RouterSocket(
            ctx, f"ipc://{tmp_path}/r.sock", Codec(FromWorker), Codec(ToWorker), bind=True
        )
        try:
            with pytest.raises(zmq.ZMQError):
                await router.send(b"nobody", Shutdown())
        finally:
            router.close()
            ctx.term()

    asyncio.run(main())


def test_undecodable_message_raises_codec_error(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        address = f"ipc://{tmp_path}/p.sock"
        pull: PullSocket[FromWorker] = PullSocket(ctx, address, Codec(FromWorker), bind=True)
        raw = ctx.socket(zmq.PUSH)
        raw.connect(address)
        try:
            await raw.send_multipart([b"not msgpack at all"])
            with pytest.raises(CodecError):
                await asyncio.wait_for(pull.recv(), TIMEOUT_S)
        finally:
            raw.close(linger=0)
            pull.close()
            ctx.term()

    asyncio.run(main())


def test_sockets_set_linger_and_hwm(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    push: PushSocket[FromWorker] = PushSocket(
        ctx, f"ipc://{tmp_path}/h.sock", Codec(FromWorker), bind=True, hwm=123
    )
    try:
        assert push.socket.getsockopt(zmq.LINGER) == 0
        assert push.socket.getsockopt(zmq.SNDHWM) == 123
        assert push.socket.getsockopt(zmq.RCVHWM) == 123
        assert push.bound_address == f"ipc://{tmp_path}/h.sock"
    finally:
        push.close()
        assert push.closed
        ctx.term()


def test_send_within_gives_up_on_a_missing_or_stalled_peer(tmp_path: Path) -> None:
    """A PUSH with no peer (or a peer that stopped reading) reports False after the timeout
    instead of blocking the loop that sends; once a reader is there, the message goes."""

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        address = f"ipc://{tmp_path}/within.sock"
        push = PushSocket(ctx, address, Codec(FromWorker), bind=True, hwm=1)
        try:
            started = asyncio.get_running_loop().time()
            assert not await push.send_within(Heartbeat("w0", 0.0), 0.2)  # nobody connected
            assert 0.15 < asyncio.get_running_loop().time() - started < 2.0
            pull = PullSocket(ctx, address, Codec(FromWorker), bind=False, hwm=1)
            assert await push.send_within(Heartbeat("w0", 1.0), TIMEOUT_S)
            got = await asyncio.wait_for(pull.recv(), TIMEOUT_S)
            assert isinstance(got, Heartbeat) and got.timestamp == 1.0
            sent = 0  # the reader stops reading: the queues fill, then sends give up
            while await push.send_within(Heartbeat("w0", 2.0), 0.2):
                sent += 1
                assert sent < 10_000
            pull.close()
            push.close()
            assert not await push.send_within(Heartbeat("w0", 3.0), 0.2)  # closed: False, no error
        finally:
            ctx.term()

    asyncio.run(main())
