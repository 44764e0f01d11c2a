"""Where the server says the time went: phase histograms scraped from /metrics around a run.

pdserve (and vLLM, under its own prefix) export per-request phase histograms; the difference of
their sums and counts between two scrapes gives each phase's mean over the run's requests. In
pdserve the first token is sampled on the prefill worker, so TTFT = queue + prefill (+ network
and detokenization); a disaggregated request's KV transfer delays its second token instead.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PHASES = {  # name in the report -> histogram (pdserve name; vLLM's uses the vllm: prefix)
    "queue": "request_queue_time_seconds",
    "prefill": "request_prefill_time_seconds",
    "kv_transfer": "request_kv_transfer_time_seconds",
    "decode": "request_decode_time_seconds",
}
COUNTERS = {"kv_transfers": "kv_transfers", "kv_transfer_bytes": "kv_transfer_bytes"}


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """Sums and counts of the phase histograms and the transfer counters; None if the server
    has no /metrics or none of them."""
    try:
        response = await client.get(f"{base_url}/metrics")
        if response.status_code != 200:
            return None
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    values: dict[str, float] = {}
    for family in families:
        name = family.name.split(":", 1)[-1]
        for sample in family.samples:
            sample_name = sample.name.split(":", 1)[-1]
            if name in PHASES.values() and sample_name in (f"{name}_sum", f"{name}_count"):
                values[sample_name] = values.get(sample_name, 0.0) + sample.value
            elif name in COUNTERS.values() and sample_name == f"{name}_total":
                if name == "kv_transfers" and sample.labels.get("outcome", "ok") != "ok":
                    continue
                values[name] = values.get(name, 0.0) + sample.value
    return values or None


def breakdown(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Mean milliseconds per phase over the requests finished between the scrapes, and the KV
    transfers (count, MiB) in that time."""
    if before is None or after is None:
        return None
    out: dict[str, Any] = {}
    for phase, metric in PHASES.items():
        count = after.get(f"{metric}_count", 0.0) - before.get(f"{metric}_count", 0.0)
        total = after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)
        out[f"{phase}_mean_ms"] = 1000.0 * total / count if count > 0 else None
        out[f"{phase}_requests"] = int(count)
    out["kv_transfers"] = int(after.get("kv_transfers", 0.0) - before.get("kv_transfers", 0.0))
    out["kv_transfer_mib"] = (after.get("kv_transfer_bytes", 0.0) - before.get("kv_transfer_bytes", 0.0)) / 2**20
    return out


async def scrape_workers(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """Steps and seconds summed over the workers in /workers (None without that endpoint)."""
    try:
        response = await client.get(f"{base_url}/workers")
        workers = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(workers, list):
        return None
    keys = ("steps", "busy_seconds", "gpu_seconds", "gpu_gap_seconds")
    return {k: float(sum(w.get(k) or 0.0 for w in workers)) for k in keys}


def worker_use(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Steps run, their device time and the device's idle time between back-to-back steps
    during the run (the gap a worker's host work leaves; CUDA workers only)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    gpu, gap = d["gpu_seconds"], d["gpu_gap_seconds"]
    return {"steps": int(d["steps"]), "busy_seconds": d["busy_seconds"], "gpu_seconds": gpu,
            "gpu_gap_seconds": gap, "gpu_idle_fraction": gap / (gpu + gap) if gpu + gap > 0 else None}


def format_rows(phases: dict[str, Any]) -> list[tuple[str, str]]:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return [
        ("Server mean queue time (ms)", ms(phases["queue_mean_ms"])),
        ("Server mean prefill time (ms)", ms(phases["prefill_mean_ms"])),
        ("Server mean KV transfer time (ms)", ms(phases["kv_transfer_mean_ms"])),
        ("Server mean decode time (ms)", ms(phases["decode_mean_ms"])),
        ("KV transfers", str(phases["kv_transfers"])),
        ("KV transferred (MiB)", f"{phases['kv_transfer_mib']:.1f}"),
    ] + _worker_rows(phases.get("workers"))


def _worker_rows(use: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not use:
        return []
    rows = [("Worker steps", str(use["steps"]))]
    if use["gpu_idle_fraction"] is not None:
        rows += [("GPU time in steps (s)", f"{use['gpu_seconds']:.2f}"),
                 ("GPU idle between steps (s)", f"{use['gpu_gap_seconds']:.3f}"),
                 ("GPU idle between steps (%)", f"{100 * use['gpu_idle_fraction']:.1f}")]
    return rows
