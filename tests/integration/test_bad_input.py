"""Bad input: one line on stderr, exit code 2, no traceback, and no run directory left behind."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

CliResult = tuple[int, str, str]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = {"task_id": "HumanEval/0", "completion": "    return True\n"}
    return {
        "bad_json": _write(tmp_path / "bad.jsonl", '{"task_id": "HumanEval/0", "completion": \n'),
        "missing_key": _write(tmp_path / "nokey.jsonl", json.dumps({"task_id": "HumanEval/0"}) + "\n"),
        "unknown_task": _write(tmp_path / "unknown.jsonl", json.dumps({**good, "task_id": "Nope/1"}) + "\n"),
        "one_sample": _write(tmp_path / "one.jsonl", json.dumps(good) + "\n"),
        "not_object": _write(tmp_path / "list.jsonl", "[1, 2]\n"),
        "a_file": _write(tmp_path / "a_file", "x"),
        "not_a_run": tmp_path / "empty_dir",
        "bad_tasks": _write(tmp_path / "tasks.jsonl", json.dumps({"task_id": "T/0", "prompt": "x"}) + "\n"),
    }


CASES: dict[str, tuple[list[str], str]] = {
    "missing samples file": (["--samples", "{tmp}/does-not-exist.jsonl"], "does not exist"),
    "malformed samples JSON": (["--samples", "{bad_json}"], "not valid JSON"),
    "samples line missing a key": (["--samples", "{missing_key}"], "missing key 'completion'"),
    "samples line not an object": (["--samples", "{not_object}"], "expected a JSON object"),
    "unknown task id": (["--samples", "{unknown_task}"], "unknown task_id 'Nope/1'"),
    "unknown engine": (["--engine", "refrence"], "did you mean 'reference'"),
    "unknown backend": (["--engine", "reference", "-b", "guidanse"], "did you mean 'guidance'"),
    "unknown sandbox": (["--engine", "reference", "--sandbox", "dokcer"], "did you mean 'docker'"),
    "backend for a replay engine": (["--engine", "reference", "-b", "guidance"], "takes no backend"),
    "k larger than n": (["--samples", "{one_sample}", "--allow-partial", "-k", "10"], "k=10 is larger"),
    "samples for some tasks only": (["--samples", "{one_sample}"], "no samples for 163 of the run's 164"),
    "zero k": (["--samples", "{one_sample}", "-k", "0"], "--k"),
    "zero limit": (["--engine", "reference", "--limit", "0"], "--limit"),
    "negative limit": (["--engine", "reference", "--limit", "-3"], "--limit"),
    "zero samples per task": (["--engine", "reference", "-n", "0"], "--n-samples"),
    "zero cpu time": (["--engine", "reference", "--cpu-time-s", "0"], "--cpu-time-s"),
    "negative memory": (["--engine", "reference", "--memory-mb", "-1"], "--memory-mb"),
    "runs dir under a file": (["--engine", "reference", "--runs-dir", "{a_file}/runs"], "cannot create runs"),
    "resume of a non-run": (["--engine", "reference", "--resume", "{not_a_run}"], "not an evalpipe run"),
    "not a number": (["--engine", "reference", "--limit", "many"], "'--limit'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(cli: Callable[..., CliResult], files: dict[str, Path], tmp_path: Path, case: str) -> None:
    args, message = CASES[case]
    (tmp_path / "empty_dir").mkdir(exist_ok=True)
    names = {name: str(path) for name, path in files.items()} | {"tmp": str(tmp_path)}
    runs = tmp_path / "runs"
    argv = [arg.format(**names) for arg in args]
    if "--runs-dir" not in argv:
        argv += ["--runs-dir", str(runs)]
    if "--sandbox" not in argv:
        argv += ["--sandbox", "process"]
    code, out, err = cli("run", "humaneval", *argv)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["unknown-suite"], "unknown suite"),
        (["{bad_tasks}"], "missing key(s) entry_point, test"),
    ],
)
def test_bad_suite(
    cli: Callable[..., CliResult], files: dict[str, Path], tmp_path: Path, command: list[str], message: str
) -> None:
    names = {name: str(path) for name, path in files.items()}
    code, _, err = cli("run", *(c.format(**names) for c in command), "--engine", "reference",
                       "--runs-dir", tmp_path / "runs")  # fmt: skip
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["show", "score", "resume"])
def test_commands_on_a_non_run(cli: Callable[..., CliResult], tmp_path: Path, command: str) -> None:
    code, _, err = cli(command, tmp_path)
    assert code == 2 and "not an evalpipe run directory" in err


def test_unknown_schema_version_is_refused(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    code, _, err = cli("show", tmp_path)
    assert code == 2 and "schema_version 99" in err


def test_gzipped_samples_are_read(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    code, out, err = cli(
        "run", "humaneval", "--samples", path, "--allow-partial", "--sandbox", "process",
        "--runs-dir", tmp_path / "r",
    )  # fmt: skip
    assert code == 0, err
    assert "s " in out or "│ s" in out
