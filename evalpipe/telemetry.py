"""Live metrics of a Ray run, through `ray.util.metrics`: one list of names, three recorders.

Every metric is declared once, in `METRICS`; `METRIC_NAMES` lists their names and `prometheus_series()` the
series Prometheus sees (Ray prefixes `ray_`, counters get `_total`, histograms `_bucket`/`_sum`/`_count`).
The Grafana dashboard in `deploy/grafana/evalpipe.json` may use only those series (a test checks it).

Where each metric is recorded, and why there:
- `driver`: everything that counts samples. The driver is the only writer of the run directory, so counting
  what it records is exact: a replica that dies mid-batch does not count its lost samples, and a re-queued
  request is not counted twice. Queue depths and in-flight counts are the dispatcher's own state.
- `replica` / `sandbox`: what only the actor sees: a replica's own throughput and batch latency, and which
  sandbox worker (and, through Ray's `NodeAddress` tag, which node) ran how many jobs.

Ray exports them on each node's metrics port (`ray.init(_metrics_export_port=...)`, or the port Ray picks)
after one report interval (`metrics_report_interval_ms`, 10 s by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from evalpipe.records import Generation, Record, SampleKey
from evalpipe.sandbox.base import JobResult

Kind = Literal["counter", "gauge", "histogram"]
Where = Literal["driver", "replica", "sandbox"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a fast token (ms) to a long request or a program at its time limit."""


class MetricSpec(Record):
    """One metric: its name as given to Ray (without the `ray_` prefix Prometheus sees) and its tags."""

    name: str
    kind: Kind
    where: Where
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


PAIR = ("model", "backend")

METRICS: tuple[MetricSpec, ...] = (
    # -- driver: recorded samples (exact), dispatcher state, latencies of recorded samples
    MetricSpec(name="evalpipe_samples_generated", kind="counter", where="driver",
               description="Generations recorded in the run directory", tags=(*PAIR, "finish_reason")),
    MetricSpec(name="evalpipe_samples_executed", kind="counter", where="driver",
               description="Executions recorded in the run directory", tags=(*PAIR, "status")),
    MetricSpec(name="evalpipe_samples_passed", kind="counter", where="driver",
               description="Recorded executions that passed", tags=PAIR),
    MetricSpec(name="evalpipe_output_tokens", kind="counter", where="driver",
               description="Output tokens of recorded generations (rate(): tokens/s)", tags=PAIR),
    MetricSpec(name="evalpipe_requests_in_flight", kind="gauge", where="driver",
               description="Generation requests sent to replicas and not yet returned", tags=PAIR),
    MetricSpec(name="evalpipe_jobs_in_flight", kind="gauge", where="driver",
               description="Programs sent to sandbox workers and not yet returned", tags=PAIR),
    MetricSpec(name="evalpipe_queue_depth", kind="gauge", where="driver",
               description="Work waiting in the driver for a free replica or sandbox worker",
               tags=(*PAIR, "stage")),
    MetricSpec(name="evalpipe_actor_restarts", kind="counter", where="driver",
               description="Replicas and sandbox workers that died and were replaced", tags=(*PAIR, "role")),
    MetricSpec(name="evalpipe_ttft_seconds", kind="histogram", where="driver",
               description="Time to first token", tags=PAIR, boundaries=LATENCY_BUCKETS_S),
    MetricSpec(name="evalpipe_tpot_seconds", kind="histogram", where="driver",
               description="Time per output token after the first", tags=PAIR, boundaries=LATENCY_BUCKETS_S),
    MetricSpec(name="evalpipe_e2e_seconds", kind="histogram", where="driver",
               description="End-to-end latency of one request", tags=PAIR, boundaries=LATENCY_BUCKETS_S),
    MetricSpec(name="evalpipe_execution_seconds", kind="histogram", where="driver",
               description="Wall time of one program", tags=PAIR, boundaries=LATENCY_BUCKETS_S),
    # -- replica: what only the actor sees
    MetricSpec(name="evalpipe_replica_tokens_per_second", kind="gauge", where="replica",
               description="Output tokens per second of the replica's last batch", tags=(*PAIR, "replica")),
    MetricSpec(name="evalpipe_replica_batch_seconds", kind="histogram", where="replica",
               description="Wall time of one generate() call in a replica", tags=PAIR,
               boundaries=LATENCY_BUCKETS_S),
    # -- sandbox worker
    MetricSpec(name="evalpipe_sandbox_jobs", kind="counter", where="sandbox",
               description="Programs run by each sandbox worker (lost ones included)", tags=("worker",)),
)  # fmt: skip
"""Every metric evalpipe exports. Add new ones here, and to the Grafana dashboard."""

METRIC_NAMES: tuple[str, ...] = tuple(spec.name for spec in METRICS)


def prometheus_series() -> frozenset[str]:
    """The series names Prometheus scrapes for `METRICS`, as Ray exports them."""
    series: set[str] = set()
    for spec in METRICS:
        base = f"ray_{spec.name}"
        if spec.kind == "counter":
            series.add(f"{base}_total")
        elif spec.kind == "histogram":
            series |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            series.add(base)
    return frozenset(series)


class _Recorder:
    """The Ray metric objects of one place (`where`), created in the process that records them.

    Creating them needs a connected Ray worker; where that fails (e.g. a Ray Client driver, which cannot
    export metrics), recording silently does nothing: metrics must never break a run.
    """

    def __init__(self, where: Where) -> None:
        self._metrics: dict[str, Any] = {}
        try:
            from ray.util import metrics
        except ImportError:
            return
        makers = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}
        for spec in METRICS:
            if spec.where != where:
                continue
            options: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.boundaries:
                options["boundaries"] = list(spec.boundaries)
            try:
                self._metrics[spec.name] = makers[spec.kind](spec.name, **options)
            except Exception:  # see the class docstring
                self._metrics.clear()
                return

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        if value > 0 and name in self._metrics:  # Ray refuses inc(0)
            self._metrics[name].inc(value, tags=tags)

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        if name in self._metrics:
            self._metrics[name].set(value, tags=tags)

    def observe(self, name: str, value: float | None, tags: dict[str, str]) -> None:
        if value is not None and math.isfinite(value) and value >= 0 and name in self._metrics:
            self._metrics[name].observe(value, tags=tags)


def pair_tags(model: str, backend: str) -> dict[str, str]:
    return {"model": model, "backend": backend}


class DriverMetrics:
    """Recorded samples, latencies and the dispatcher's state, from the driver."""

    def __init__(self) -> None:
        self._recorder = _Recorder("driver")

    def generated(self, generation: Generation) -> None:
        tags = pair_tags(generation.key.model, generation.key.backend)
        self._recorder.inc(
            "evalpipe_samples_generated", 1, {**tags, "finish_reason": generation.finish_reason}
        )
        self._recorder.inc("evalpipe_output_tokens", generation.n_output_tokens or 0, tags)
        self._recorder.observe("evalpipe_ttft_seconds", generation.ttft_s, tags)
        self._recorder.observe("evalpipe_tpot_seconds", generation.tpot_s, tags)
        self._recorder.observe("evalpipe_e2e_seconds", generation.e2e_s, tags)

    def executed(self, key: SampleKey, result: JobResult) -> None:
        tags = pair_tags(key.model, key.backend)
        self._recorder.inc("evalpipe_samples_executed", 1, {**tags, "status": result.status})
        if result.passed:
            self._recorder.inc("evalpipe_samples_passed", 1, tags)
        self._recorder.observe("evalpipe_execution_seconds", result.duration_s, tags)

    def restarted(self, role: str, model: str = "", backend: str = "") -> None:
        self._recorder.inc("evalpipe_actor_restarts", 1, {**pair_tags(model, backend), "role": role})

    def state(
        self,
        requests_in_flight: dict[tuple[str, str], int],
        jobs_in_flight: dict[tuple[str, str], int],
        queued: dict[tuple[str, str, str], int],
    ) -> None:
        """Set the gauges; every pair and stage is given, with zeros, so finished ones drop to 0."""
        for (model, backend), count in requests_in_flight.items():
            self._recorder.set("evalpipe_requests_in_flight", count, pair_tags(model, backend))
        for (model, backend), count in jobs_in_flight.items():
            self._recorder.set("evalpipe_jobs_in_flight", count, pair_tags(model, backend))
        for (model, backend, stage), count in queued.items():
            self._recorder.set("evalpipe_queue_depth", count, {**pair_tags(model, backend), "stage": stage})


class ReplicaMetrics:
    """A generation replica's own throughput and batch latency."""

    def __init__(self, model: str, backend: str, replica: int) -> None:
        self._recorder = _Recorder("replica")
        self._tags = pair_tags(model, backend)
        self._replica_tags = {**self._tags, "replica": str(replica)}

    def batch(self, generations: Iterable[Generation], seconds: float) -> None:
        tokens = sum(g.n_output_tokens or 0 for g in generations)
        self._recorder.observe("evalpipe_replica_batch_seconds", seconds, self._tags)
        if seconds > 0:
            self._recorder.set("evalpipe_replica_tokens_per_second", tokens / seconds, self._replica_tags)


class SandboxMetrics:
    """Jobs run by one sandbox worker."""

    def __init__(self, worker: int) -> None:
        self._recorder = _Recorder("sandbox")
        self._tags = {"worker": str(worker)}

    def ran(self, jobs: int) -> None:
        self._recorder.inc("evalpipe_sandbox_jobs", jobs, self._tags)
