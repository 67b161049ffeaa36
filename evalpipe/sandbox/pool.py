"""A pool of runner connections shared by every sandbox kind.

Why threads: each runner handles one job at a time and the work happens in other processes, so a thread per
runner only waits on a pipe or socket.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from evalpipe.errors import RunFailed
from evalpipe.records import SandboxLimits
from evalpipe.sandbox.base import Job, JobResult, runner_job

_GRACE_S = 30.0
"""Extra time over a job's wall limit before the host gives up on a runner (it enforces limits itself)."""


class RunnerGone(Exception):
    """The runner died, hung or spoke garbage; the connection must be replaced."""


class RunnerConnection:
    """A newline-delimited JSON channel to one runner. Subclasses provide raw reads and writes."""

    def __init__(self) -> None:
        self._buffer = b""
        self.hello: dict[str, Any] = {}

    # Subclasses implement these three.
    def _read_chunk(self, timeout: float) -> bytes | None:
        """Bytes read, b"" at end of stream, None when nothing arrived within `timeout`."""
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def handshake(self, timeout: float = 60.0) -> dict[str, Any]:
        self.hello = self.receive(timeout)
        if not self.hello.get("ready"):
            raise RunnerGone(f"runner did not start: {self.hello}")
        return self.hello

    def send(self, message: dict[str, Any]) -> None:
        try:
            self._write(json.dumps(message).encode() + b"\n")
        except OSError as error:
            raise RunnerGone(f"cannot write to runner: {error}") from error

    def receive(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerGone(f"runner sent nothing for {timeout:.0f} s")
            chunk = self._read_chunk(left)
            if chunk is None:
                continue
            if not chunk:
                raise RunnerGone("runner exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as error:
            raise RunnerGone(f"runner sent a malformed line: {line[:200]!r}") from error
        if not isinstance(message, dict):
            raise RunnerGone(f"runner sent {line[:200]!r}")
        return message


def read_fd_chunk(fd: int, timeout: float) -> bytes | None:
    """Read what is available on a pipe within `timeout` (None: nothing yet; b"": end of stream)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1 << 16) if ready else None


def read_socket_chunk(sock: socket.socket, timeout: float) -> bytes | None:
    """Like `read_fd_chunk`, for a socket."""
    ready, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(1 << 16) if ready else None


class RunnerPool:
    """Runs jobs on `workers` runners; restarts dead ones; re-runs timeouts alone before reporting them."""

    def __init__(
        self,
        start_runner: Callable[[int], RunnerConnection],
        workers: int,
        limits: SandboxLimits,
        max_runner_failures: int = 20,
    ) -> None:
        self._start_runner = start_runner
        self._workers = workers
        self._limits = limits
        self._connections: dict[int, RunnerConnection] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._max_failures = max_runner_failures
        self._closed = False

    def _connection(self, slot: int) -> RunnerConnection:
        connection = self._connections.get(slot)
        if connection is None:
            if self._closed:  # a worker thread still running after close() must not start new runners
                raise RunFailed("the sandbox was closed")
            connection = self._start_runner(slot)
            self._connections[slot] = connection
        return connection

    def _replace(self, slot: int) -> None:
        connection = self._connections.pop(slot, None)
        if connection is not None:
            connection.close()
        with self._lock:
            self._failures += 1
            if self._failures > self._max_failures:
                raise RunFailed(f"the sandbox keeps failing ({self._failures} runners replaced)")

    def run_one(self, slot: int, job: Job, attempts_before: int = 0) -> JobResult:
        """Run a job on the runner of `slot`; a runner that dies is replaced and the job retried once."""
        message = runner_job(f"{job.key.task_id}#{job.key.index}", job.program, self._limits)
        last_error = ""
        for attempt in (1, 2):
            try:
                connection = self._connection(slot)
                connection.send(message)
                reply = connection.receive(self._limits.wall_time_s + _GRACE_S)
                if reply.get("id") != message["id"]:
                    raise RunnerGone(f"runner answered job {reply.get('id')!r}, expected {message['id']!r}")
                fields = {k: reply[k] for k in JobResult.model_fields if k in reply}
                return JobResult(**{**fields, "attempts": attempts_before + attempt})
            except RunnerGone as error:
                last_error = str(error)
                self._replace(slot)
        return JobResult(
            status="sandbox_error",
            passed=False,
            note=f"runner failed twice: {last_error}",
            attempts=attempts_before + 2,
        )

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        todo: queue.Queue[Job | None] = queue.Queue(maxsize=self._workers * 2)
        done: queue.Queue[tuple[Job, JobResult] | BaseException | None] = queue.Queue()

        def feed() -> None:
            try:
                for job in jobs:
                    todo.put(job)
            except BaseException as error:  # the producer (generation) failed: stop and report it
                done.put(error)
            finally:
                for _ in range(self._workers):
                    todo.put(None)

        def work(slot: int) -> None:
            try:
                while (job := todo.get()) is not None:
                    done.put((job, self.run_one(slot, job)))
            except BaseException as error:
                done.put(error)
            finally:
                done.put(None)

        threads = [threading.Thread(target=feed, daemon=True, name="sandbox-feed")]
        threads += [
            threading.Thread(target=work, args=(slot,), daemon=True, name=f"sandbox-{slot}")
            for slot in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        timed_out: list[Job] = []
        finished = 0
        while finished < self._workers:
            item = done.get()
            if item is None:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            elif item[1].status == "timeout":
                timed_out.append(item[0])  # decided below, when nothing else competes for the CPU
            else:
                yield item
        # Wall-clock and even CPU-time limits are load-sensitive; a timeout counts only if it repeats alone.
        for job in timed_out:
            yield job, self.run_one(0, job, attempts_before=1)

    def close(self) -> None:
        self._closed = True
        for slot in list(self._connections):
            connection = self._connections.pop(slot, None)
            if connection is not None:
                connection.close()
