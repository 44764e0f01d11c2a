"""How long the scheduler process waits, in one place so its event handlers and its periodic
upkeep (`service_upkeep.py`) agree."""

STATS_INTERVAL = 0.5
EARLY_ABORT_MEMORY = 60.0  # seconds an abort for a not-yet-arrived request is remembered
UNKNOWN_REPLY_INTERVAL = 1.0  # at most one WorkerUnknown per second per identity
SEND_TIMEOUT = 1.0  # seconds a send may wait for room at a stalled peer
