"""The sweep's pure parts: the experiment file and the goodput arithmetic, with exact values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench.client import RequestRecord
from pdserve.sweep.experiment import SLO, ExperimentError, load_experiment, parse_experiment
from pdserve.sweep.goodput import (
    LayoutGoodput,
    PointResult,
    attainment,
    count_workers,
    layout_goodput,
    meets,
    recommend,
)

EXAMPLE = """
[experiment]
name = "cpu"
stack = "--torch-threads 1 --max-num-batched-tokens 512"
repetitions = 2

[layouts]
mixed = "--workers 2"
p1d1 = "--prefill-workers 1 --decode-workers 1"
remote = { base_url = "http://10.0.0.5:8000/" }

[workload]
dataset = "shared-prefix"
num_prompts = 30
input_len = 64
output_len = 16
prefix_len = 256

[load]
request_rates = [0.5, 1, 2]
concurrency = [4]

[slo]
ttft_ms = 2000
tpot_ms = 100
"""


def record(ttft: float | None, e2e: float | None, out: int, itl: list[float] | None = None,
           success: bool = True) -> RequestRecord:
    return RequestRecord(index=0, success=success, output_len=out, ttft=ttft, e2e=e2e, itl=itl or [])


def test_an_experiment_file_reads_into_checked_structs(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(EXAMPLE)
    exp = load_experiment(path)
    assert exp.name == "cpu" and exp.repetitions == 2
    assert exp.stack_flags == ["--torch-threads", "1", "--max-num-batched-tokens", "512"]
    assert [(l.name, l.flags, l.base_url) for l in exp.layouts] == [
        ("mixed", ["--workers", "2"], None),
        ("p1d1", ["--prefill-workers", "1", "--decode-workers", "1"], None),
        ("remote", [], "http://10.0.0.5:8000"),
    ]
    assert (exp.workload.dataset, exp.workload.prefix_len, exp.workload.num_prefixes) == ("shared-prefix", 256, 4)
    assert exp.points == [("rate", 0.5), ("rate", 1.0), ("rate", 2.0), ("concurrency", 4.0)]
    assert (exp.slo.ttft_ms, exp.slo.tpot_ms, exp.slo.itl_ms, exp.slo.attainment) == (2000, 100, None, 0.9)


@pytest.mark.parametrize("change, message", [
    (("[slo]\nttft_ms = 2000", "[slo]\nttft_msec = 2000"), "ttft_msec"),
    (("[layouts]", "[layout]"), "unknown section(s) layout"),
    (('dataset = "shared-prefix"', 'dataset = "zipf"'), "workload.dataset must be one of"),
    (("request_rates = [0.5, 1, 2]\nconcurrency = [4]", "request_rates = []"), "needs request_rates"),
    (("request_rates = [0.5, 1, 2]", "request_rates = [0, 1]"), "must be > 0"),
    (("ttft_ms = 2000\ntpot_ms = 100", "attainment = 0.9"), "at least one of"),
    (("repetitions = 2", "repetitions = 0"), "repetitions must be >= 1"),
    (('remote = { base_url = "http://10.0.0.5:8000/" }', "remote = 3"), "layouts.remote must be"),
    (("num_prompts = 30", 'num_prompts = "many"'), "[workload]"),
])
def test_bad_experiment_files_name_the_key(change: tuple[str, str], message: str) -> None:
    import tomllib

    old, new = change
    assert old in EXAMPLE
    with pytest.raises(ExperimentError) as exc:
        parse_experiment(tomllib.loads(EXAMPLE.replace(old, new)))
    assert message in str(exc.value)


def test_a_request_meets_the_slos_only_within_every_limit() -> None:
    slo = SLO(ttft_ms=500, tpot_ms=62.5, itl_ms=120)
    assert meets(record(0.5, 0.5 + 9 * 0.0625, 10, [0.0625] * 9), slo)  # both exactly at the limit
    assert not meets(record(0.6, 1.0, 10), slo)  # TTFT 600 ms
    assert not meets(record(0.1, 0.1 + 9 * 0.07, 10), slo)  # TPOT 70 ms
    assert not meets(record(0.1, 0.2, 10, [0.01, 0.13]), slo)  # one 130 ms gap
    assert meets(record(0.1, 0.1, 1), slo)  # one token: no TPOT, no gaps
    assert not meets(record(0.1, 0.2, 10, success=False), slo)
    assert meets(record(9.0, 99.0, 10), SLO(itl_ms=10))  # only the limits given count


def test_attainment_counts_failures_as_misses() -> None:
    slo = SLO(ttft_ms=100)
    recs = [record(0.05, 0.1, 2), record(0.2, 0.3, 2), record(0.01, 0.1, 2, success=False), record(0.1, 0.2, 2)]
    assert attainment(recs, slo) == 0.5
    assert attainment([], slo) == 0.0


def test_goodput_is_the_highest_load_meeting_the_target_per_worker() -> None:
    points = [PointResult("p1d1", "rate", 0.5, (1.0, 0.95)), PointResult("p1d1", "rate", 1.0, (0.9, 0.92)),
              PointResult("p1d1", "rate", 2.0, (0.6, 0.8))]
    g = layout_goodput(points, workers=2, target=0.9)
    assert (g.goodput, g.per_worker, g.spread) == (1.0, 0.5, pytest.approx(0.02))
    none = layout_goodput([PointResult("x", "rate", 1.0, (0.5,))], workers=1, target=0.9)
    assert (none.goodput, none.per_worker) == (0.0, 0.0)
    # Attainment need not fall monotonically: the highest passing load counts.
    bumpy = [PointResult("y", "rate", 1.0, (0.95,)), PointResult("y", "rate", 2.0, (0.85,)),
             PointResult("y", "rate", 3.0, (0.91,))]
    assert layout_goodput(bumpy, workers=3, target=0.9).goodput == 3.0


def test_the_recommendation_names_the_best_per_worker_and_the_spread() -> None:
    a = LayoutGoodput("mixed", 2, 1.0, 0.5, 0.0)
    b = LayoutGoodput("p1d1", 2, 2.0, 1.0, 0.0)
    assert recommend([a, b]) == ("recommended: p1d1 (2 at the SLOs with 2 worker(s), 1 per worker); "
                                 "next: mixed (0.5 per worker), one repetition each")
    noisy = LayoutGoodput("p1d1", 2, 2.0, 1.0, 0.07)
    assert recommend([a, noisy]).endswith("attainment spread of up to 7% between repetitions")
    assert recommend([a, LayoutGoodput("m2", 4, 2.0, 0.5, 0.0)]).endswith("tied with m2")
    assert recommend([LayoutGoodput("x", 1, 0.0, 0.0, 0.0)]).startswith("no layout met the SLOs")


@pytest.mark.parametrize("flags, n", [
    ([], 1), (["--workers", "2"], 2), (["--prefill-workers", "1", "--decode-workers", "2"], 3),
    (["--workers=1", "--decode-workers", "1"], 2), (["--torch-threads", "1"], 1),
])
def test_workers_are_counted_from_the_layout_flags(flags: list[str], n: int) -> None:
    assert count_workers(flags) == n
