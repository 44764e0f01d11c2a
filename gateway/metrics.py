"""Prometheus metrics of the gateway, named after vLLM's with a `pdserve:` prefix.

Latencies are measured here, where the client sees them (queue time comes from the scheduler);
gauges mirror the scheduler's latest stats. The registry belongs to the app instance, not the
process-wide default, so tests and several apps in one process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protocol.messages import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between streamed deltas",
                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Request latency, end to end",
                             labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("pdserve:request_queue_time_seconds", "Arrival to first scheduling",
                               labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.running = Gauge("pdserve:num_requests_running", "Requests running on workers",
                             labels, registry=r).labels(model_name)
        self.waiting = Gauge("pdserve:num_requests_waiting", "Requests waiting to be scheduled",
                             labels, registry=r).labels(model_name)
        self.kv_usage = Gauge("pdserve:kv_cache_usage_perc",
                              "KV blocks held by live requests / total (0..1)", labels,
                              registry=r).labels(model_name)
        self.prefix_hit_rate = Gauge("pdserve:prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / looked up",
                                     labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated",
                                         labels, registry=r).labels(model_name)
        self._success = Counter("pdserve:request_success", "Finished requests by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self._model = model_name

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def update_from(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        q = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / q if q else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
