"""Which tokenizers are live and which requests each holds, so none is lost when one goes.

Pure (the caller supplies the clock): tokenizers are known by their routing identity on the
gateway's ROUTER socket, learned from their heartbeats. A request is held by the tokenizer it
was sent to until its first output (or its end); when that tokenizer dies (a send to it fails),
stalls (no heartbeat within the liveness timeout) or restarts (a heartbeat with a new pid), the
requests it held are handed back to be sent to another one. The scheduler ignores an AddRequest
it already has, so a request the dead tokenizer had already passed on does not run twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Tokenizer:
    pid: int
    last_seen: float
    held: set[str] = field(default_factory=set)


class TokenizerPool:
    def __init__(self, liveness_timeout: float) -> None:
        self.liveness_timeout = liveness_timeout
        self.tokenizers: dict[bytes, _Tokenizer] = {}

    def heartbeat(self, identity: bytes, pid: int, now: float) -> set[str]:
        """A tokenizer is alive; returns the requests it lost if it restarted (new pid)."""
        old = self.tokenizers.get(identity)
        if old is not None and old.pid == pid:
            old.last_seen = now
            return set()
        self.tokenizers[identity] = _Tokenizer(pid, now)
        return old.held if old is not None else set()

    def live(self, now: float) -> list[bytes]:
        return [i for i, t in self.tokenizers.items() if now - t.last_seen <= self.liveness_timeout]

    def pick(self, now: float, avoid: set[bytes] = frozenset()) -> bytes | None:  # type: ignore[assignment]
        """The live tokenizer holding the fewest requests (None if none is live)."""
        candidates = [i for i in self.live(now) if i not in avoid]
        return min(candidates, key=lambda i: len(self.tokenizers[i].held), default=None)

    def hold(self, identity: bytes, request_id: str) -> None:
        tokenizer = self.tokenizers.get(identity)
        if tokenizer is not None:
            tokenizer.held.add(request_id)

    def release(self, identity: bytes | None, request_id: str) -> None:
        """The request is past its tokenizer (it has output) or over."""
        tokenizer = self.tokenizers.get(identity) if identity is not None else None
        if tokenizer is not None:
            tokenizer.held.discard(request_id)

    def remove(self, identity: bytes) -> set[str]:
        """The tokenizer is gone: forget it, return the requests it held."""
        tokenizer = self.tokenizers.pop(identity, None)
        return tokenizer.held if tokenizer is not None else set()

    def expire(self, now: float) -> dict[bytes, set[str]]:
        """Tokenizers silent past the liveness timeout, removed, with the requests they held."""
        silent = [i for i, t in self.tokenizers.items() if now - t.last_seen > self.liveness_timeout]
        return {i: self.remove(i) for i in silent}
