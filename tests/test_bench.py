"""`pdserve bench` command line: argument parsing and errors (pure parts; the other topics are in
tests/test_bench_client.py, _report.py, _schedule.py and _datasets.py).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import math
import socket

import pytest

from pdserve.bench.command import is_local_url
from pdserve.cli import build_parser, main


# ---------------------------------------------------------------- command line

def test_cli_parses_defaults_and_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]):
    args = build_parser().parse_args(["bench"])
    assert (args.base_url, args.endpoint, args.dataset, args.request_rate) == (
        "http://127.0.0.1:8000", "chat", "random", math.inf)
    assert main(["bench", "--slo", "itl=5"]) == 2
    assert main(["bench", "--dataset", "sharegpt"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
    assert is_local_url("http://127.0.0.1:8000") and is_local_url("http://localhost:1")
    assert is_local_url("http://[::1]:8000") and not is_local_url("http://example.com")


def test_cli_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"]) == 2
    assert "cannot use" in capsys.readouterr().err
