"""Ctrl-C of `pdserve up` while a worker computes a step: every process exits cleanly.

The worker's step thread used to be left computing while the interpreter shut down, and
torch's C++ runtime aborted the process ("terminate called without an active exception"). The
worker now stops its step thread after the step in flight and waits for it before exiting.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.service_fixture import start_server

pytestmark = pytest.mark.slow


def test_ctrl_c_during_a_long_prefill_leaves_no_abort(smollm2_dir, tmp_path):
    server = start_server(smollm2_dir, tmp_path, "--served-model-name", "m")
    try:
        body = {"model": "m", "prompt": "hello world " * 900, "max_tokens": 300}

        def long_request() -> None:
            try:
                httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            except httpx.HTTPError:
                pass  # the stack goes away under it

        threading.Thread(target=long_request, daemon=True).start()
        time.sleep(2.0)  # the prefill of ~1,800 tokens is running on the worker
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.stop()
    log = server.log.read_text()
    assert "terminate called" not in log, log[-2000:]
    assert code == 0, log[-2000:]
