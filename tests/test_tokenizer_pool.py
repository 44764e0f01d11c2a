"""TokenizerPool, pure: which tokenizer gets a request, and what comes back when one goes."""

from __future__ import annotations

from gateway.tokenizer_pool import TokenizerPool


def test_requests_go_to_the_least_loaded_live_tokenizer() -> None:
    pool = TokenizerPool(liveness_timeout=3.0)
    assert pool.pick(0.0) is None
    pool.heartbeat(b"t0", 100, 0.0)
    pool.heartbeat(b"t1", 101, 0.0)
    pool.hold(b"t0", "a")
    assert pool.pick(1.0) == b"t1"
    pool.hold(b"t1", "b")
    pool.hold(b"t1", "c")
    assert pool.pick(1.0) == b"t0"
    assert pool.pick(1.0, avoid={b"t0"}) == b"t1"
    pool.release(b"t1", "b")
    pool.release(b"t1", "c")
    pool.release(None, "x")  # never sent: nothing to release
    assert pool.pick(1.0) == b"t1"


def test_a_dead_silent_or_restarted_tokenizer_hands_back_what_it_held() -> None:
    pool = TokenizerPool(liveness_timeout=3.0)
    pool.heartbeat(b"t0", 100, 0.0)
    pool.heartbeat(b"t1", 101, 0.0)
    pool.hold(b"t0", "a")
    pool.hold(b"t1", "b")
    assert pool.remove(b"t0") == {"a"} and pool.remove(b"t0") == set()  # a send to it failed
    pool.heartbeat(b"t1", 101, 2.0)
    assert pool.heartbeat(b"t1", 101, 2.5) == set()  # the same process: nothing lost
    assert pool.heartbeat(b"t1", 555, 3.0) == {"b"}  # a new pid: it restarted, "b" is lost
    assert pool.live(3.0) == [b"t1"]
    pool.hold(b"t1", "c")
    assert pool.expire(5.0) == {} and pool.live(6.5) == []
    assert pool.expire(6.5) == {b"t1": {"c"}}  # silent past the timeout (stalled)
    assert pool.pick(6.5) is None
    assert pool.heartbeat(b"t1", 555, 7.0) == set() and pool.pick(7.0) == b"t1"  # it came back
