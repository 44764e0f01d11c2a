"""The promise behind KVCancel: once a transfer is closed, none of its writes runs again.

Writes run on a worker thread (torch releases the GIL, the event loop keeps serving), so
cancelling the coroutine that awaits a write does not stop the write itself. Each write therefore
runs inside the gate's lock and only while the gate is open; `close()` takes the same lock, so it
returns only after a write in progress has finished (a CUDA write is synchronized inside the lock)
and every later write sees the gate shut and does nothing. After that the scheduler may hand the
blocks to another request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True

    def run(self, write: Callable[[], None]) -> bool:
        """Run `write` if the gate is still open; False if it was closed (nothing written)."""
        with self._lock:
            if not self._open:
                return False
            write()
            return True

    def close(self) -> None:
        """Shut the gate, waiting for a write in progress (at most one chunk's copy)."""
        with self._lock:
            self._open = False

    @property
    def is_open(self) -> bool:
        return self._open
