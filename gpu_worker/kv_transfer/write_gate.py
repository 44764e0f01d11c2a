"""The promise behind KVCancel: once a transfer is closed, none of its writes runs again.

Cancelling the coroutine that awaits a write does not stop the write itself: a zmq chunk is
written on a worker thread (torch releases the GIL, the event loop keeps serving), and a cuda-ipc
copy is a kernel already queued on the GPU. Each write therefore runs inside the gate's lock and
only while the gate is open. A write may finish on return (the zmq path synchronizes its stream
inside the lock) or hand back its device work still in flight, as something with a blocking
`synchronize()` (a CUDA event recorded after the copy): the gate keeps it. `close()` takes the
same lock, so it returns only after a write in progress has returned, waits for every device
write the gate keeps, and every later write sees the gate shut and does nothing. After that the
scheduler may hand the blocks to another request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol


class Pending(Protocol):
    """Device work a write queued and did not wait for (torch.cuda.Event fits)."""

    def synchronize(self) -> None: ...


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._pending: list[Pending] = []

    def run(self, write: Callable[[], Pending | None]) -> bool:
        """Run `write` if the gate is still open; False if it was closed (nothing written). What
        `write` returns, if not None, is waited for by `close()`."""
        with self._lock:
            if not self._open:
                return False
            pending = write()
            if pending is not None:
                self._pending.append(pending)
            return True

    def close(self) -> None:
        """Shut the gate, waiting for a write in progress (at most one chunk's copy) and for the
        device work of every write run so far."""
        with self._lock:
            self._open = False
            while self._pending:
                self._pending[-1].synchronize()
                self._pending.pop()

    @property
    def is_open(self) -> bool:
        return self._open
