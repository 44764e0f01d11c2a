"""GatewayMetrics: names under --metrics-prefix, vLLM's labels, and what SchedulerStats feed."""

from __future__ import annotations

import re

from gateway.metrics import GatewayMetrics, one_two_five_buckets
from protocol.messages import RequestPhases, SchedulerStats


def _stats(**kw) -> SchedulerStats:
    return SchedulerStats(1.0, "m", 2048, 1, 2, 0.5, kw.pop("queries", 0), kw.pop("hits", 0), **kw)


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    assert m, series
    return float(m.group(2))


def test_vllm_prefix_names_labels_and_values():
    metrics = GatewayMetrics("smol", "vllm")
    metrics.observe_stats(_stats(
        queries=100, hits=40, num_preemptions=2, step_tokens=[1, 300],
        phases=[RequestPhases(0.1, 0.2, 0.0, 1.0, num_prompt_tokens=12, num_output_tokens=5)],
        cache_info={"block_size": "16", "num_gpu_blocks": "99", "enable_prefix_caching": "True"}))
    metrics.observe_stats(_stats(queries=150, hits=40, num_preemptions=2))
    metrics.update_from(_stats(queries=150, hits=40))
    metrics.inter_token(0.02)
    metrics.request_done(2, None, 7)
    metrics.request_done(1, 64, 3)
    text = metrics.render().decode()
    assert _value(text, "vllm:inter_token_latency_seconds_count") == 1
    assert _value(text, "vllm:time_per_output_token_seconds_count") == 1
    assert _value(text, "vllm:request_params_n_sum") == 3
    assert _value(text, "vllm:request_params_max_tokens_count") == 1  # only when given
    assert _value(text, "vllm:request_max_num_generation_tokens_sum") == 10
    assert "pdserve:" not in text
    assert _value(text, "vllm:prefix_cache_queries_total") == 150
    assert _value(text, "vllm:prefix_cache_hits_total") == 40
    assert _value(text, "vllm:num_preemptions_total") == 2
    assert _value(text, "vllm:num_requests_waiting") == 2
    assert _value(text, "vllm:iteration_tokens_total_count") == 2
    assert _value(text, "vllm:iteration_tokens_total_sum") == 301
    assert _value(text, "vllm:request_prompt_tokens_sum") == 12
    assert _value(text, "vllm:request_generation_tokens_sum") == 5
    assert abs(_value(text, "vllm:request_time_per_output_token_seconds_sum") - 0.25) < 1e-9
    assert abs(_value(text, "vllm:request_inference_time_seconds_sum") - 1.2) < 1e-9
    assert re.search(r'^vllm:num_requests_running\{engine="0",model_name="smol"\} 1\.0$', text, re.M)
    info = re.findall(r"^vllm:cache_config_info\{(.*)\} 1\.0$", text, re.M)
    assert len(info) == 1 and 'block_size="16"' in info[0] and 'num_gpu_blocks="99"' in info[0]


def test_default_prefix_and_token_buckets():
    text = GatewayMetrics("m").render().decode()
    assert "pdserve:time_to_first_token_seconds" in text and "vllm:" not in text
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def test_grafana_dashboard_charts_only_series_that_exist():
    import json
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[1] / "docs/grafana/pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    charted = {m for e in exprs for m in re.findall(r"\$\{prefix\}:([a-zA-Z0-9_]+)", e)}
    assert len(charted) >= 20
    for prefix in ("pdserve", "vllm"):
        metrics = GatewayMetrics("m", prefix)
        metrics.observe_stats(_stats(cache_info={"block_size": "16"}))
        metrics.request_finished("stop")
        metrics._transfers.labels("m", "0", "zmq", "ok").inc()
        metrics._transfer_bytes.labels("m", "0", "zmq").inc()
        names = set(re.findall(r"^([a-zA-Z0-9_:]+)[{ ]", metrics.render().decode(), re.M))
        missing = {name for name in charted if f"{prefix}:{name}" not in names}
        assert not missing, (prefix, missing)
