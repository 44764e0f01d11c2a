"""The chaos test's fast form (the long form is `pdserve chaos`, figures in docs/RELIABILITY.md):
random stages of a 2-tokenizer, 2-detokenizer, 2-worker stack killed or paused under streaming
load; after each fault and at the end every invariant of pdserve.chaos.runner must hold."""

from __future__ import annotations

import pytest

from pdserve.chaos.runner import ChaosRun
from tests.service_fixture import start_server

pytestmark = pytest.mark.slow


def test_random_faults_under_streaming_load(smollm2_dir, tmp_path):
    srv = start_server(smollm2_dir, tmp_path, "--tokenizers", "2", "--detokenizers", "2",
                       "--workers", "2", "--restart-workers", "--heartbeat-interval", "0.5",
                       "--liveness-timeout", "3", "--check-integrity-interval", "1")
    try:
        # 30 s, not 15: this shared CI machine runs the stack's eight processes on two cores.
        report = ChaosRun(srv.url, srv.child_pids, seed=3, concurrency=4, deadline=30.0).run(4)
        summary = report.summary()
        assert not summary["violations"], summary
        assert summary["events_survived"] == 4 and summary["finished"] > 8
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0
