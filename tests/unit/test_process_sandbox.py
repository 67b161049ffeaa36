"""The runner's verdicts through the process sandbox: only a completed check is a pass."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from evalpipe.records import SampleKey, SandboxLimits
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.sandbox.process import ProcessSandbox

CHECK = "\ndef check(f):\n    assert f(2) == 4\n\ncheck(square)\n"
GOOD = "def square(x):\n    return x * x\n"

CASES = {
    "correct": (GOOD + CHECK, "passed"),
    "wrong": ("def square(x):\n    return x + 1\n" + CHECK, "failed"),
    "sys_exit_0": ("import sys\nsys.exit(0)\n" + GOOD + CHECK, "exited_early"),
    "os_exit_0": ("import os\nos._exit(0)\n" + GOOD + CHECK, "exited_early"),
    "prints_passed": ("print('passed')\nraise SystemExit\n" + GOOD + CHECK, "exited_early"),
    "kills_parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD + CHECK,
        {"failed", "sandbox_error"},
    ),
    "tampers_builtins": (
        "import builtins, os\nbuiltins.AssertionError = SystemExit\nos.write = lambda *a: 0\n"
        "def square(x):\n    return 0\n" + CHECK,
        "failed",
    ),
    "exit_builtin_replaced": (
        "import builtins\nbuiltins.exit = lambda *a: None\n" + GOOD + "exit(0)\n" + CHECK,
        "passed",
    ),
    "syntax_error": ("def square(x:\n" + CHECK, "syntax_error"),
    "infinite_loop": ("while True:\n    pass\n", "timeout"),
    "sleeps": ("import time\ntime.sleep(60)\n", "timeout"),
    "memory_bomb": ("x = bytearray(8 << 30)\n", "oom"),
    "huge_file": ("open('big', 'wb').write(b'x' * (64 << 20))\n", "failed"),
}


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, JobResult]]:
    limits = SandboxLimits(cpu_time_s=1, wall_time_s=3, memory_mb=512, file_size_mb=8)
    sandbox = ProcessSandbox(limits, workers=2)
    jobs = [
        Job(key=SampleKey(model="m", backend="none", task_id=name, index=0), program=program)
        for name, (program, _) in CASES.items()
    ]
    try:
        yield {job.key.task_id: result for job, result in sandbox.run(jobs)}
    finally:
        sandbox.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict(results: dict[str, JobResult], name: str) -> None:
    expected = CASES[name][1]
    result = results[name]
    allowed = expected if isinstance(expected, set) else {expected}
    assert result.status in allowed, result
    assert result.passed == (result.status == "passed")


def test_timeouts_are_rerun_alone(results: dict[str, JobResult]) -> None:
    assert results["infinite_loop"].attempts == 2
    assert results["correct"].attempts == 1


def test_output_is_captured_and_capped() -> None:
    sandbox = ProcessSandbox(SandboxLimits(output_bytes=100), workers=1)
    try:
        job = Job(
            key=SampleKey(model="m", backend="none", task_id="t", index=0), program="print('x' * 5000)\n"
        )
        [(_, result)] = list(sandbox.run([job]))
    finally:
        sandbox.close()
    assert result.status == "passed"
    assert result.stdout_tail.endswith("x" * 50 + "\n")
    assert len(result.stdout_tail) < 200


def test_a_job_queued_behind_a_dying_runner_is_not_charged_for_its_death() -> None:
    """Jobs are sent two deep: when the runner dies, only the job it was running is charged an attempt;
    the job waiting behind it never started and runs once on the replacement."""
    sandbox = ProcessSandbox(SandboxLimits(), workers=1)
    programs = ["import os\nprint(os.getppid())\n", "import time\ntime.sleep(1)\n", "pass\n", "pass\n"]
    jobs = [
        Job(key=SampleKey(model="m", backend="none", task_id=f"t{i}", index=0), program=program)
        for i, program in enumerate(programs)
    ]
    results: dict[str, JobResult] = {}
    try:
        for job, result in sandbox.run(jobs):
            results[job.key.task_id] = result
            if job.key.task_id == "t0":  # t1 is running now and t2 waits behind it: kill their runner
                os.kill(int(result.stdout_tail), signal.SIGKILL)
    finally:
        sandbox.close()
    assert sorted(results) == ["t0", "t1", "t2", "t3"]
    assert (results["t1"].status, results["t1"].attempts) == ("passed", 2)
    for name in ("t0", "t2", "t3"):
        assert (results[name].status, results[name].attempts) == ("passed", 1), results[name]
