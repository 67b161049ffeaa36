"""The runner's verdicts through the process sandbox: only a check completed in the judge is a pass."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import signal
from collections.abc import Iterator
from types import ModuleType

import pytest

from evalpipe.paths import runner_script
from evalpipe.records import SampleKey, SandboxLimits
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.sandbox.process import ProcessSandbox

TEST = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == 9\n"
GOOD = "def square(x):\n    return x * x\n"

CASES = {
    "correct": (GOOD, "passed"),
    "wrong": ("def square(x):\n    return x + 2\n", "failed"),
    "raises": ("def square(x):\n    raise ValueError(x)\n", "failed"),
    "missing_entry_point": ("def cube(x):\n    return x ** 3\n", "failed"),
    "sys_exit_0": ("import sys\nsys.exit(0)\n" + GOOD, "exited_early"),
    "os_exit_0": ("import os\nos._exit(0)\n" + GOOD, "exited_early"),
    "exit_in_call": ("import sys\ndef square(x):\n    sys.exit(0)\n", "exited_early"),
    "prints_passed": ("print('passed')\nraise SystemExit\n" + GOOD, "exited_early"),
    "kills_parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD,
        {"failed", "sandbox_error"},
    ),
    "tampers_builtins": (
        "import builtins, os\nbuiltins.AssertionError = SystemExit\nos.write = lambda *a: 0\n"
        "def square(x):\n    return 0\n",
        "failed",
    ),
    "exit_builtin_replaced": (
        "import builtins\nbuiltins.exit = lambda *a: None\n" + GOOD + "exit(0)\n",
        "passed",
    ),
    "main_block_does_not_run": (GOOD + "if __name__ == '__main__':\n    input()\n", "passed"),
    "always_equal": ("class A:\n    __eq__ = lambda s, o: True\ndef square(x):\n    return A()\n", "failed"),
    "int_subclass_always_equal": (
        "class I(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\n"
        "def square(x):\n    return I(1)\n",
        "failed",
    ),
    "honest_int_subclass": (
        "import enum\nclass I(enum.IntEnum):\n    FOUR = 4\n    NINE = 9\n"
        "def square(x):\n    return I(x * x)\n",
        "passed",
    ),
    "float_is_not_int": ("def square(x):\n    return float(x * x)\n", "passed"),
    "syntax_error": ("def square(x:\n", "syntax_error"),
    "infinite_loop": ("while True:\n    pass\n", "timeout"),
    "loop_in_call": ("def square(x):\n    while True:\n        pass\n", "timeout"),
    "sleeps": ("import time\ntime.sleep(60)\n", "timeout"),
    "memory_bomb": ("x = bytearray(8 << 30)\n", "oom"),
    "huge_file": ("open('big', 'wb').write(b'x' * (64 << 20))\n", "failed"),
}


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, JobResult]]:
    limits = SandboxLimits(cpu_time_s=1, wall_time_s=3, memory_mb=512, file_size_mb=8)
    sandbox = ProcessSandbox(limits, workers=2)
    jobs = [
        Job(
            key=SampleKey(model="m", backend="none", task_id=name, index=0),
            program=program,
            test=TEST,
            entry_point="square",
        )
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


def test_timeouts_are_run_twice(results: dict[str, JobResult]) -> None:
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


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evalpipe_runner", runner_script())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNNER = _runner()
PLAIN_VALUES: list[object] = [
    None, True, False, 0, 1, -7, 1.0, -0.0, float("inf"), "", "a\u00e9\n", b"\x00\xff", 2 + 3j,
    [], (), set(), frozenset(), {}, [1, (1,), [1.0]], (True, 1, 1.0), {1, "1", (1, 2)},
    {(1, 2): [3], "k": {"n": None}, 1: 1.0}, 10**5000, -(10**5000), [[[[["deep"]]]]],
]  # fmt: skip


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda value: type(value).__name__)
def test_plain_values_cross_with_their_exact_types(value: object) -> None:
    wire = json.loads(json.dumps(RUNNER.to_plain(value)))
    back = RUNNER.from_plain(wire)
    assert back == value and _shape(back) == _shape(value)


def _shape(value: object) -> object:
    """Types all the way down: 1 == 1.0 == True and [1] == [1.0], but their shapes differ."""
    if isinstance(value, (list, tuple)):
        return (type(value), [_shape(item) for item in value])
    if isinstance(value, (set, frozenset)):
        return (type(value), sorted(repr(_shape(item)) for item in value))
    if isinstance(value, dict):
        return (dict, sorted(repr((_shape(k), _shape(v))) for k, v in value.items()))
    return type(value)


def test_nan_crosses() -> None:
    assert math.isnan(RUNNER.from_plain(json.loads(json.dumps(RUNNER.to_plain(float("nan"))))))


class _Lying(list):  # type: ignore[type-arg]
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("value", [_Lying([1]), object(), len, {1: object()}, [object()]], ids=repr)
def test_the_judge_refuses_what_is_not_plain(value: object) -> None:
    with pytest.raises(RUNNER.NotPlain):
        RUNNER.to_plain(value)


def test_subclasses_cross_as_their_builtin_base_when_lenient() -> None:
    Point = collections.namedtuple("Point", "x y")
    lying = _Lying([3, 1])
    assert RUNNER.from_plain(RUNNER.to_plain(lying, lenient=True)) == [3, 1]
    assert type(RUNNER.from_plain(RUNNER.to_plain(lying, lenient=True))) is list
    assert RUNNER.from_plain(RUNNER.to_plain(Point(1, 2), lenient=True)) == (1, 2)
    assert RUNNER.from_plain(RUNNER.to_plain(collections.Counter("aab"), lenient=True)) == {"a": 2, "b": 1}


@pytest.mark.parametrize(
    "wire",
    [{"a": 1}, ["X", 1], ["D", 1], ["D", ["L"], 1], ["B", 5], ["I", "zz!"], ["C", "1", 2], [], [1, 2]],
    ids=repr,
)
def test_malformed_replies_are_refused(wire: object) -> None:
    with pytest.raises((RUNNER.NotPlain, ValueError, TypeError)):
        RUNNER.from_plain(wire)
