"""The `process` sandbox: the runner as a local subprocess. For development only.

It applies CPU, memory, file-size and (as root, under a uid of its own per worker) process limits, but it
shares the host's filesystem view, network and kernel with evalpipe. Use `--sandbox docker` for anything you
did not write yourself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from evalpipe.paths import runner_script
from evalpipe.records import SandboxLimits
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.sandbox.pool import RunnerConnection, RunnerPool, read_fd_chunk

WARNING = (
    "the 'process' sandbox is for development: programs run on this host with resource limits but without "
    "filesystem or network isolation; use --sandbox docker for untrusted code"
)
UID_RANGE = (1_000_000, 1_000_000_000)
"""As root, each runner runs its programs under a job uid and its judge under a judge uid of its own, drawn
at random from here (far above any real account): RLIMIT_NPROC and the clean-up after each program (which
kills every process of the job uid) then see only that runner's programs, also when several sandboxes run
on one host at once (Ray's sandbox workers, parallel runs), and a program cannot signal or trace its judge."""


def _fresh_uids() -> tuple[int, int]:
    job = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    judge = job
    while judge == job:
        judge = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    return job, judge


class _SubprocessRunner(RunnerConnection):
    def __init__(self, work_root: Path, slot: int | None) -> None:
        super().__init__()
        command = [sys.executable, "-I", "-S", str(runner_script()), "--work-root", str(work_root)]
        if slot is not None:
            job_uid, judge_uid = _fresh_uids()
            command += ["--job-uid", str(job_uid), "--judge-uid", str(judge_uid)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        self.handshake()

    def _read_chunk(self, timeout: float) -> bytes | None:
        return read_fd_chunk(self._stdout.fileno(), timeout)

    def _write(self, data: bytes) -> None:
        self._stdin.write(data)
        self._stdin.flush()

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        self._stdin.close()
        self._stdout.close()


class ProcessSandbox:
    """Runs each program in a forked child of a local runner process. Development only: see WARNING."""

    def __init__(self, limits: SandboxLimits, workers: int) -> None:
        self._limits = limits
        self._workers = workers
        self._work_root = Path(tempfile.mkdtemp(prefix="evalpipe-sandbox-"))
        self._work_root.chmod(0o711)  # job uids must reach their own work dirs inside
        self._as_root = os.geteuid() == 0
        self._pool = RunnerPool(self._start, workers, limits)
        self._pool.warm()

    def _start(self, slot: int) -> RunnerConnection:
        return _SubprocessRunner(self._work_root, slot if self._as_root else None)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "process",
            "isolation": "development only: no filesystem or network isolation",
            "workers": self._workers,
            "limits": self._limits.model_dump(),
            "process_limit": "per-worker uid" if self._as_root else "none (not root)",
            "judge": "separate process, per-worker uid" if self._as_root else "separate process, same uid",
            "python": sys.version.split()[0],
        }

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        return self._pool.run(jobs)

    def close(self) -> None:
        self._pool.close()
        shutil.rmtree(self._work_root, ignore_errors=True)
