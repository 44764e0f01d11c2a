"""The reliability tests' client helpers (they live in pdserve.chaos, which `pdserve chaos` uses)."""

from pdserve.chaos.client import (  # noqa: F401
    StreamLoad,
    StreamOutcome,
    metric,
    read_stream,
    stage_pids,
    start_stream,
    wait_for,
)

LONG_CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about dragons."}],
             "max_tokens": 2000, "ignore_eos": True}
