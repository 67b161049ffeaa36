"""Compare runs: paired statistics per metric across "arms", each arm one (run, model, backend).

Results are aligned per task and per (task, sample index): every arm is scored on the same tasks (those all
arms have results for), so differences are paired. For every metric the comparison gives each arm's value
with a 95% paired-bootstrap confidence interval over tasks, and the difference to the first arm with its own
interval; the first sample of each task (the greedy completion of a temperature-0 run) is also compared with
McNemar's exact test. Output shapes (`json`, `csv`) are documented in docs/compare.md.

Runs that were made under different conditions are still compared, with a warning that names each field that
differs; samples that are not the same task are never paired (UserError).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table
from rich.text import Text

from evalpipe.errors import UserError
from evalpipe.records import Execution, Generation, Manifest, Record, RunConfig, SandboxLimits, Task
from evalpipe.rundir import RunDirectory, paused_gc
from evalpipe.score import pass_at_k, usable_ks

COMPARE_SCHEMA_VERSION = 1
"""Version of the `json` and `csv` shapes (docs/compare.md); bumped on any incompatible change."""
FORMATS = ("table", "json", "csv", "markdown")
CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
MAX_RESAMPLES = 100_000
"""The resample matrix is resamples x tasks; beyond this it costs memory for no visible gain."""
REPLAY_ENGINES = frozenset({"reference", "samples"})
"""Engines that replay completions: their sampling settings in config.json are defaults, not facts."""
LATENCY_FIELDS = ("ttft_s", "tpot_s", "e2e_s")

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Reals = npt.NDArray[np.floating[Any]]
"""float32 or float64: the quantile search uses float32 where that is exact."""
Unit = Literal["rate", "seconds", "tokens_per_s"]


# -- result records (the `json` format is exactly `CompareResult.model_dump_json`) ------------------------
class RunInfo(Record):
    """One compared run directory."""

    path: str
    run_id: str
    status: str
    suite: str
    engine: str
    dataset_sha256: str
    evalpipe_version: str
    git_sha: str | None
    created_at: str


class ArmInfo(Record):
    """One arm: a (model, backend) of one run."""

    label: str
    """Unique name used everywhere in the comparison: `model/backend`, plus `@run` where that is ambiguous."""
    run_id: str
    model: str
    backend: str
    n_samples: int
    """Samples of this arm on the compared tasks."""
    samples_per_task_min: int
    samples_per_task_max: int
    tasks_left_out: int
    """Tasks this arm has results for that are not compared because another arm lacks them."""


class BootstrapInfo(Record):
    """How the confidence intervals were made."""

    resamples: int
    seed: int
    confidence: float
    unit: Literal["task"] = "task"
    """What is resampled: whole tasks, with all their samples, the same draw for every arm (paired)."""


class ArmMetric(Record):
    """One arm's value of one metric, its interval, and the paired difference to the reference arm."""

    arm: str
    value: float | None
    """None: the arm has no data for this metric (e.g. no latency for replayed completions)."""
    ci_low: float | None
    ci_high: float | None
    delta: float | None
    """value − the reference arm's value; None for the reference arm itself or when either value is None."""
    delta_ci_low: float | None
    delta_ci_high: float | None
    significant: bool | None
    """The delta's interval excludes 0; None where there is no delta."""


class MetricRow(Record):
    """One metric across all arms."""

    name: str
    """Stable key: `pass@K`, `syntax_valid`, `constraint_satisfied`, `ttft_p50`, ..., `tokens_per_s_mean`."""
    label: str
    unit: Unit
    higher_is_better: bool
    values: tuple[ArmMetric, ...]


class McNemarTest(Record):
    """McNemar's exact test on the first sample of each task: an arm against the reference arm."""

    arm: str
    reference: str
    n_tasks: int
    """Tasks where both arms have a sample with index 0."""
    both_pass: int
    reference_only: int
    """Tasks the reference arm passes and this arm fails."""
    arm_only: int
    neither: int
    arm_rate: float
    reference_rate: float
    p_value: float
    significant: bool


class CompareWarning(Record):
    """A reason to be careful with the comparison; `field` names what differs."""

    field: str
    message: str
    values: dict[str, str] = Field(default_factory=dict)
    """run id → that run's value, where the warning is about a differing setting."""


class CompareResult(Record):
    """Everything `evalpipe compare` reports; `render` turns it into a table, JSON, CSV or Markdown."""

    schema_version: int = COMPARE_SCHEMA_VERSION
    runs: tuple[RunInfo, ...]
    arms: tuple[ArmInfo, ...]
    reference: str
    """The first arm: every delta is against it."""
    tasks: tuple[str, ...]
    """The compared tasks, in the first run's task order (the order the bootstrap draws index into)."""
    bootstrap: BootstrapInfo
    metrics: tuple[MetricRow, ...]
    mcnemar: tuple[McNemarTest, ...]
    warnings: tuple[CompareWarning, ...]


# -- loading and aligning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedRun:
    """One run directory, read once."""

    path: Path
    manifest: Manifest
    config: RunConfig
    tasks: dict[str, Task]
    generations: list[Generation]
    executions: list[Execution]


@dataclass
class Arm:
    """One arm's results on the aligned tasks, as arrays indexed by task position (see `Aligned.tasks`)."""

    label: str
    run: int
    """Index into `Aligned.runs`."""
    model: str
    backend: str
    n: Ints
    """Executed samples per task."""
    c: Ints
    """Passed samples per task."""
    valid: Ints
    """Syntax-valid samples per task."""
    judged: Ints
    """Samples per task with a constraint verdict (constraint_satisfied not None)."""
    satisfied: Ints
    generated: Ints
    """Generated samples per task that say how they ended (not replayed)."""
    cut: Ints
    """Samples per task cut at max tokens (finish_reason `length`)."""
    ended: Ints
    """Executed samples per task that ended on their own (finish_reason `stop`)."""
    ended_valid: Ints
    """... of which syntax-valid."""
    ended_judged: Ints
    """Samples per task that ended on their own and have a constraint verdict."""
    ended_satisfied: Ints
    first: npt.NDArray[np.int8]
    """Outcome of sample index 0 per task: 1 passed, 0 failed, -1 no such sample."""
    series: dict[str, tuple[Floats, Ints]]
    """Per-sample measurements (ttft_s, tpot_s, e2e_s, tokens_per_s, grammar_compile_s): (values, task)."""
    executions: list[Execution] = field(default_factory=list)
    """The arm's executions on the aligned tasks (the report shows failures from them)."""
    left_out: list[str] = field(default_factory=list)


@dataclass
class Aligned:
    """Runs, arms and the tasks every arm has results for; what `compare` and the report are computed from."""

    runs: list[LoadedRun]
    arms: list[Arm]
    tasks: list[str]
    warnings: list[CompareWarning]


def load_run(path: Path) -> LoadedRun:
    """Read a run directory through the RunDirectory API (UserError if it is not one)."""
    run = RunDirectory.open(path)
    with paused_gc():
        tasks = run.tasks()
        return LoadedRun(
            path=path,
            manifest=run.manifest,
            config=run.config,
            tasks={task.id: task for task in tasks},
            generations=run.generations(),
            executions=run.executions(),
        )


def _arm_order(config: RunConfig, pair: tuple[str, str]) -> tuple[int, int, str, str]:
    """The order the user gave models and backends in (`-b none -b guidance` puts `none` first)."""
    model, backend = pair
    m = config.models.index(model) if model in config.models else len(config.models)
    b = config.backends.index(backend) if backend in config.backends else len(config.backends)
    return (m, b, model, backend)


def _labels(pairs: list[tuple[int, str, str]], runs: list[LoadedRun]) -> list[str]:
    """`model/backend`, made unique with `@run` (the run id's identity part) and then a position if needed."""
    plain = [f"{model}/{backend}" for _, model, backend in pairs]
    labels = [
        label if plain.count(label) == 1 else f"{label}@{runs[run].manifest.run_id.rsplit('-', 1)[-1]}"
        for label, (run, _, _) in zip(plain, pairs, strict=True)
    ]
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]


def align(paths: Sequence[Path]) -> Aligned:
    """Load runs, split them into arms and align the arms on the tasks they all have results for.

    UserError when there is nothing to compare (fewer than two arms), when the arms share no task, when a
    task id names different tasks in different runs (different test or entry point), or when a run holds the
    same sample twice.
    """
    if not paths:
        raise UserError("compare needs at least one run directory")
    resolved = [path.resolve() for path in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise UserError(f"run {paths[i]} is given twice")
    runs = [load_run(path) for path in paths]
    warnings: list[CompareWarning] = []

    grouped: list[tuple[int, str, str, list[Execution]]] = []
    for r, run in enumerate(runs):
        by_pair: dict[tuple[str, str], list[Execution]] = defaultdict(list)
        for execution in run.executions:
            by_pair[(execution.key.model, execution.key.backend)].append(execution)
        if not by_pair:
            raise UserError(f"run {run.path} has no executed samples to compare")
        for pair in sorted(by_pair, key=lambda p: _arm_order(run.config, p)):
            grouped.append((r, pair[0], pair[1], by_pair[pair]))
    if len(grouped) < 2:
        (_, model, backend, _) = grouped[0]
        raise UserError(
            f"nothing to compare: {paths[0]} has one model and backend ({model}/{backend}); "
            "give two or more runs, or a run with several models or backends"
        )
    labels = _labels([(r, m, b) for r, m, b, _ in grouped], runs)

    task_sets = [{e.key.task_id for e in rows} for _, _, _, rows in grouped]
    common = set.intersection(*task_sets)
    if not common:
        described = "; ".join(
            f"{label}: {len(tasks)} task(s) ({', '.join(sorted(tasks)[:3])}{', …' if len(tasks) > 3 else ''})"
            for label, tasks in zip(labels, task_sets, strict=True)
        )
        raise UserError(f"the runs share no task, so no sample can be paired ({described})")
    _check_same_tasks(runs, common, warnings)
    # The first run's task order is the order of the tasks in every array and in the bootstrap draws.
    order = {task_id: i for i, task_id in enumerate(runs[0].tasks)}
    tasks = sorted(common, key=lambda task_id: (order.get(task_id, len(order)), task_id))
    position = {task_id: i for i, task_id in enumerate(tasks)}

    arms = [
        _build_arm(label, r, model, backend, rows, runs[r].generations, position, task_set - common)
        for label, (r, model, backend, rows), task_set in zip(labels, grouped, task_sets, strict=True)
    ]
    if any(arm.left_out for arm in arms):
        left = "; ".join(
            f"{arm.label} {len(arm.left_out)} ({', '.join(sorted(arm.left_out)[:3])}"
            f"{', …' if len(arm.left_out) > 3 else ''})"
            for arm in arms
            if arm.left_out
        )
        warnings.append(
            CompareWarning(
                field="tasks",
                message=f"compared on the {len(tasks)} task(s) every arm has results for; left out: {left}",
            )
        )
    return Aligned(runs=runs, arms=arms, tasks=tasks, warnings=warnings + comparability(runs, arms))


def _build_arm(
    label: str,
    run: int,
    model: str,
    backend: str,
    executions: list[Execution],
    generations: list[Generation],
    position: dict[str, int],
    left_out: set[str],
) -> Arm:
    # Column-wise list comprehensions, then numpy: runs of 10^5 samples load in tens of milliseconds.
    size = len(position)
    keys = [(e.key.task_id, e.key.index) for e in executions]
    if len(set(keys)) != len(keys):
        seen: set[tuple[str, int]] = set()
        for key in keys:
            if key in seen:
                raise UserError(f"{label}: sample {key[0]} #{key[1]} appears twice in executions.jsonl")
            seen.add(key)
    where = np.array([position.get(task_id, -1) for task_id, _ in keys], dtype=np.int64)
    kept_mask = where >= 0
    where = where[kept_mask]
    kept = [e for e, keep in zip(executions, kept_mask.tolist(), strict=True) if keep]
    passed = np.array([e.passed for e in kept], dtype=np.int64)
    is_first = np.array([e.key.index == 0 for e in kept], dtype=bool)
    first = np.full(size, -1, dtype=np.int8)
    first[where[is_first]] = passed[is_first]

    def per_task(weights: npt.ArrayLike | None, at: Ints = where) -> Ints:
        return np.bincount(at, weights=weights, minlength=size).astype(np.int64)

    own = [g for g in generations if (g.key.model, g.key.backend) == (model, backend)]
    own = [g for g in own if g.key.task_id in position]
    at = np.array([position[g.key.task_id] for g in own], dtype=np.int64)
    verdict = np.array([g.constraint_satisfied for g in own], dtype=np.float64)  # None → NaN
    judged = ~np.isnan(verdict)
    reasons = [g.finish_reason for g in own]
    told = np.array([reason != "replayed" for reason in reasons], dtype=np.int64)
    stopped = np.array([reason == "stop" for reason in reasons], dtype=np.int64)
    ended_keys = {(g.key.task_id, g.key.index) for g in own if g.finish_reason == "stop"}
    ended_run = np.array([(e.key.task_id, e.key.index) in ended_keys for e in kept], dtype=np.int64)
    e2e = np.array([g.e2e_s for g in own], dtype=np.float64)
    tokens = np.array([g.n_output_tokens for g in own], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # As in score.py: tokens over end-to-end time, only where both are known and non-zero.
        tokens_per_s = np.where((tokens > 0) & (e2e > 0), tokens / e2e, np.nan)
    measured = {
        "ttft_s": np.array([g.ttft_s for g in own], dtype=np.float64),
        "tpot_s": np.array([g.tpot_s for g in own], dtype=np.float64),
        "e2e_s": e2e,
        "tokens_per_s": tokens_per_s,
        "grammar_compile_s": np.array([g.grammar_compile_s for g in own], dtype=np.float64),
    }
    series = {}
    for name, values in measured.items():
        known = np.isfinite(values) if values.size else np.zeros(0, dtype=bool)
        series[name] = (values[known], at[known])
    return Arm(
        label=label, run=run, model=model, backend=backend, n=per_task(None), c=per_task(passed),
        valid=per_task(np.array([e.syntax_valid for e in kept], dtype=np.int64)),
        judged=per_task(judged.astype(np.int64), at),
        satisfied=per_task(np.nan_to_num(verdict).astype(np.int64), at),
        generated=per_task(told, at),
        cut=per_task(np.array([reason == "length" for reason in reasons], dtype=np.int64), at),
        ended=per_task(ended_run),
        ended_valid=per_task(ended_run * np.array([e.syntax_valid for e in kept], dtype=np.int64)),
        ended_judged=per_task((judged & (stopped == 1)).astype(np.int64), at),
        ended_satisfied=per_task((np.nan_to_num(verdict) * stopped).astype(np.int64), at),
        first=first, series=series, executions=kept, left_out=sorted(left_out),
    )  # fmt: skip


def _check_same_tasks(runs: list[LoadedRun], compared: set[str], warnings: list[CompareWarning]) -> None:
    """A compared task id must mean the same task in every run: same test and entry point (else UserError).

    A different prompt for the same test is allowed (prompt variants are a thing to compare) but warned about.
    Equality with the first run is enough: it is transitive.
    """
    first = runs[0]
    for other in runs[1:]:
        shared = compared & first.tasks.keys() & other.tasks.keys()
        different = sorted(
            task_id
            for task_id in shared
            if (first.tasks[task_id].test, first.tasks[task_id].entry_point)
            != (other.tasks[task_id].test, other.tasks[task_id].entry_point)
        )
        if different:
            raise UserError(
                f"task {different[0]} is not the same task in {first.manifest.run_id} and "
                f"{other.manifest.run_id} (test or entry point differs; {len(different)} task(s) differ): "
                "their samples cannot be paired"
            )
        prompts = sorted(t for t in shared if first.tasks[t].prompt != other.tasks[t].prompt)
        if prompts:
            warnings.append(
                CompareWarning(
                    field="prompt",
                    message=(
                        f"the prompt text differs for {len(prompts)} of {len(shared)} shared task(s) between "
                        f"{first.manifest.run_id} and {other.manifest.run_id} ({', '.join(prompts[:3])}"
                        f"{', …' if len(prompts) > 3 else ''})"
                    ),
                    values={first.manifest.run_id: "", other.manifest.run_id: ""},
                )
            )


# -- comparability ----------------------------------------------------------------------------------------
def _sampling(name: str) -> Callable[[LoadedRun, list[Arm]], str]:
    def get(run: LoadedRun, _: list[Arm]) -> str:
        if run.config.engine in REPLAY_ENGINES:
            return "n/a (replayed completions)"
        return str(getattr(run.config, name))

    return get


def _samples_per_task(run: LoadedRun, arms: list[Arm]) -> str:
    # Observed, not config.n_samples: a samples file sets its own count per task.
    counts = [int(x) for arm in arms for x in arm.n]
    low, high = min(counts, default=0), max(counts, default=0)
    return str(low) if low == high else f"{low}–{high}"


def _prompt_format(run: LoadedRun, _: list[Arm]) -> str:
    # The manifest records what each engine describes; engines that build prompts say how there.
    formats = sorted(
        {
            str(info.get("prompt_format", info.get("prompt", "")))
            for info in run.manifest.engine.values()
            if isinstance(info, dict)
        }
        - {""}
    )
    return ", ".join(formats) if formats else "not recorded"


def _versions(run: LoadedRun) -> dict[str, str]:
    """Package versions of the run: the manifest's, overridden by what an engine reports it used (`versions`
    in its description, e.g. a vLLM server's own), joined with `/` where a run's engines disagree."""
    found: dict[str, set[str]] = {
        name: {str(version)} for name, version in run.manifest.package_versions.items() if version
    }
    engine_reported: dict[str, set[str]] = defaultdict(set)
    for info in run.manifest.engine.values():
        reported = info.get("versions") if isinstance(info, dict) else None
        if isinstance(reported, dict):
            for name, version in reported.items():
                if version:
                    engine_reported[name].add(str(version))
    found.update(engine_reported)
    return {name: "/".join(sorted(versions)) for name, versions in found.items()}


def _grammars(run: LoadedRun, _: list[Arm]) -> str:
    return ", ".join(f"{name}={sha[:12]}" for name, sha in sorted(run.manifest.grammar_sha256.items()))


SETTINGS: tuple[tuple[str, Callable[[LoadedRun, list[Arm]], str]], ...] = (
    ("dataset_sha256", lambda run, _: run.manifest.dataset_sha256),
    ("suite", lambda run, _: run.manifest.suite),
    ("engine", lambda run, _: run.config.engine),
    ("temperature", _sampling("temperature")),
    ("top_p", _sampling("top_p")),
    ("max_tokens", _sampling("max_tokens")),
    ("seed", _sampling("seed")),
    ("n_samples", _samples_per_task),
    ("prompt_format", _prompt_format),
    ("evalpipe_version", lambda run, _: run.manifest.evalpipe_version),
    ("sandbox", lambda run, _: run.config.sandbox),
)


def _differs(name: str, values: dict[str, str], what: str = "") -> CompareWarning:
    grouped: dict[str, list[str]] = defaultdict(list)
    for run_id, value in values.items():
        grouped[value].append(run_id)
    shown = "; ".join(f"{value or '(none)'} in {', '.join(ids)}" for value, ids in grouped.items())
    return CompareWarning(field=name, message=f"{what or name} differs between runs: {shown}", values=values)


def comparability(runs: list[LoadedRun], arms: list[Arm]) -> list[CompareWarning]:
    """One warning per setting that differs between runs and can change results, naming the values."""
    warnings: list[CompareWarning] = []
    ids = [run.manifest.run_id for run in runs]
    incomplete = {
        run.manifest.run_id: f"{run.manifest.status} ({run.manifest.progress.executed}/"
        f"{run.manifest.progress.expected} executed)"
        for run in runs
        if run.manifest.status != "completed"
    }
    if incomplete:
        shown = ", ".join(f"{run_id} is {state}" for run_id, state in incomplete.items())
        warnings.append(CompareWarning(field="status", message=f"not every run is complete: {shown}"))
    if len(runs) < 2:
        return warnings
    arms_of = [[arm for arm in arms if arm.run == r] for r in range(len(runs))]
    for name, get in SETTINGS:
        values = {run_id: get(run, a) for run_id, run, a in zip(ids, runs, arms_of, strict=True)}
        if len(set(values.values())) > 1:
            warnings.append(_differs(name, values))
    # A run without a grammar is unconstrained: that is the point of the comparison, not a difference.
    grammars = {run_id: _grammars(run, []) for run_id, run in zip(ids, runs, strict=True)}
    constrained = {run_id: value for run_id, value in grammars.items() if value}
    if len(set(constrained.values())) > 1:
        warnings.append(_differs("grammar_sha256", constrained, "the grammar"))
    installed = [_versions(run) for run in runs]
    for package in sorted({name for versions in installed for name in versions}):
        versions = {
            run_id: versions.get(package) or "not installed"
            for run_id, versions in zip(ids, installed, strict=True)
        }
        if len(set(versions.values())) > 1:
            warnings.append(_differs(f"package_versions.{package}", versions, f"{package} version"))
    for limit in SandboxLimits.model_fields:
        values = {
            run_id: str(getattr(run.config.limits, limit)) for run_id, run in zip(ids, runs, strict=True)
        }
        if len(set(values.values())) > 1:
            warnings.append(_differs(f"limits.{limit}", values, f"sandbox limit {limit}"))
    return warnings


# -- statistics -------------------------------------------------------------------------------------------
def resample_counts(n_tasks: int, resamples: int, seed: int) -> Floats:
    """resamples × n_tasks: how often each task is drawn in each bootstrap resample.

    The draws are `numpy.random.default_rng(seed).integers(0, n_tasks, size=(resamples, n_tasks))`, row b
    being resample b; written down (docs/compare.md) so that anyone can reproduce the intervals.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_tasks, size=(resamples, n_tasks))
    flat = (draws + np.arange(resamples, dtype=np.int64)[:, None] * n_tasks).ravel()
    counts = np.bincount(flat, minlength=resamples * n_tasks).reshape(resamples, n_tasks)
    return counts.astype(np.float64)


def resampled_ratios(counts: Floats, numerators: Floats, denominators: Floats) -> Floats:
    """resamples × m: Σ numerator / Σ denominator over each resample's tasks, for m (T × m) columns at once.

    NaN where a resample's denominator is 0. One matrix product for all columns: one per column costs as
    much each.
    """
    num, den = counts @ numerators, counts @ denominators
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def resampled_quantiles(
    values: Floats,
    task: Ints,
    counts: Floats,
    quantiles: Sequence[float],
    *,
    coarse: int = 32,
    cell: int = 32,
) -> Floats:
    """resamples × len(quantiles): `np.percentile(..., 100 q)` (linear) of each resample's pooled samples.

    A resample that draws a task m times holds m copies of that task's samples. Building each resample's
    pooled array would cost resamples × samples values; instead the samples are sorted once, and F_b(p), how
    many of resample b's samples lie at sorted positions ≤ p, is counts[b] · cum[p], where cum[p] holds the
    per-task counts among the first p + 1 sorted samples. The order statistic j of resample b is the sample
    at the smallest p with F_b(p) ≥ j + 1. It is found in three steps, each exact: a matrix product gives F_b
    on `coarse` positions, which brackets the positions of all resamples in a band; a second product on
    positions `cell` apart within that band brackets each resample's position in a cell; within its cell F_b
    grows by the resample's weight of each sample in turn, a running sum over a (resamples × cell) gather.
    """
    resamples, n_tasks = counts.shape
    result = np.full((resamples, len(quantiles)), np.nan)
    if values.size == 0:
        return result
    order = np.argsort(values, kind="stable")
    ordered, owner = values[order], task[order]
    size = ordered.size
    per_task = np.bincount(task, minlength=n_tasks)
    # float32 halves the cost and stays exact (integers) while every count is below 2**24.
    dtype = np.float32 if int(per_task.max()) * n_tasks < 2**24 else np.float64
    weights: Reals = counts.astype(dtype)
    # cum[positions], searched among each task's sorted positions (never the whole size × tasks matrix).
    by_task = np.argsort(owner, kind="stable")
    keyed = owner[by_task] * size + by_task
    starts = np.concatenate(([0], np.cumsum(per_task)[:-1]))

    def f_at(positions: Ints) -> Reals:
        """F_b at these sorted positions: resamples × len(positions)."""
        queries = np.arange(n_tasks, dtype=np.int64)[None, :] * size + positions[:, None]
        cum: Reals = (np.searchsorted(keyed, queries, side="right") - starts[None, :]).astype(dtype)
        return weights @ cum.T

    # The last position is always on the grid: F_b reaches every target there (F_b(last) = N_b).
    band_grid = np.unique(np.append(np.linspace(0, size - 1, min(coarse, size)).astype(np.int64), size - 1))
    band_f = f_at(band_grid)
    totals = weights @ per_task.astype(dtype)
    has = totals > 0
    safe_totals = np.where(has, totals, 1).astype(np.float64)
    rows = np.arange(resamples)
    flat_weights = weights.ravel()
    flat_rows = (rows * n_tasks)[:, None]

    for column, q in enumerate(quantiles):
        # numpy's linear method: virtual index h = (N - 1) q, between order statistics floor(h), floor(h) + 1.
        h = (safe_totals - 1) * q
        below = np.floor(h)
        # A resample without samples (all its tasks lack this measurement) has no quantile: NaN below.
        target: Reals = np.where(has, below + 1, 0).astype(dtype)
        # The band: from the last coarse position below every resample's target (F_b < target there for
        # all b, F being monotone) to the first coarse position that reaches every target.
        reach = (band_f < target[:, None]).sum(axis=1)
        first, last = int(reach.min()), int(reach.max())
        start = int(band_grid[first - 1]) if first > 0 else -1
        stop = int(band_grid[min(last, band_grid.size - 1)])
        step = max(cell, -(-(stop - start) // 1024))  # at most ~1024 columns in the second product
        grid = np.arange(start, stop, step, dtype=np.int64)[1 if start < 0 else 0 :]
        grid = np.append(grid, stop) if grid.size == 0 or grid[-1] != stop else grid
        grid_f = f_at(grid)
        i = (grid_f < target[:, None]).sum(axis=1)  # first grid position with F_b ≥ target
        hi = grid[np.minimum(i, grid.size - 1)]
        lo = np.where(i > 0, grid[np.maximum(i - 1, 0)] + 1, 0)
        base = np.where(i > 0, grid_f[rows, np.maximum(i - 1, 0)], 0)
        width = int((hi - lo).max(initial=0)) + 1
        # Positions past the cell repeat its last one: F_b reaches the target inside the cell anyway.
        positions = np.minimum(lo[:, None] + np.arange(width)[None, :], hi[:, None])
        running = np.take(flat_weights, flat_rows + owner[positions])
        np.cumsum(running, axis=1, out=running)
        running += base[:, None]
        inside = (running >= target[:, None]).argmax(axis=1)
        found = lo + inside
        # The next order statistic is the same sample while F_b(found) covers it, else the next sorted sample
        # that resample b holds at all (a task it drew at least once): usually one or two positions on.
        covered = running[rows, inside]
        following = found.copy()
        moving = np.flatnonzero((covered < np.minimum(below + 2, safe_totals)) & has)
        while moving.size:
            following[moving] += 1
            held = weights[rows[moving], owner[following[moving]]] > 0
            moving = moving[~held]
        low, high = ordered[found], ordered[following]
        result[:, column] = np.where(has, low + (high - low) * (h - below), np.nan)
    return result


def percentile_interval(samples: Floats) -> tuple[float | None, float | None]:
    """The central CONFIDENCE interval of bootstrap values (percentile method); None if all are NaN."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None, None
    low, high = np.percentile(finite, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def mcnemar_exact(reference_only: int, arm_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against p = 1/2.

    Equals `scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue`: twice the smaller tail, at most 1; computed
    with exact integers so that it needs no scipy and loses no precision for small p.
    """
    n = reference_only + arm_only
    if n == 0:
        return 1.0
    k = min(reference_only, arm_only)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


@dataclass(frozen=True)
class _Estimate:
    point: float | None
    boot: Floats | None


@dataclass(frozen=True)
class _Metric:
    name: str
    label: str
    unit: Unit
    higher_is_better: bool
    estimates: list[_Estimate]


def _per_task_sums(arm: Arm, name: str, n_tasks: int) -> tuple[Floats, Floats]:
    values, task = arm.series[name]
    return (
        np.bincount(task, weights=values, minlength=n_tasks).astype(np.float64),
        np.bincount(task, minlength=n_tasks).astype(np.float64),
    )


def _metrics(aligned: Aligned, counts: Floats) -> list[_Metric]:
    """Point estimates and bootstrap values of every metric for every arm, in display order."""
    arms, n_tasks = aligned.arms, len(aligned.tasks)
    # Ratio metrics are collected first and resampled together; an int stands for their column until then.
    numerators: list[Floats] = []
    denominators: list[Floats] = []
    pending: list[tuple[str, str, Unit, bool, list[_Estimate | int]]] = []

    def ratio(name: str, label: str, unit: Unit, higher: bool, pairs: list[tuple[Floats, Floats]]) -> None:
        estimates: list[_Estimate | int] = []
        for numerator, denominator in pairs:
            if denominator.sum() == 0:
                estimates.append(_Estimate(None, None))
                continue
            estimates.append(len(numerators))
            numerators.append(numerator)
            denominators.append(denominator)
        pending.append((name, label, unit, higher, estimates))

    ones = np.ones(n_tasks)
    ks = sorted(
        set.intersection(
            *(set(usable_ks((), {str(t): (int(n), 0) for t, n in enumerate(arm.n)})) for arm in arms)
        )
        | set.intersection(*(set(aligned.runs[arm.run].config.ks) for arm in arms))
    )
    smallest = min(int(arm.n.min()) for arm in arms)
    for k in (k for k in ks if k <= smallest):
        per_task = [
            np.array([pass_at_k(int(n), int(c), k) for n, c in zip(arm.n, arm.c, strict=True)])
            for arm in arms
        ]
        ratio(f"pass@{k}", f"pass@{k}", "rate", True, [(v, ones) for v in per_task])
    ratio(
        "syntax_valid", "syntax valid", "rate", True,
        [(arm.valid.astype(np.float64), arm.n.astype(np.float64)) for arm in arms],
    )  # fmt: skip
    if any(arm.judged.sum() for arm in arms):
        ratio(
            "constraint_satisfied", "constraint satisfied", "rate", True,
            [(arm.satisfied.astype(np.float64), arm.judged.astype(np.float64)) for arm in arms],
        )  # fmt: skip
    if any(arm.generated.sum() for arm in arms):
        # How the samples ended: cut at max tokens, and the rates over those that ended on their own.
        ratio(
            "max_tokens", "ended by max tokens", "rate", False,
            [(arm.cut.astype(np.float64), arm.generated.astype(np.float64)) for arm in arms],
        )  # fmt: skip
        ratio(
            "syntax_valid_ended", "syntax valid (ended)", "rate", True,
            [(arm.ended_valid.astype(np.float64), arm.ended.astype(np.float64)) for arm in arms],
        )  # fmt: skip
        if any(arm.ended_judged.sum() for arm in arms):
            ratio(
                "constraint_satisfied_ended", "constraint satisfied (ended)", "rate", True,
                [(a.ended_satisfied.astype(np.float64), a.ended_judged.astype(np.float64)) for a in arms],
            )  # fmt: skip
    for name, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "e2e")):
        if not any(arm.series[name][0].size for arm in arms):
            continue
        boots = [
            resampled_quantiles(*arm.series[name], counts, (0.5, 0.9)) if arm.series[name][0].size else None
            for arm in arms
        ]
        for column, q in enumerate((50, 90)):
            estimates: list[_Estimate | int] = [
                _Estimate(float(np.percentile(arm.series[name][0], q)), boot[:, column])
                if boot is not None
                else _Estimate(None, None)
                for arm, boot in zip(arms, boots, strict=True)
            ]
            pending.append((f"{name.removesuffix('_s')}_p{q}", f"{label} p{q}", "seconds", False, estimates))
    if any(arm.series["grammar_compile_s"][0].size for arm in arms):
        sums = [_per_task_sums(arm, "grammar_compile_s", n_tasks) for arm in arms]
        ratio("grammar_compile_mean", "grammar compile (mean)", "seconds", False, sums)
    if any(arm.series["tokens_per_s"][0].size for arm in arms):
        sums = [_per_task_sums(arm, "tokens_per_s", n_tasks) for arm in arms]
        ratio("tokens_per_s_mean", "tokens/s (mean)", "tokens_per_s", True, sums)

    boot = resampled_ratios(counts, np.column_stack(numerators), np.column_stack(denominators))
    points = [float(num.sum() / den.sum()) for num, den in zip(numerators, denominators, strict=True)]
    metrics = []
    for name, label, unit, higher, estimates in pending:
        done = [e if isinstance(e, _Estimate) else _Estimate(points[e], boot[:, e]) for e in estimates]
        metrics.append(_Metric(name, label, unit, higher, done))
    return metrics


def _metric_row(metric: _Metric, labels: list[str]) -> MetricRow:
    reference = metric.estimates[0]
    values = []
    for i, (label, estimate) in enumerate(zip(labels, metric.estimates, strict=True)):
        low, high = percentile_interval(estimate.boot) if estimate.boot is not None else (None, None)
        delta = delta_low = delta_high = None
        significant = None
        if (
            i > 0
            and estimate.point is not None
            and reference.point is not None
            and estimate.boot is not None
            and reference.boot is not None
        ):
            delta = estimate.point - reference.point
            delta_low, delta_high = percentile_interval(estimate.boot - reference.boot)
            if delta_low is not None and delta_high is not None:
                significant = delta_low > 0 or delta_high < 0
        values.append(
            ArmMetric(
                arm=label, value=estimate.point, ci_low=low, ci_high=high, delta=delta,
                delta_ci_low=delta_low, delta_ci_high=delta_high, significant=significant,
            )
        )  # fmt: skip
    return MetricRow(
        name=metric.name,
        label=metric.label,
        unit=metric.unit,
        higher_is_better=metric.higher_is_better,
        values=tuple(values),
    )


def _mcnemar(aligned: Aligned) -> list[McNemarTest]:
    reference = aligned.arms[0]
    tests = []
    for arm in aligned.arms[1:]:
        both = (reference.first >= 0) & (arm.first >= 0)
        ref, other = reference.first[both] == 1, arm.first[both] == 1
        reference_only, arm_only = int((ref & ~other).sum()), int((~ref & other).sum())
        p_value = mcnemar_exact(reference_only, arm_only)
        count = int(both.sum())
        tests.append(
            McNemarTest(
                arm=arm.label,
                reference=reference.label,
                n_tasks=count,
                both_pass=int((ref & other).sum()),
                reference_only=reference_only,
                arm_only=arm_only,
                neither=int((~ref & ~other).sum()),
                arm_rate=float(other.mean()) if count else 0.0,
                reference_rate=float(ref.mean()) if count else 0.0,
                p_value=p_value,
                significant=p_value < ALPHA,
            )
        )
    return tests


def check_options(fmt: str, bootstrap: int) -> None:
    """UserError for an unknown format or a resample count out of range, before anything is read."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not 1 <= bootstrap <= MAX_RESAMPLES:
        raise UserError(f"--bootstrap must be between 1 and {MAX_RESAMPLES} (got {bootstrap})")


def summarize_aligned(aligned: Aligned, *, bootstrap: int = 10_000, seed: int = 0) -> CompareResult:
    """The comparison of already aligned arms (the report uses this with the arrays it also plots)."""
    counts = resample_counts(len(aligned.tasks), bootstrap, seed)
    labels = [arm.label for arm in aligned.arms]
    metrics = [_metric_row(metric, labels) for metric in _metrics(aligned, counts)]
    return CompareResult(
        runs=tuple(
            RunInfo(
                path=str(run.path),
                run_id=run.manifest.run_id,
                status=run.manifest.status,
                suite=run.manifest.suite,
                engine=run.config.engine,
                dataset_sha256=run.manifest.dataset_sha256,
                evalpipe_version=run.manifest.evalpipe_version,
                git_sha=run.manifest.git_sha,
                created_at=run.manifest.created_at,
            )
            for run in aligned.runs
        ),
        arms=tuple(
            ArmInfo(
                label=arm.label,
                run_id=aligned.runs[arm.run].manifest.run_id,
                model=arm.model,
                backend=arm.backend,
                n_samples=int(arm.n.sum()),
                samples_per_task_min=int(arm.n.min()),
                samples_per_task_max=int(arm.n.max()),
                tasks_left_out=len(arm.left_out),
            )
            for arm in aligned.arms
        ),
        reference=labels[0],
        tasks=tuple(aligned.tasks),
        bootstrap=BootstrapInfo(resamples=bootstrap, seed=seed, confidence=CONFIDENCE),
        metrics=tuple(metrics),
        mcnemar=tuple(_mcnemar(aligned)),
        warnings=tuple(aligned.warnings),
    )


def compare_runs(
    paths: list[Path], *, fmt: str = "table", bootstrap: int = 10_000, seed: int = 0
) -> CompareResult:
    """Compare the arms of these runs: the first arm of the first run is the reference for every delta.

    `fmt` is only checked here (so that a typo fails before the runs are read); `render` produces it.
    """
    check_options(fmt, bootstrap)
    # The collector stays paused until the records are freed again: re-enabled in between, its first pass
    # would scan every record just read (half a second for two runs of 32 800 samples).
    with paused_gc():
        return summarize_aligned(align(paths), bootstrap=bootstrap, seed=seed)


# -- rendering --------------------------------------------------------------------------------------------
def _scale(row: MetricRow) -> tuple[float, str]:
    """Multiplier and unit to show a metric in: percent, ms or s (by the largest value), tokens/s."""
    if row.unit == "rate":
        return 100.0, "%"
    if row.unit == "tokens_per_s":
        return 1.0, " tok/s"
    largest = max((abs(v.value) for v in row.values if v.value is not None), default=0.0)
    return (1000.0, " ms") if largest < 1.0 else (1.0, " s")


def _digits(row: MetricRow, scale: float) -> int:
    """Decimals for a whole row (values, intervals and deltas alike), from the size of its values."""
    if row.unit == "rate":
        return 1
    largest = max((abs(v.value) * scale for v in row.values if v.value is not None), default=0.0)
    return 1 if largest >= 10 else (2 if largest >= 1 else 3)


def _number(value: float, scale: float, digits: int, signed: bool = False) -> str:
    scaled = value * scale
    return f"{scaled:+.{digits}f}" if signed else f"{scaled:.{digits}f}"


def format_value(row: MetricRow, value: ArmMetric) -> str:
    """`70.6% [66.1, 75.0]`: the value and its interval in the row's unit."""
    if value.value is None:
        return "-"
    scale, unit = _scale(row)
    digits = _digits(row, scale)
    text = f"{_number(value.value, scale, digits)}{unit}"
    if value.ci_low is not None and value.ci_high is not None:
        text += f" [{_number(value.ci_low, scale, digits)}, {_number(value.ci_high, scale, digits)}]"
    return text


def format_delta(row: MetricRow, value: ArmMetric) -> str:
    """`Δ +4.4 pp [+1.0, +7.8] *`: the paired difference, its interval, `*` when significant."""
    if value.delta is None:
        return ""
    scale, unit = _scale(row)
    unit = " pp" if unit == "%" else unit
    digits = _digits(row, scale)
    text = f"Δ {_number(value.delta, scale, digits, signed=True)}{unit}"
    if value.delta_ci_low is not None and value.delta_ci_high is not None:
        low = _number(value.delta_ci_low, scale, digits, signed=True)
        high = _number(value.delta_ci_high, scale, digits, signed=True)
        text += f" [{low}, {high}]"
    return text + (" *" if value.significant else "")


def _better(row: MetricRow, value: ArmMetric) -> bool | None:
    """Whether a significant difference is an improvement (None: not significant)."""
    if not value.significant or value.delta is None:
        return None
    return (value.delta > 0) == row.higher_is_better


def rich_tables(result: CompareResult) -> list[Table]:
    """The metrics table (one column per arm) and the McNemar table, for a terminal."""
    interval = f"{CONFIDENCE:.0%} CI"
    metrics = Table(
        title=f"{len(result.tasks)} tasks; [{interval}] paired bootstrap over tasks "
        f"({result.bootstrap.resamples} resamples, seed {result.bootstrap.seed}); "
        f"Δ vs {result.reference}; * significant",
        title_justify="left",
    )
    metrics.add_column("metric")
    for arm in result.arms:
        metrics.add_column(arm.label, justify="right")
    for row in result.metrics:
        cells: list[Text] = []
        for value in row.values:
            cell = Text(format_value(row, value))
            delta = format_delta(row, value)
            if delta:
                better = _better(row, value)
                style = "" if better is None else ("bold green" if better else "bold red")
                cell.append("\n" + delta, style=style)
            cells.append(cell)
        metrics.add_row(Text(row.label), *cells)
    tables = [metrics]
    if result.mcnemar:
        tests = Table(
            title="McNemar exact test, sample 0 of each task (the greedy pass@1 at temperature 0)",
            title_justify="left",
        )
        for column in ("arm", "vs", "tasks", "both pass", "vs only", "arm only", "neither", "p", ""):
            tests.add_column(column, justify="left" if column in {"arm", "vs"} else "right")
        for test in result.mcnemar:
            tests.add_row(
                test.arm, test.reference, str(test.n_tasks), str(test.both_pass), str(test.reference_only),
                str(test.arm_only), str(test.neither), f"{test.p_value:.4g}", "*" if test.significant else "",
            )  # fmt: skip
        tables.append(tests)
    return tables


CSV_COLUMNS = (
    "metric", "arm", "model", "backend", "run_id", "unit", "higher_is_better", "n_tasks", "value", "ci_low",
    "ci_high", "delta", "delta_ci_low", "delta_ci_high", "significant", "test", "p_value",
)  # fmt: skip


def _csv(result: CompareResult) -> str:
    arms = {arm.label: arm for arm in result.arms}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def cell(value: float | bool | None) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(float(value))

    n_tasks = str(len(result.tasks))
    for row in result.metrics:
        for value in row.values:
            arm = arms[value.arm]
            writer.writerow(
                [row.name, arm.label, arm.model, arm.backend, arm.run_id, row.unit,
                 cell(row.higher_is_better), n_tasks, cell(value.value), cell(value.ci_low),
                 cell(value.ci_high), cell(value.delta), cell(value.delta_ci_low), cell(value.delta_ci_high),
                 cell(value.significant), "paired_bootstrap", ""]
            )  # fmt: skip
    for test in result.mcnemar:
        arm = arms[test.arm]
        writer.writerow(
            ["pass@1_sample0", arm.label, arm.model, arm.backend, arm.run_id, "rate", "true",
             str(test.n_tasks), cell(test.arm_rate), "", "", cell(test.arm_rate - test.reference_rate),
             "", "", cell(test.significant), "mcnemar_exact", cell(test.p_value)]
        )  # fmt: skip
    return buffer.getvalue()


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _markdown(result: CompareResult) -> str:
    lines = [
        f"**{len(result.tasks)} tasks**, {CONFIDENCE:.0%} paired bootstrap CIs over tasks "
        f"({result.bootstrap.resamples} resamples, seed {result.bootstrap.seed}); "
        f"Δ vs `{result.reference}`; **\\*** significant.",
        "",
        "| metric | " + " | ".join(f"`{arm.label}`" for arm in result.arms) + " |",
        "|---|" + "---:|" * len(result.arms),
    ]
    for row in result.metrics:
        cells = []
        for value in row.values:
            text = format_value(row, value)
            delta = format_delta(row, value)
            if delta:
                # The significance mark is escaped: `* **` would read as emphasis markers.
                delta = delta.replace(" *", " \\*")
                text += f"<br>{'**' + delta + '**' if value.significant else delta}"
            cells.append(_markdown_cell(text))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if result.mcnemar:
        lines += [
            "",
            "McNemar exact test on sample 0 of each task (greedy pass@1 at temperature 0):",
            "",
            "| arm | vs | tasks | both pass | vs only | arm only | neither | p |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for test in result.mcnemar:
            p_value = f"{test.p_value:.4g}" + (" **\\***" if test.significant else "")
            lines.append(
                f"| `{test.arm}` | `{test.reference}` | {test.n_tasks} | {test.both_pass} | "
                f"{test.reference_only} | {test.arm_only} | {test.neither} | {p_value} |"
            )
    if result.warnings:
        lines += ["", "**Warnings**", ""]
        lines += [f"- {_markdown_cell(warning.message)}" for warning in result.warnings]
    return "\n".join(lines) + "\n"


def render(result: CompareResult, fmt: str) -> str:
    """The comparison as `table` (plain text), `json`, `csv` or `markdown`."""
    if fmt == "json":
        return result.model_dump_json(indent=2) + "\n"
    if fmt == "csv":
        return _csv(result)
    if fmt == "markdown":
        return _markdown(result)
    if fmt == "table":
        console = Console(file=io.StringIO(), width=200, color_system=None, record=True)
        for table in rich_tables(result):
            console.print(table)
        return console.export_text()
    raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories; the first arm is the reference")],
    format: Annotated[str, typer.Option("--format", "-f", help="table, json, csv or markdown")] = "table",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (over tasks)")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws")] = 0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")
    ] = None,
) -> None:
    """Compare runs: pass@k, syntax validity, constraints, latency, with paired CIs and McNemar's test."""
    result = compare_runs(runs, fmt=format, bootstrap=bootstrap, seed=seed)
    # Warnings go to stderr so that stdout stays parseable JSON or CSV.
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    for warning in result.warnings:
        err.print(f"[bold yellow]warning:[/] {warning.message}", soft_wrap=True, highlight=False)
    if output is not None:
        try:
            output.write_text(render(result, format))
        except OSError as error:
            raise UserError(f"cannot write {output}: {error.strerror}") from None
        err.print(f"wrote {output}", highlight=False)
        return
    if format == "table":
        out = Console(width=None if sys.stdout.isatty() else 200)
        for table in rich_tables(result):
            out.print(table)
    else:
        sys.stdout.write(render(result, format))
