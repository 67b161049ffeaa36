"""Sandbox faults are not model failures: containers killed mid-run charge no sample, and resume finishes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from evalpipe import pipeline
from evalpipe.cli import make_executor
from evalpipe.errors import RunFailed
from evalpipe.records import ClusterConfig, RunConfig, SandboxLimits, Task
from evalpipe.rundir import RunDirectory
from evalpipe.sandbox.docker import DockerSandbox
from evalpipe.sources import file_sha256

CliResult = tuple[int, str, str]


def test_killed_containers_charge_no_sample_and_resume_completes(
    client: docker.DockerClient,
    image: str,
    tmp_path: Path,
    humaneval_tasks: list[Task],
    cli: Callable[..., CliResult],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Correct programs that take 0.3 s each, so that containers die while they run.
    samples = tmp_path / "slow.jsonl"
    rows = [
        {"task_id": task.id, "completion": f"{task.canonical_solution}\nimport time\ntime.sleep(0.3)\n"}
        for task in humaneval_tasks[:12]
        for _ in range(2)
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    limits = SandboxLimits(cpu_time_s=2, wall_time_s=10, memory_mb=512)
    config = RunConfig(
        suite="humaneval", engine="samples", models=("slow",), backends=("none",),
        samples_path=str(samples), samples_sha256=file_sha256(samples), allow_partial=True,
        sandbox="docker", limits=limits,
    )  # fmt: skip
    cluster = ClusterConfig(runs_dir=str(tmp_path / "runs"), workers=2)
    plan = pipeline.prepare(config, cluster)
    box = DockerSandbox(limits, workers=2)
    executor = make_executor(plan, box)
    run = RunDirectory.create(
        tmp_path / "runs",
        config,
        pipeline.new_manifest(plan, executor, pipeline.run_id_for(plan)),
        plan.tasks,
    )
    stop = threading.Event()
    killed: list[str] = []

    def kill_containers() -> None:
        """Kill whatever containers serve the run, again and again, for ~3 s once the first job runs."""
        while not stop.is_set() and not (run.path / "executions.jsonl").read_bytes():
            time.sleep(0.02)
        deadline = time.monotonic() + 3.0
        while not stop.is_set() and time.monotonic() < deadline:
            for container in box.container_ids():
                try:
                    client.api.kill(container)
                    killed.append(container)
                except docker.errors.APIError:
                    pass  # already gone
            time.sleep(0.05)

    killer = threading.Thread(target=kill_containers, daemon=True)
    killer.start()
    try:
        pipeline.execute(plan, run, executor)
        failed_run = False
    except RunFailed:  # the sandbox kept failing: the run stops, resumable
        failed_run = True
    finally:
        stop.set()
        killer.join()
        executor.close()
        plan.close()
        run.close()
    assert killed and box.runners_started > 2, "no container was killed mid-run"

    after_faults = run.executions()
    statuses = {e.status for e in after_faults}
    with capsys.disabled():  # the `cli` fixture captures output
        print(
            f"\n{len(killed)} kills, {box.runners_started} containers started, run failed: {failed_run}; "
            f"{len(after_faults)} of {len(rows)} executed: "
            + ", ".join(f"{s} {sum(e.status == s for e in after_faults)}" for s in sorted(statuses))
            + f"; {sum(e.attempts > 1 for e in after_faults)} needed a second attempt"
        )
    assert statuses <= {"passed", "sandbox_error"}, statuses  # no sample charged as failed or timed out
    assert failed_run or "sandbox_error" in statuses or any(e.attempts > 1 for e in after_faults)
    code, _, err = cli("score", run.path)
    assert code == 0, err
    for score in run.scores():
        assert all(n == c for n, c in score.per_task.values())  # sandbox errors are not in pass@k
        assert score.pass_at_k.get(1, 1.0) == 1.0

    code, _, err = cli("resume", run.path)
    assert code == 0, err
    final = run.executions()
    assert len(final) == len(rows) and all(e.status == "passed" for e in final)
    (score,) = run.scores()
    assert score.n_tasks == 12 and score.pass_at_k == {1: 1.0}
    assert run.manifest.status == "completed"
