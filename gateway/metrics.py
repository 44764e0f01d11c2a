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
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
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
        self.prefill_time = Histogram("pdserve:request_prefill_time_seconds",
                                      "First scheduling to first token (the prefill phase)",
                                      labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.decode_time = Histogram("pdserve:request_decode_time_seconds",
                                     "First token to finish, KV transfers excluded (the decode phase)",
                                     labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.transfer_time = Histogram("pdserve:request_kv_transfer_time_seconds",
                                       "KV transfer time of a disaggregated request",
                                       labels, buckets=TRANSFER_BUCKETS, registry=r).labels(model_name)
        transport = ["model_name", "transport"]
        self._transfers = Counter("pdserve:kv_transfers", "KV transfers between workers, by outcome",
                                  [*transport, "outcome"], registry=r)
        self._transfer_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes moved between workers",
                                       transport, registry=r)
        self._transfer_seconds = Histogram("pdserve:kv_transfer_latency_seconds",
                                           "Duration of one KV transfer", transport,
                                           buckets=TRANSFER_BUCKETS, registry=r)
        self._cumulative = {
            "num_migrations": Counter("pdserve:request_migrations",
                                      "Requests moved off a dead or draining worker, or after a "
                                      "failed transfer", labels, registry=r).labels(model_name),
            "num_preemptions": Counter("pdserve:num_preemptions", "Requests preempted (recomputed "
                                       "later) for lack of KV blocks", labels, registry=r).labels(model_name),
            "integrity_checks": Counter("pdserve:kv_integrity_checks", "Full checks of every "
                                        "worker's KV accounting", labels, registry=r).labels(model_name),
            "integrity_failures": Counter("pdserve:kv_integrity_failures", "KV accounting checks "
                                          "that failed (a bug)", labels, registry=r).labels(model_name),
        }
        self._last: dict[str, int] = {}
        self._model = model_name

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def update_from(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        q = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / q if q else 0.0)

    def observe_stats(self, stats: SchedulerStats) -> None:
        """Called for every SchedulerStats: its transfer and phase records arrive once each."""
        for t in stats.transfers:
            self._transfers.labels(self._model, t.transport, "ok" if t.ok else "failed").inc()
            if t.ok:
                self._transfer_bytes.labels(self._model, t.transport).inc(t.num_bytes)
                self._transfer_seconds.labels(self._model, t.transport).observe(t.seconds)
        for ph in stats.phases:
            self.prefill_time.observe(ph.prefill_seconds)
            self.decode_time.observe(ph.decode_seconds)
            if ph.disaggregated:
                self.transfer_time.observe(ph.transfer_seconds)
        for name, counter in self._cumulative.items():
            value = getattr(stats, name)
            grown = value - self._last.get(name, 0)
            if grown > 0:  # a restarted scheduler counts from 0 again: resume from its value
                counter.inc(grown)
            self._last[name] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)
