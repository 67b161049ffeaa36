"""The Ray executor end to end through the CLI: the (model × backend) matrix, actor names, live metrics,
replicas that die or are killed mid-run, an engine that keeps dying, and Ctrl-C; each then resumes."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from ray_helpers import RayNode, assert_each_sample_once, only_run

from evalpipe.telemetry import prometheus_series

ray = pytest.importorskip("ray")
from ray.util.state import list_actors  # noqa: E402

# Every test shares the session's Ray instance (the executor reuses it) and can scrape its metrics.
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_node")]

CliResult = tuple[int, str, str]
Cli = Callable[..., CliResult]


def _run_args(runs: Path, *models: str, limit: int, backends: tuple[str, ...] = ("none",)) -> list[str]:
    args = ["run", "humaneval", "--engine", "scripted", "--executor", "ray", "--sandbox", "process"]
    for model in models:
        args += ["-m", model]
    for backend in backends:
        args += ["-b", backend]
    return [*args, "--limit", str(limit), "--runs-dir", str(runs)]


def _actors(prefix: str) -> list[object]:
    return [a for a in list_actors(limit=10_000) if (a.name or "").startswith(prefix)]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _when_generated(runs: Path, count: int, action: Callable[[], None]) -> threading.Thread:
    """Call `action` from a thread once the run in `runs` has recorded `count` generations."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list(runs.glob("*/generations.jsonl"))
            if files and _lines(files[0]) >= count:
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_matrix_runs_end_to_end_with_named_actors_and_live_metrics(
    ray_node: RayNode, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough per replica that its own metrics are reported (every 1 s) while it lives.
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0.25")
    seen: set[str] = set()
    stop = threading.Event()

    def poll() -> None:  # live monitoring: what a Prometheus scraping during the run would see
        while not stop.is_set():
            seen.update(name for name, labels, _ in ray_node.scrape() if labels.get("model") in {"a", "b"})
            time.sleep(0.3)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        code, out, err = cli(*_run_args(tmp_path, "a", "b", limit=5, backends=("guidance", "none")))
    finally:
        stop.set()
        poller.join()
    assert code == 0, err
    assert "development" in err  # the process sandbox says what it is, under Ray too
    assert "1.0000" in out

    run = only_run(tmp_path)
    assert run.manifest.status == "completed"
    assert_each_sample_once(run, expected=2 * 2 * 5)
    scores = run.scores()
    assert {(s.model, s.backend) for s in scores} == {(m, b) for m in "ab" for b in ("guidance", "none")}
    assert all(s.pass_at_k == {1: 1.0} and s.n_samples == 5 for s in scores)
    assert all(g.ttft_s is not None and g.ttft_s > 0.05 for g in run.generations())  # measured, not invented

    # The dashboard's Actors page reads like the run, in one namespace of its own; close() ended them.
    names = {"gen/guidance/a/0", "gen/none/a/0", "gen/guidance/b/0", "gen/none/b/0", "sandbox/0", "sandbox/1"}
    ours = [
        a for a in list_actors(limit=10_000) if a.name in names and a.ray_namespace.startswith("evalpipe-")
    ]
    namespaces = {a.ray_namespace for a in ours if a.name == "gen/none/a/0"}
    assert len(namespaces) == 1
    in_run = {a.name: a for a in ours if a.ray_namespace in namespaces}
    assert set(in_run) == names
    assert {a.class_name for a in in_run.values()} == {"GenerationReplica", "SandboxWorker"}
    assert all(a.state == "DEAD" for a in in_run.values())

    # Counts come from the driver and are exact; actor-side metrics arrive too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ray_node.total("ray_evalpipe_samples_passed_total", model="a", backend="guidance") == 5:
            break
        time.sleep(0.3)
    for model in "ab":
        for backend in ("guidance", "none"):
            tags = {"model": model, "backend": backend}
            assert ray_node.total("ray_evalpipe_samples_generated_total", **tags) == 5
            assert ray_node.total("ray_evalpipe_samples_executed_total", status="passed", **tags) == 5
            assert ray_node.total("ray_evalpipe_samples_passed_total", **tags) == 5
            assert ray_node.total("ray_evalpipe_ttft_seconds_count", **tags) == 5
            assert ray_node.total("ray_evalpipe_requests_in_flight", **tags) == 0
    seen.update(name for name, labels, _ in ray_node.scrape() if labels.get("model") in {"a", "b"})
    assert "ray_evalpipe_replica_batch_seconds_count" in seen  # recorded inside the replicas
    assert "ray_evalpipe_requests_in_flight" in seen
    assert {name for name in seen if name.startswith("ray_evalpipe")} <= prometheus_series()
    assert ray_node.total("ray_evalpipe_sandbox_jobs_total") >= 20  # recorded inside the sandbox workers


def test_arms_on_one_device_take_turns_batch_by_batch(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arms whose latencies are compared never compute at the same time on a shared device (the scripted
    engine says it runs on the CPU): their calls never overlap, and they alternate."""
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0.02")
    monkeypatch.setenv("EVALPIPE_SCRIPTED_CALLS", str(calls))
    code, _, err = cli(
        *_run_args(tmp_path / "runs", "m", limit=20, backends=("guidance", "xgrammar", "none"))
    )
    assert code == 0, err
    spans = sorted(
        (float(start), float(end), backend)
        for backend, start, end in (line.split() for line in calls.read_text().splitlines())
    )
    assert len(spans) >= 9  # 20 samples per arm in batches of at most 8
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert start >= end - 1e-3, "two arms computed at the same time"
    order = [backend for _, _, backend in spans]
    assert order[:3] == ["guidance", "xgrammar", "none"]  # round robin, in the order given
    assert_each_sample_once(only_run(tmp_path / "runs"), expected=3 * 20)


def test_a_replica_killed_mid_run_loses_and_double_counts_nothing(
    ray_node: RayNode, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0.1")
    killed: list[str] = []

    def kill() -> None:
        (actor,) = [a for a in _actors("gen/none/killed/0") if a.state == "ALIVE"]
        ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace))
        killed.append(actor.ray_namespace)

    watcher = _when_generated(tmp_path, 3, kill)
    code, _, err = cli(*_run_args(tmp_path, "killed", limit=16), "--replicas", "2")
    watcher.join()
    assert code == 0, err
    assert killed and "gen/none/killed/0 died" in err  # the dispatcher saw the death mid-run
    run = only_run(tmp_path)
    assert_each_sample_once(run, expected=16)
    (score,) = run.scores()
    assert score.pass_at_k == {1: 1.0}
    replaced = [a for a in _actors("gen/none/killed/0") if a.ray_namespace == killed[0]]
    assert len(replaced) == 2  # the killed one and its replacement, under the same name
    generated = ray_node.total("ray_evalpipe_samples_generated_total", model="killed")
    deadline = time.monotonic() + 10
    while generated != 16 and time.monotonic() < deadline:
        time.sleep(0.3)
        generated = ray_node.total("ray_evalpipe_samples_generated_total", model="killed")
    assert generated == 16  # re-queued requests are not counted twice


def test_a_replica_that_dies_once_is_replaced(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "died"
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DIE_AFTER", "3")
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DIE_MARKER", str(marker))
    runs = tmp_path / "runs"
    code, _, err = cli(*_run_args(runs, "dies-once", limit=10))
    assert code == 0, err
    assert marker.exists() and "gen/none/dies-once/0 died" in err
    run = only_run(runs)
    assert_each_sample_once(run, expected=10)
    assert run.scores()[0].pass_at_k == {1: 1.0}


def test_an_engine_that_keeps_dying_fails_the_run_resumably(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DIE_AFTER", "0")  # every replica dies on its first request
    code, _, err = cli(*_run_args(tmp_path, "always-dies", limit=4))
    assert code == 1
    assert "keeps dying" in err and "resumable" in err
    run = only_run(tmp_path)
    assert run.manifest.status == "failed"
    assert run.generations() == [] and run.executions() == []

    monkeypatch.delenv("EVALPIPE_SCRIPTED_DIE_AFTER")
    code, _, err = cli("resume", run.path)
    assert code == 0, err
    assert_each_sample_once(only_run(tmp_path), expected=4)


def test_ctrl_c_stops_the_run_kills_the_actors_and_resume_finishes_it(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0.2")
    watcher = _when_generated(tmp_path, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    code, _, err = cli(*_run_args(tmp_path, "interrupted", limit=12))
    watcher.join()
    assert code == 130, err
    run = only_run(tmp_path)
    assert run.manifest.status == "interrupted"
    assert 2 <= len(run.generations()) < 12
    deadline = time.monotonic() + 10
    while any(a.state != "DEAD" for a in _actors("gen/none/interrupted/")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(a.state == "DEAD" for a in _actors("gen/none/interrupted/"))

    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0")
    code, _, err = cli("resume", run.path)
    assert code == 0, err
    assert_each_sample_once(only_run(tmp_path), expected=12)


def test_an_engine_that_cannot_be_built_is_one_line_and_no_run_directory(cli: Cli, tmp_path: Path) -> None:
    """Under Ray the hf engine is built only in its replica; its error still comes before any file exists."""
    runs = tmp_path / "runs"
    missing = tmp_path / "no-such-model"
    code, _, err = cli(
        "run", "humaneval", "--engine", "hf", "-m", str(missing), "-b", "none", "--executor", "ray",
        "--sandbox", "process", "--limit", "1", "--runs-dir", runs,
    )  # fmt: skip
    assert code == 2, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "no-such-model" in error_lines[0], err
    assert "Traceback" not in err
    assert not any(runs.iterdir()) if runs.exists() else True
    assert all(actor.state == "DEAD" for actor in _actors("gen/none/"))  # type: ignore[attr-defined]
