"""DetokTable, pure: which detokenizer serves a request, and what a lost one takes with it."""

from __future__ import annotations

from scheduler_svc.detok_table import DetokTable


def test_requests_go_to_the_least_loaded_detokenizer_and_leave_it_when_they_finish() -> None:
    t = DetokTable(keep_delivered=6.0)
    assert t.pick() is None
    assert not t.heartbeat(b"d0", 10, 0.0) and not t.heartbeat(b"d1", 11, 0.0)
    t.assign("a", "A", b"d0")
    assert t.pick() == b"d1" and t.of("a") == b"d0" and t.client("a") == "A"
    t.assign("b", "B", b"d1")
    t.assign("c", "B", b"d1")
    assert t.pick() == b"d0"
    t.finish("b", 1.0)
    t.finish("c", 1.0)
    assert t.load == {b"d0": 1, b"d1": 0} and t.of("b") is None and t.client("b") == "b"
    t.finish("never-assigned", 1.0)  # refused or unknown: nothing to do


def test_a_lost_detokenizer_names_its_live_requests_and_the_clients_of_lately_finished_ones() -> None:
    t = DetokTable(keep_delivered=6.0)
    t.heartbeat(b"d0", 10, 0.0)
    t.heartbeat(b"d1", 11, 0.0)
    t.assign("a", "A", b"d0")
    t.assign("b", "B", b"d0")
    t.assign("c", "C", b"d1")
    t.finish("b", 1.0)  # its last text went to d0 a moment ago
    lost, clients = t.lose(b"d0")
    assert lost == ["a"] and clients == {"A", "B"}
    assert t.pick() == b"d1" and t.of("a") is None and t.client("a") == "A"  # told, then finished
    t.finish("c", 2.0)
    t.prune(9.0)  # long delivered: a later loss tells nobody about it
    assert t.lose(b"d1") == ([], set())


def test_silence_and_restarts() -> None:
    t = DetokTable(keep_delivered=6.0)
    t.heartbeat(b"d0", 10, 0.0)
    t.heartbeat(b"d1", 11, 2.0)
    assert t.silent(3.5, 3.0) == [b"d0"]
    assert not t.heartbeat(b"d0", 10, 4.0)  # the same process
    assert t.heartbeat(b"d0", 99, 5.0)  # a new pid under its identity: it restarted
    assert t.silent(5.0, 3.0) == []
