"""The reliability tests' client helpers (they live in pdserve.chaos and pdserve.stack_processes,
which `pdserve chaos` uses)."""

from pdserve.chaos.client import StreamLoad, StreamOutcome, metric, read_stream, start_stream, wait_for
from pdserve.stack_processes import stage_pids

__all__ = ["LONG_CHAT", "StreamLoad", "StreamOutcome", "metric", "read_stream", "stage_pids", "start_stream",
           "wait_for"]

LONG_CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about dragons."}],
             "max_tokens": 2000, "ignore_eos": True}
