"""`pdserve bench` reporting: summaries, goodput, SLOs, tables and plots, and the server's phase
breakdown and worker use from two scrapes (pure parts).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from pdserve.bench import report
from pdserve.bench.client import RequestRecord
from tests.bench_records import bench_record as _rec


# ---------------------------------------------------------------- metrics

RECORDS = [
    _rec(0, 0.1, 1.1, 11, [0.1] * 10, 100.0),   # tpot 0.1
    _rec(1, 0.2, 0.7, 6, [0.1] * 5, 100.5),     # tpot 0.1
    _rec(2, 0.3, 2.3, 21, [0.1] * 20, 101.0),   # tpot 0.1
    _rec(3, 0.8, 0.8, 1, [], 101.5),            # one token: no tpot
    RequestRecord(index=4, error="HTTP 500: boom", prompt_len=10, start_time=102.0, e2e=0.05),
]


def test_summarize_counts_throughput_and_percentiles():
    s = report.summarize(RECORDS, duration=4.0, slo={})
    assert (s["completed"], s["failed"], s["not_sent"]) == (4, 1, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (40, 39)
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 9.75
    assert s["total_token_throughput"] == 19.75
    ttft = s["ttft_ms"]
    assert ttft["mean"] == pytest.approx(350.0)
    assert ttft["p50"] == pytest.approx(250.0)   # linear between 200 and 300
    assert ttft["p90"] == pytest.approx(650.0)   # 300 + 0.7 * 500
    assert ttft["p99"] == pytest.approx(785.0)   # 300 + 0.97 * 500
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["tpot_ms"]["std"] == pytest.approx(0.0)
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(950.0)
    assert "goodput" not in s


def test_goodput_with_slos():
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 250.0, "tpot": 150.0})
    assert s["slo_ms"] == {"ttft": 250.0, "tpot": 150.0}
    assert s["goodput"] == 0.5 and s["goodput_fraction"] == 0.4  # requests 0 and 1 of 5
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 1000.0, "tpot": 50.0})
    assert s["goodput"] == 0.25 and s["goodput_fraction"] == 0.2  # only the one-token request
    s = report.summarize(RECORDS, duration=4.0, slo={"e2e": 1000.0})
    assert s["goodput"] == 0.5  # the 0.7 s and 0.8 s requests
    s = report.summarize(RECORDS, duration=4.0, slo={"e2e": 2400.0})
    assert s["goodput"] == 1.0 and s["goodput_fraction"] == 0.8  # all but the failed one


def test_summarize_with_no_success_has_no_distributions():
    s = report.summarize(RECORDS[4:], duration=1.0, slo={"ttft": 1.0})
    assert s["completed"] == 0 and s["ttft_ms"] == {"mean": None, "std": None, "p50": None,
                                                    "p90": None, "p99": None}
    assert s["goodput"] == 0.0 and s["goodput_fraction"] == 0.0
    assert "n/a" in report.format_table(s)


def test_parse_slo():
    assert report.parse_slo("ttft=500, TPOT=50") == {"ttft": 500.0, "tpot": 50.0}
    assert report.parse_slo(None) == {} and report.parse_slo("") == {}
    for bad in ("ttft", "itl=5", "ttft=abc", "tpot=0"):
        with pytest.raises(ValueError):
            report.parse_slo(bad)


def test_table_json_and_plot(tmp_path: Path):
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 250.0})
    table = report.format_table(s)
    assert "Successful requests" in table and "P99 TTFT (ms)" in table and "785.00" in table
    assert "Goodput (req/s) [ttft<=250ms]" in table
    out = tmp_path / "sub" / "r.json"
    report.write_json(out, {"model": "m", "request_rate": "inf"}, s, RECORDS, bench_start=100.0)
    doc = json.loads(out.read_text())
    assert doc["config"] == {"model": "m", "request_rate": "inf"}
    assert doc["summary"]["completed"] == 4
    assert [r["start_time"] for r in doc["requests"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert doc["requests"][0]["tpot"] == pytest.approx(0.1) and doc["requests"][3]["tpot"] is None
    assert doc["requests"][4]["error"] == "HTTP 500: boom"
    png = tmp_path / "plot.png"
    report.plot(png, RECORDS, bench_start=100.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_phase_breakdown_from_two_scrapes_of_gateway_metrics():
    from gateway.metrics import GatewayMetrics
    from pdserve.bench import server_phases
    from protocol.messages import RequestPhases, SchedulerStats, TransferRecord

    metrics = GatewayMetrics("m")

    async def scrape() -> dict[str, float] | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=metrics.render()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await server_phases.scrape(client, "http://server")

    def stats(phases, transfers) -> SchedulerStats:
        return SchedulerStats(0.0, "m", 100, 0, 0, 0.0, 0, 0, transfers=transfers, phases=phases)

    metrics.queue.observe(0.5)  # before the run: not counted
    metrics.observe_stats(stats([RequestPhases(0.5, 1.0, 0.0, 2.0)], []))
    before = asyncio.run(scrape())
    for q in (0.010, 0.030):
        metrics.queue.observe(q)
    metrics.observe_stats(stats([RequestPhases(0.01, 0.100, 0.004, 0.5, disaggregated=True),
                                 RequestPhases(0.03, 0.300, 0.0, 1.5)],
                                [TransferRecord("zmq", 3 * 2**20, 0.004, True),
                                 TransferRecord("zmq", 0, 1.0, False)]))
    got = server_phases.breakdown(before, asyncio.run(scrape()))
    assert got == {
        "queue_mean_ms": pytest.approx(20.0), "queue_requests": 2,
        "prefill_mean_ms": pytest.approx(200.0), "prefill_requests": 2,
        "kv_transfer_mean_ms": pytest.approx(4.0), "kv_transfer_requests": 1,
        "decode_mean_ms": pytest.approx(1000.0), "decode_requests": 2,
        "kv_transfers": 1, "kv_transfer_mib": pytest.approx(3.0),
    }
    rows = dict(server_phases.format_rows(got))
    assert rows["Server mean prefill time (ms)"] == "200.00" and rows["KV transfers"] == "1"
    assert server_phases.breakdown(None, got) is None


def test_worker_use_from_two_scrapes_of_workers():
    from pdserve.bench import server_phases

    rows = [[{"id": "w0", "steps": 10, "busy_seconds": 1.0, "gpu_seconds": 0.5, "gpu_gap_seconds": 0.1},
             {"id": "w1", "steps": 5, "busy_seconds": 2.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0}],
            [{"id": "w0", "steps": 110, "busy_seconds": 3.0, "gpu_seconds": 2.5, "gpu_gap_seconds": 0.6},
             {"id": "w1", "steps": 15, "busy_seconds": 2.5, "gpu_seconds": 1.5, "gpu_gap_seconds": 0.0}]]

    async def scrape(i: int) -> dict[str, float] | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=rows[i]))
        async with httpx.AsyncClient(transport=transport) as client:
            return await server_phases.scrape_workers(client, "http://server")

    use = server_phases.worker_use(asyncio.run(scrape(0)), asyncio.run(scrape(1)))
    assert use == {"steps": 110, "busy_seconds": pytest.approx(2.5), "gpu_seconds": pytest.approx(3.5),
                   "gpu_gap_seconds": pytest.approx(0.5), "gpu_idle_fraction": pytest.approx(0.125)}
    table = dict(server_phases._worker_rows(use))
    assert table["GPU idle between steps (%)"] == "12.5" and table["Worker steps"] == "110"
    cpu = server_phases.worker_use({"steps": 0.0, "busy_seconds": 0.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0},
                                   {"steps": 4.0, "busy_seconds": 1.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0})
    assert cpu is not None and cpu["gpu_idle_fraction"] is None
    assert dict(server_phases._worker_rows(cpu)) == {"Worker steps": "4"}
