"""The scheduler's table of detokenizers: which are live, which serves each request, and what a
lost one takes with it.

Pure (the caller supplies the clock). A detokenizer is known by its routing identity on the
scheduler's ROUTER socket and registers with its heartbeats; every output of a request goes to
the one chosen when the request was admitted (the least loaded). A detokenizer is lost when a
send to it fails, it falls silent past the liveness timeout, or a heartbeat comes with a new pid
(it restarted). Its live requests are then failed, and so are those whose last output it had
just been sent (kept `keep_delivered` seconds): their final text may have died with it.
"""

from __future__ import annotations


class DetokTable:
    def __init__(self, keep_delivered: float) -> None:
        self.keep_delivered = keep_delivered
        self.seen: dict[bytes, float] = {}  # identity -> last heartbeat
        self.pids: dict[bytes, int] = {}
        self.load: dict[bytes, int] = {}  # live requests per detokenizer
        self.serving: dict[str, bytes] = {}  # request id -> its detokenizer
        self.clients: dict[str, str] = {}  # request id -> the gateway's request id
        self.delivered: dict[bytes, dict[str, tuple[str, float]]] = {}  # lately finished

    def heartbeat(self, identity: bytes, pid: int, now: float) -> bool:
        """Record a heartbeat; True when it comes from a new process under a known identity (the
        caller loses the old one first)."""
        restarted = self.pids.get(identity, pid) != pid
        self.pids[identity] = pid
        self.seen[identity] = now
        self.load.setdefault(identity, 0)
        return restarted

    def pick(self) -> bytes | None:
        """The live detokenizer serving the fewest requests (None if none is live)."""
        return min(self.load, key=lambda d: self.load[d], default=None)

    def assign(self, request_id: str, client_id: str, detok: bytes) -> None:
        self.serving[request_id] = detok
        self.clients[request_id] = client_id
        self.load[detok] = self.load.get(detok, 0) + 1

    def of(self, request_id: str) -> bytes | None:
        return self.serving.get(request_id)

    def client(self, request_id: str) -> str:
        return self.clients.get(request_id, request_id)

    def finish(self, request_id: str, now: float) -> None:
        """The request ended: its last output went (or goes now) to its detokenizer."""
        client = self.clients.pop(request_id, request_id)
        detok = self.serving.pop(request_id, None)
        if detok is None:
            return
        if detok in self.load:
            self.load[detok] -= 1
        self.delivered.setdefault(detok, {})[request_id] = (client, now)

    def lose(self, detok: bytes) -> tuple[list[str], set[str]]:
        """Forget a lost detokenizer: (its live requests, the clients to tell)."""
        self.seen.pop(detok, None)
        self.load.pop(detok, None)
        lost = [rid for rid, d in self.serving.items() if d == detok]
        clients = {self.clients.get(rid, rid) for rid in lost}
        clients |= {client for client, _ in self.delivered.pop(detok, {}).values()}
        for rid in lost:
            self.serving.pop(rid, None)
        return lost, clients

    def silent(self, now: float, timeout: float) -> list[bytes]:
        return [d for d, seen in self.seen.items() if now - seen > timeout]

    def prune(self, now: float) -> None:
        for sent in self.delivered.values():
            for rid, (_, when) in list(sent.items()):
                if now - when > self.keep_delivered:
                    del sent[rid]
