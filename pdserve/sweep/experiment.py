"""A `pdserve sweep` experiment: the TOML file, read with tomllib into checked structs.

    [experiment]
    name = "p1d1-vs-mixed"
    stack = "--torch-threads 1 --max-num-batched-tokens 512"   # flags every layout shares
    repetitions = 1

    [layouts]
    mixed = "--workers 2"
    p1d1 = "--prefill-workers 1 --decode-workers 1"
    remote = { base_url = "http://10.0.0.5:8000" }            # a stack that is already running

    [workload]
    dataset = "random"          # random | sharegpt | shared-prefix
    num_prompts = 30
    input_len = 512
    output_len = 64
    range_ratio = 0.0

    [load]
    request_rates = [0.5, 1, 2]
    concurrency = []

    [slo]
    ttft_ms = 2000
    tpot_ms = 100
    attainment = 0.9            # share of requests that must meet every SLO (DistServe)

Unknown keys and wrong types are errors naming the key, so a typo never silently changes a run.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import msgspec

DATASETS = ("random", "sharegpt", "shared-prefix")


class ExperimentError(ValueError):
    """The experiment file is not valid; the message names the key."""


class Layout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    flags: list[str] = []  # `pdserve up` flags (the stack is started by the sweep)
    base_url: str | None = None  # or a running stack


class Workload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dataset: str = "random"
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    dataset_path: str | None = None  # sharegpt
    num_prefixes: int = 4  # shared-prefix: distinct system prompts
    prefix_len: int = 512  # shared-prefix: tokens of each
    seed: int = 0


class Load(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_rates: list[float] = []
    concurrency: list[int] = []


class SLO(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    attainment: float = 0.9


class Experiment(msgspec.Struct, frozen=True):
    name: str
    stack_flags: list[str]
    repetitions: int
    layouts: list[Layout]
    workload: Workload
    load: Load
    slo: SLO

    @property
    def points(self) -> list[tuple[str, float]]:
        """The load points in run order: ("rate", r) then ("concurrency", c)."""
        return [("rate", float(r)) for r in self.load.request_rates] + [
            ("concurrency", float(c)) for c in self.load.concurrency]


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "sweep"
    stack: str = ""
    repetitions: int = 1


_SECTIONS = ("experiment", "layouts", "workload", "load", "slo")


def load_experiment(path: Path | str) -> Experiment:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ExperimentError(f"{path}: {exc}") from exc
    return parse_experiment(raw)


def parse_experiment(raw: dict) -> Experiment:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ExperimentError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
    header = _convert(raw.get("experiment", {}), _Header, "experiment")
    workload = _convert(raw.get("workload", {}), Workload, "workload")
    load = _convert(raw.get("load", {}), Load, "load")
    slo = _convert(raw.get("slo", {}), SLO, "slo")
    layouts = [_layout(name, value) for name, value in raw.get("layouts", {}).items()]
    _check(header, layouts, workload, load, slo)
    return Experiment(header.name, shlex.split(header.stack), header.repetitions, layouts, workload, load, slo)


def _convert(section: object, tp: type, where: str):
    if not isinstance(section, dict):
        raise ExperimentError(f"[{where}] must be a table")
    try:
        return msgspec.convert(section, tp, strict=False)
    except msgspec.ValidationError as exc:
        raise ExperimentError(f"[{where}]: {exc}") from exc


def _layout(name: str, value: object) -> Layout:
    if isinstance(value, str):
        return Layout(name, shlex.split(value))
    if isinstance(value, dict) and set(value) == {"base_url"} and isinstance(value["base_url"], str):
        return Layout(name, [], value["base_url"].rstrip("/"))
    raise ExperimentError(f"layouts.{name} must be a string of `pdserve up` flags or {{ base_url = \"...\" }}")


def _check(header: _Header, layouts: list[Layout], w: Workload, load: Load, slo: SLO) -> None:
    if not layouts:
        raise ExperimentError("[layouts] names no layout")
    if header.repetitions < 1:
        raise ExperimentError("experiment.repetitions must be >= 1")
    if w.dataset not in DATASETS:
        raise ExperimentError(f"workload.dataset must be one of {', '.join(DATASETS)}, got {w.dataset!r}")
    if w.dataset == "sharegpt" and not w.dataset_path:
        raise ExperimentError("workload.dataset_path is needed for the sharegpt dataset")
    for key in ("num_prompts", "input_len", "output_len", "num_prefixes", "prefix_len"):
        if getattr(w, key) < 1:
            raise ExperimentError(f"workload.{key} must be >= 1")
    if not 0 <= w.range_ratio < 1:
        raise ExperimentError("workload.range_ratio must be in [0, 1)")
    if not (load.request_rates or load.concurrency):
        raise ExperimentError("[load] needs request_rates and/or concurrency")
    if any(r <= 0 for r in load.request_rates) or any(c < 1 for c in load.concurrency):
        raise ExperimentError("load.request_rates must be > 0 and load.concurrency >= 1")
    if slo.ttft_ms is None and slo.tpot_ms is None and slo.itl_ms is None:
        raise ExperimentError("[slo] needs at least one of ttft_ms, tpot_ms, itl_ms")
    if not 0 < slo.attainment <= 1:
        raise ExperimentError("slo.attainment must be in (0, 1]")
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        value = getattr(slo, key)
        if value is not None and value <= 0:
            raise ExperimentError(f"slo.{key} must be > 0")
