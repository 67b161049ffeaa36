"""The Sandbox seam: programs in, results out, as they complete.

Every sandbox runs the same stdlib-only runner (`sandboxes/runner.py`) and differs only in where that runner
lives: a local subprocess (`process`, development only) or a warm container (`docker`). `RunnerPool` does the
rest for all of them: concurrency, retries, replacing dead runners and re-running timeouts alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from evalpipe.records import Record, SampleKey, SandboxLimits


class Job(Record):
    """One program to run and, apart from it, the suite's test that judges it.

    The runner executes `program` (untrusted: prompt + completion) in one process and `helpers` then `test`
    (trusted suite code) in a judge process, where `check(candidate)` runs with `candidate` calling
    `entry_point` in the program across a process boundary, as plain data. Without a test the program passes
    when its module runs to completion (the self-check's attack programs, which judge themselves).
    """

    key: SampleKey
    program: str
    test: str = ""
    entry_point: str = ""
    helpers: str = ""
    """Code the judge runs before the test, e.g. the prompt, whose helpers (HumanEval/32's `poly`) the test
    calls: the suite's own definitions, not the program's."""


class JobResult(Record):
    """How a program ended, as the runner reports it."""

    status: str
    passed: bool
    exit_code: int | None = None
    duration_s: float | None = None
    cpu_s: float | None = None
    note: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    attempts: int = 1


class Sandbox(Protocol):
    """Runs programs in isolation. Constructed with the run's limits and a worker count."""

    def describe(self) -> dict[str, Any]:
        """Kind, limits and (where there is one) the image id: written into the manifest."""
        ...

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        """Run jobs (the iterable may block while generation goes on) and yield results as they complete."""
        ...

    def close(self) -> None:
        """Stop every runner and release containers or processes."""
        ...


def runner_job(job_id: str, job: Job, limits: SandboxLimits) -> dict[str, Any]:
    """The JSON job the runner reads."""
    return {
        "id": job_id,
        "program": job.program,
        "test": job.test,
        "entry_point": job.entry_point,
        "helpers": job.helpers,
        "cpu_time_s": limits.cpu_time_s,
        "wall_time_s": limits.wall_time_s,
        "memory_bytes": limits.memory_mb << 20,
        "file_size_bytes": limits.file_size_mb << 20,
        "max_processes": limits.max_processes,
        "output_bytes": limits.output_bytes,
    }
