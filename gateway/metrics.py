"""Prometheus metrics of the gateway, named as vLLM v1 names them, under a chosen prefix.

`--metrics-prefix` (default `pdserve`) is the part before the colon: `vllm` gives vLLM's exact
names (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...), so dashboards
built for vLLM work unchanged. Every series carries vLLM's labels `model_name` and `engine`
("0": pdserve's one scheduler is one engine core). Series vLLM has no equivalent for (KV
transfers, migrations, integrity checks) keep pdserve's names under the same prefix.

Latencies are measured here, where the client sees them (TTFT, inter-token latency,
end-to-end); queue, prefill, decode and inference times, per-request token counts and tokens per
step come from the scheduler's stats (`SchedulerStats.phases`, `step_tokens`), once per request
or step; gauges and cumulative counters mirror its latest stats. The registry belongs to the app
instance, so tests and several apps in one process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protocol.messages import SchedulerStats

ENGINE = "0"
# vLLM v1's buckets, so histogram_quantile panels built for vLLM read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


TOKEN_COUNT_BUCKETS = one_two_five_buckets(1_000_000)


class GatewayMetrics:
    def __init__(self, model_name: str, prefix: str = "pdserve") -> None:
        self.registry = CollectorRegistry()
        self._model = model_name
        self._prefix = prefix
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Time between streamed deltas",
                                   TOKEN_TIME_BUCKETS)
        # vLLM's older name of the same thing (deprecated there, still charted by its dashboards)
        self.tpot = self._histogram("time_per_output_token_seconds", "Time between streamed deltas",
                                    TOKEN_TIME_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Request latency, end to end",
                                   REQUEST_TIME_BUCKETS)
        self.queue = self._histogram("request_queue_time_seconds", "Arrival to first scheduling",
                                     REQUEST_TIME_BUCKETS)
        self.prefill_time = self._histogram("request_prefill_time_seconds",
                                            "First scheduling to first token (the prefill phase)",
                                            REQUEST_TIME_BUCKETS)
        self.decode_time = self._histogram("request_decode_time_seconds",
                                           "First token to finish, KV transfers excluded (the decode phase)",
                                           REQUEST_TIME_BUCKETS)
        self.inference_time = self._histogram("request_inference_time_seconds",
                                              "First scheduling to finish (the running phase)",
                                              REQUEST_TIME_BUCKETS)
        self.time_per_output_token = self._histogram(
            "request_time_per_output_token_seconds",
            "Per request: decode time / (generated tokens - 1)", TOKEN_TIME_BUCKETS)
        self.request_prompt_tokens = self._histogram("request_prompt_tokens", "Prompt tokens per request",
                                                     TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = self._histogram("request_generation_tokens",
                                                         "Generated tokens per request", TOKEN_COUNT_BUCKETS)
        self.iteration_tokens = self._histogram("iteration_tokens_total",
                                                "Tokens scheduled per step (prefill chunks + decodes)",
                                                ITERATION_TOKEN_BUCKETS)
        self.params_n = self._histogram("request_params_n", "The n request parameter", (1, 2, 5, 10, 20))
        self.params_max_tokens = self._histogram("request_params_max_tokens",
                                                 "The max_tokens request parameter, when given",
                                                 TOKEN_COUNT_BUCKETS)
        self.max_generation_tokens = self._histogram("request_max_num_generation_tokens",
                                                     "Most tokens generated by one choice of a request",
                                                     TOKEN_COUNT_BUCKETS)
        self.transfer_time = self._histogram("request_kv_transfer_time_seconds",
                                             "KV transfer time of a disaggregated request", TRANSFER_BUCKETS)
        self.running = self._gauge("num_requests_running", "Requests running on workers")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = self._gauge("kv_cache_usage_perc", "KV blocks held by live requests / total (0..1)")
        self.prefix_hit_rate = self._gauge("prefix_cache_hit_rate",
                                           "Prompt tokens served from the prefix cache / looked up")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated")
        labels = ["model_name", "engine"]
        self._success = Counter(self._name("request_success"), "Finished requests by finish reason",
                                [*labels, "finished_reason"], registry=self.registry)
        transport = [*labels, "transport"]
        self._transfers = Counter(self._name("kv_transfers"), "KV transfers between workers, by outcome",
                                  [*transport, "outcome"], registry=self.registry)
        self._transfer_bytes = Counter(self._name("kv_transfer_bytes"), "KV bytes moved between workers",
                                       transport, registry=self.registry)
        self._transfer_seconds = Histogram(self._name("kv_transfer_latency_seconds"),
                                           "Duration of one KV transfer", transport,
                                           buckets=TRANSFER_BUCKETS, registry=self.registry)
        self._cache_info = Gauge(self._name("cache_config_info"), "Information of the KV cache config",
                                 ["block_size", "cache_dtype", "enable_prefix_caching",
                                  "gpu_memory_utilization", "num_gpu_blocks", "num_cpu_blocks", "engine"],
                                 registry=self.registry)
        self._cache_labels: dict[str, str] | None = None
        # SchedulerStats field -> counter: the scheduler's totals become counter increments.
        self._cumulative = {
            "num_migrations": self._counter("request_migrations", "Requests moved off a dead or "
                                            "draining worker, or after a failed transfer"),
            "num_preemptions": self._counter("num_preemptions", "Requests preempted (recomputed later) "
                                             "for lack of KV blocks"),
            "prefix_cache_queries": self._counter("prefix_cache_queries", "Prefix cache queries, in "
                                                  "prompt tokens looked up"),
            "prefix_cache_hits": self._counter("prefix_cache_hits", "Prefix cache hits, in prompt "
                                               "tokens found"),
            "integrity_checks": self._counter("kv_integrity_checks", "Full checks of every worker's KV "
                                              "accounting"),
            "integrity_failures": self._counter("kv_integrity_failures", "KV accounting checks that "
                                                "failed (a bug)"),
        }
        self._last: dict[str, int] = {}

    def _name(self, suffix: str) -> str:
        return f"{self._prefix}:{suffix}"

    def _histogram(self, suffix: str, doc: str, buckets: tuple) -> Histogram:
        return Histogram(self._name(suffix), doc, ["model_name", "engine"], buckets=buckets,
                         registry=self.registry).labels(self._model, ENGINE)

    def _gauge(self, suffix: str, doc: str) -> Gauge:
        return Gauge(self._name(suffix), doc, ["model_name", "engine"],
                     registry=self.registry).labels(self._model, ENGINE)

    def _counter(self, suffix: str, doc: str) -> Counter:
        return Counter(self._name(suffix), doc, ["model_name", "engine"],
                       registry=self.registry).labels(self._model, ENGINE)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model, ENGINE, reason).inc()

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.tpot.observe(seconds)

    def request_done(self, n: int, max_tokens: int | None, most_generated: int) -> None:
        """A client request's last choice finished: its parameters and longest choice."""
        self.params_n.observe(n)
        if max_tokens:
            self.params_max_tokens.observe(max_tokens)
        self.max_generation_tokens.observe(most_generated)

    def update_from(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        q = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / q if q else 0.0)

    def observe_stats(self, stats: SchedulerStats) -> None:
        """Called for every SchedulerStats: its transfer, phase and step records arrive once each."""
        for t in stats.transfers:
            self._transfers.labels(self._model, ENGINE, t.transport, "ok" if t.ok else "failed").inc()
            if t.ok:
                self._transfer_bytes.labels(self._model, ENGINE, t.transport).inc(t.num_bytes)
                self._transfer_seconds.labels(self._model, ENGINE, t.transport).observe(t.seconds)
        for ph in stats.phases:
            self.prefill_time.observe(ph.prefill_seconds)
            self.decode_time.observe(ph.decode_seconds)
            self.inference_time.observe(ph.prefill_seconds + ph.transfer_seconds + ph.decode_seconds)
            self.request_prompt_tokens.observe(ph.num_prompt_tokens)
            self.request_generation_tokens.observe(ph.num_output_tokens)
            if ph.num_output_tokens > 1:
                self.time_per_output_token.observe(ph.decode_seconds / (ph.num_output_tokens - 1))
            if ph.disaggregated:
                self.transfer_time.observe(ph.transfer_seconds)
        for tokens in stats.step_tokens:
            self.iteration_tokens.observe(tokens)
        for name, counter in self._cumulative.items():
            value = getattr(stats, name)
            grown = value - self._last.get(name, 0)
            if grown > 0:  # a restarted scheduler counts from 0 again: resume from its value
                counter.inc(grown)
            self._last[name] = value
        self._set_cache_info(stats.cache_info)

    def _set_cache_info(self, info: dict[str, str]) -> None:
        """`cache_config_info`: a gauge at 1 whose labels are the cache config (vLLM's Info)."""
        if not info or info == self._cache_labels:
            return
        labels = {name: info.get(name, "") for name in self._cache_info._labelnames if name != "engine"}
        self._cache_info.clear()
        self._cache_info.labels(**labels, engine=ENGINE).set(1)
        self._cache_labels = dict(info)

    def render(self) -> bytes:
        return generate_latest(self.registry)
