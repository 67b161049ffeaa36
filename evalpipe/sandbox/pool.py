"""A pool of runner connections shared by every sandbox kind.

Why threads: each runner handles one job at a time and the work happens in other processes, so a thread per
runner only waits on a pipe or socket.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

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


_START_RETRY_S = 0.5
"""Pause before starting a runner again after one failed to start (a daemon restarting, a full host)."""
_RERUN_ONCE = frozenset({"timeout", "sandbox_error"})
"""Statuses that are decided only by a second run."""

PIPELINE_DEPTH = 2
"""Jobs sent ahead to each runner: the next job waits in its stdin while the current one runs, so a runner
never idles for a round trip to evalpipe. Runners still run one program at a time."""


class RunnerPool:
    """Runs jobs on `workers` runners; restarts dead ones; runs timeouts and sandbox errors a second time
    before reporting them."""

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
        self._slot_locks = [threading.Lock() for _ in range(workers)]
        self._warming: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._failures = 0
        self._max_failures = max_runner_failures
        self._closed = False

    def warm(self) -> None:
        """Start every runner now, in the background, so that start-up overlaps with the caller's own.

        A runner that fails to start here is started again (and its error reported) by the first job.
        """

        def start(slot: int) -> None:
            with contextlib.suppress(RunnerGone, RunFailed):
                self._connection(slot)

        self._warming = [
            threading.Thread(target=start, args=(slot,), daemon=True, name=f"sandbox-warm-{slot}")
            for slot in range(self._workers)
        ]
        for thread in self._warming:
            thread.start()

    def _connection(self, slot: int) -> RunnerConnection:
        with self._slot_locks[slot]:  # a warm-up start in progress for this slot is waited for, not repeated
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

    def _message(self, job: Job) -> dict[str, Any]:
        return runner_job(f"{job.key.task_id}#{job.key.index}", job, self._limits)

    def _result(self, message: dict[str, Any], reply: dict[str, Any], attempts: int) -> JobResult:
        if reply.get("id") != message["id"]:
            raise RunnerGone(f"runner answered job {reply.get('id')!r}, expected {message['id']!r}")
        fields = {k: reply[k] for k in JobResult.model_fields if k in reply}
        return JobResult(**{**fields, "attempts": attempts})

    @staticmethod
    def _gave_up(error: str, attempts: int) -> JobResult:
        return JobResult(
            status="sandbox_error", passed=False, note=f"runner failed twice: {error}", attempts=attempts
        )

    def _serve_slot(
        self, slot: int, todo: queue.Queue[Job | None], done: queue.Queue[tuple[Job, JobResult]]
    ) -> None:
        """Feed one runner up to PIPELINE_DEPTH jobs ahead and collect its results in order.

        When the runner dies, the oldest unanswered job is the one it was running: that job is charged an
        attempt (a second failure records `sandbox_error`); the jobs queued behind it never started and are
        sent again to the replacement without being charged.
        """
        in_flight: collections.deque[tuple[Job, dict[str, Any], int]] = collections.deque()
        unsent: collections.deque[tuple[Job, dict[str, Any], int]] = collections.deque()
        exhausted = False
        while True:
            while not exhausted and len(in_flight) + len(unsent) < PIPELINE_DEPTH:
                try:  # block only when there is nothing else to wait for
                    job = todo.get(block=not (in_flight or unsent))
                except queue.Empty:
                    break
                if job is None:
                    exhausted = True
                else:
                    unsent.append((job, self._message(job), 0))
            if not (in_flight or unsent):
                return
            try:
                connection = self._connection(slot)
            except RunnerGone:
                # A runner that never started ran nothing: no job is charged. `_replace` counts the failure
                # and gives up (RunFailed: the run stops, resumable) when the sandbox keeps failing.
                self._replace(slot)
                time.sleep(_START_RETRY_S)
                continue
            try:
                while unsent:
                    connection.send(unsent[0][1])
                    in_flight.append(unsent.popleft())
                job, message, charged = in_flight[0]
                reply = connection.receive(self._limits.wall_time_s + _GRACE_S)
                result = self._result(message, reply, charged + 1)
                in_flight.popleft()
                if result.status in _RERUN_ONCE and charged == 0:
                    # Timeouts (wall and even CPU time are load-sensitive) and the runner's own failures
                    # count only if they repeat: run it again now, next on this runner, while the other
                    # runners go on with theirs.
                    unsent.appendleft((job, message, 1))
                else:
                    done.put((job, result))
            except RunnerGone as error:
                self._replace(slot)
                retry = in_flight + unsent
                in_flight.clear()
                unsent.clear()
                if retry:
                    job, message, charged = retry.popleft()
                    if charged + 1 >= 2:
                        done.put((job, self._gave_up(str(error), charged + 1)))
                    else:
                        retry.appendleft((job, message, charged + 1))
                unsent.extend(retry)

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
                self._serve_slot(slot, todo, cast("queue.Queue[tuple[Job, JobResult]]", done))
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
        finished = 0
        while finished < self._workers:
            item = done.get()
            if item is None:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def close(self) -> None:
        self._closed = True
        for thread in self._warming:  # a runner being started now is closed below, not left behind
            thread.join()
        connections = [self._connections.pop(slot) for slot in list(self._connections)]
        # In parallel: removing a container takes ~0.1 s of waiting on the daemon.
        closers = [threading.Thread(target=connection.close, daemon=True) for connection in connections]
        for thread in closers:
            thread.start()
        for thread in closers:
            thread.join()
