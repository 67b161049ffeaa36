"""The `docker` sandbox: one warm container per worker, each running the stdlib-only runner.

The runner (`sandboxes/runner.py`) forks a child per program, so a container costs its start-up (~0.4 s)
once, not per program; containers start in the background as soon as the sandbox is made. evalpipe talks
to the runner over the Docker attach socket: job lines in on stdin, result lines out on stdout, through
`RunnerPool` exactly like the `process` sandbox.

What contains a program (all reported by `describe()`):
- no network (`network_mode="none"`), no IPC namespace sharing and no /dev/shm (`ipc_mode="none"`);
- a read-only root filesystem; the only writable places are the runner's tmpfs work root (mode 711, a fresh
  0700 work dir per program, wiped after it) and the runner's own /tmp, which programs cannot write;
- a non-root uid of its own per container (random, so RLIMIT_NPROC, which the kernel counts per uid across
  the whole host, counts only this container's programs), no capabilities, `no-new-privileges`;
- memory = memory+swap limit, a pids limit and one CPU per container, on top of the runner's per-program
  RLIMIT_CPU/AS/FSIZE/NPROC; CPU time, not wall time, decides timeouts, so load does not change scores;
- output capped by the runner (RLIMIT_FSIZE on the capture files, tails of `output_bytes`) and no Docker log
  driver, so nothing a program prints is stored by Docker.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import docker
import docker.errors
from docker.types import LogConfig

from evalpipe.records import SandboxLimits
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.sandbox.image import (
    DEFAULT_IMAGE,
    RUNNER_PATH,
    WORK_ROOT,
    docker_client,
    docker_errors,
    ensure_image,
    runner_sha256,
)
from evalpipe.sandbox.pool import RunnerConnection, RunnerGone, RunnerPool, read_socket_chunk

RUNNER_MEMORY_MB = 64
"""Memory for the runner itself and its short-lived helper (cleanup) on top of the program's limit."""
RUNNER_PIDS = 16
"""Processes for the runner and its helpers on top of the program's process limit."""
TMP_MB = 1
"""/tmp exists because some tools insist on it; programs cannot write there (their TMPDIR is the work dir)."""
JOB_UID_RANGE = (1_000_000, 1_000_000_000)
"""Job uids are drawn from here: far above any real account, and distinct between containers."""
LABEL = "evalpipe.sandbox"
"""Every container carries this label (value: the sandbox instance), so leftovers can be found and removed."""

# The runner starts as root in the container only to run programs under the job uid. These are the
# capabilities it needs for that; a program loses all of them when the child switches uid (the kernel
# clears permitted/effective sets on setuid from root), and no-new-privileges stops it regaining any.
RUNNER_CAPABILITIES = (
    "SETUID",  # setuid(job uid) in the child, and in the helper that kills every process of that uid
    "SETGID",  # setgroups([]) and setgid(job uid) in the child
    "CHOWN",  # hand the fresh per-program work dir to the job uid
    "FOWNER",  # chmod that dir after the chown, and unlink from sticky dirs a program may leave behind
    "DAC_OVERRIDE",  # create the capture files in, read them from and wipe a work dir the program owns,
    # whatever modes the program set on what it left there
    "KILL",  # signal the program's process group (another uid) on wall timeout and clean-up
)


def container_settings(limits: SandboxLimits) -> dict[str, Any]:
    """The `docker create` host settings for a runner container under `limits`.

    Memory is memory+swap (no swap), sized for one program at its RLIMIT_AS plus the tmpfs mounts (their
    pages count against the container) plus the runner.
    """
    work_mb = 4 * limits.file_size_mb + 16  # a few files at the size limit, plus capture files
    memory_mb = limits.memory_mb + work_mb + TMP_MB + RUNNER_MEMORY_MB
    return {
        "network_mode": "none",
        "ipc_mode": "none",
        "mem_limit": f"{memory_mb}m",
        "memswap_limit": f"{memory_mb}m",
        "pids_limit": limits.max_processes + RUNNER_PIDS,
        "nano_cpus": 1_000_000_000,  # one CPU: a program cannot slow the other containers' programs
        "read_only": True,
        "tmpfs": {
            # noexec: a program cannot run binaries it wrote; mode 711: it cannot list other work dirs.
            WORK_ROOT: f"rw,noexec,nosuid,nodev,size={work_mb}m,mode=711",
            "/tmp": f"rw,noexec,nosuid,nodev,size={TMP_MB}m,mode=755",
        },
        "cap_drop": ["ALL"],
        "cap_add": list(RUNNER_CAPABILITIES),
        "security_opt": ["no-new-privileges"],
        "log_config": LogConfig(type="none"),
    }


def _describe_settings(settings: dict[str, Any]) -> dict[str, Any]:
    shown = {key: value for key, value in settings.items() if key != "log_config"}
    shown["log_driver"] = settings["log_config"].type
    shown["user"] = "root (runner, capabilities below) / job uid (programs, no capabilities)"
    shown["cpus"] = settings["nano_cpus"] / 1e9
    del shown["nano_cpus"]
    return shown


class _Demultiplexer:
    """Splits Docker's attach stream (no tty) into stdout bytes and a bounded stderr tail.

    Each frame is an 8-byte header (stream type: 1 stdout, 2 stderr; 3 zero bytes; big-endian payload size)
    followed by the payload. Frames may arrive split across reads, or several in one read.
    """

    STDERR_KEEP = 4096

    def __init__(self) -> None:
        self._pending = b""
        self.stderr_tail = b""

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        stdout = bytearray()
        while len(self._pending) >= 8:
            stream, padding, size = struct.unpack(">B3sI", self._pending[:8])
            if stream not in (1, 2) or padding != b"\0\0\0":
                # Not Docker framing (a tty stream, or we lost sync): nothing after this can be trusted.
                raise RunnerGone(f"malformed attach stream header {self._pending[:8]!r}")
            if len(self._pending) < 8 + size:
                break
            payload = self._pending[8 : 8 + size]
            self._pending = self._pending[8 + size :]
            if stream == 1:
                stdout += payload
            else:
                self.stderr_tail = (self.stderr_tail + payload)[-self.STDERR_KEEP :]
        return bytes(stdout)


class _ContainerRunner(RunnerConnection):
    """One container running the runner as PID 1; removed (killed first) on close."""

    def __init__(
        self, client: docker.DockerClient, image: str, settings: dict[str, Any], labels: dict[str, str]
    ):
        super().__init__()
        self.job_uid = JOB_UID_RANGE[0] + secrets.randbelow(JOB_UID_RANGE[1] - JOB_UID_RANGE[0])
        self.judge_uid = self.job_uid
        while self.judge_uid == self.job_uid:
            self.judge_uid = JOB_UID_RANGE[0] + secrets.randbelow(JOB_UID_RANGE[1] - JOB_UID_RANGE[0])
        self._demux = _Demultiplexer()
        self._container: Any = None
        self._attach: Any = None
        command = [
            "python3",
            "-I",
            "-S",
            RUNNER_PATH,
            "--work-root",
            WORK_ROOT,
            "--job-uid",
            str(self.job_uid),
            "--judge-uid",
            str(self.judge_uid),
        ]
        try:
            # stdin_open without detach sets StdinOnce: when evalpipe dies, the attach connection closes,
            # stdin closes, the runner reads EOF and exits, and Docker removes the container (auto_remove):
            # no leftovers even after a crash.
            created = client.api.create_container(
                image,
                command=command,
                user="0:0",
                labels=labels,
                stdin_open=True,
                detach=False,
                host_config=client.api.create_host_config(auto_remove=True, **settings),
            )
            self._container = client.containers.get(created["Id"])
            # Attach before start: nothing is missed, and nothing arrives before the HTTP upgrade completes
            # (bytes the HTTP response had buffered past its headers would be lost to a raw socket reader).
            # Ctrl-P,Ctrl-Q (Docker's default detach keys) cannot occur in our stream: JSON escapes control
            # characters.
            self._attach = client.api.attach_socket(
                self._container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            raw = getattr(self._attach, "_sock", self._attach)
            if not isinstance(raw, socket.socket):
                raise RunnerGone(f"unsupported attach transport {type(raw).__name__}")
            self._socket = raw
            self._container.start()
            hello = self.handshake()
            if hello.get("job_uid") != self.job_uid or hello.get("judge_uid") != self.judge_uid:
                raise RunnerGone(f"the runner is not root in its container and cannot switch uid: {hello}")
        except RunnerGone:
            self.close()
            raise
        except Exception as error:  # Docker SDK or requests errors: the pool retries, then gives up
            self.close()
            raise RunnerGone(f"cannot start a sandbox container: {error}") from error
        except BaseException:
            self.close()
            raise

    @property
    def container_id(self) -> str:
        return str(self._container.id) if self._container is not None else ""

    def _read_chunk(self, timeout: float) -> bytes | None:
        try:
            data = read_socket_chunk(self._socket, timeout)
        except OSError as error:
            raise RunnerGone(f"attach socket failed: {error}") from error
        if data is None:
            return None
        if not data:
            stderr = self._demux.stderr_tail.decode(errors="replace").strip()
            raise RunnerGone("runner exited" + (f"; its stderr ends: {stderr[-500:]}" if stderr else ""))
        return self._demux.feed(data) or None

    def _write(self, data: bytes) -> None:
        self._socket.sendall(data)

    def close(self) -> None:
        # Remove first (SIGKILL + delete), then drop the socket. Never raise: this runs while the pool
        # replaces a dead runner. Errors mean the container is gone already (404), auto_remove is removing it
        # (409) or the daemon is unreachable; DockerSandbox.close() sweeps by label for anything left.
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.remove(force=True)
            self._container = None
        if self._attach is not None:
            with contextlib.suppress(OSError):
                self._attach.close()
            self._attach = None


class DockerSandbox:
    """Runs each program in a forked child of a runner that lives in a warm, locked-down container."""

    def __init__(
        self,
        limits: SandboxLimits,
        workers: int,
        *,
        image: str = DEFAULT_IMAGE,
        runtime: str | None = None,
        client: docker.DockerClient | None = None,
    ) -> None:
        """Check the daemon and the image now (a clear `UserError` if either is missing), then start one
        container per worker in the background, so that they are warm when the first jobs come. `runtime`
        picks another OCI runtime, e.g. `runsc` (gVisor).
        """
        self._limits = limits
        self._workers = workers
        self._image = image
        self._client = client or docker_client()
        self._image_id = ensure_image(image, self._client)
        self._settings = container_settings(limits)
        if runtime is not None:
            self._settings["runtime"] = runtime
        self.instance = secrets.token_hex(6)
        """Value of the `evalpipe.sandbox` label on this sandbox's containers."""
        self._lock = threading.Lock()
        self._runners: dict[int, _ContainerRunner] = {}
        self.runners_started = 0
        """How many containers this sandbox started: more than `workers` means some were replaced."""
        with docker_errors("cannot query the Docker daemon"):
            self._server = self._client.version()
        self._pool = RunnerPool(self._start, workers, limits)
        self._pool.warm()

    def _start(self, slot: int) -> RunnerConnection:
        labels = {LABEL: self.instance, f"{LABEL}.slot": str(slot)}
        runner = _ContainerRunner(self._client, self._image_id, self._settings, labels)
        with self._lock:
            self._runners[slot] = runner
            self.runners_started += 1
        return runner

    def container_ids(self) -> list[str]:
        """Ids of the containers currently serving this sandbox."""
        with self._lock:
            return [runner.container_id for runner in self._runners.values() if runner.container_id]

    def describe(self) -> dict[str, Any]:
        """Kind, image and image id, runner hash, limits and every container setting."""
        return {
            "kind": "docker",
            "image": self._image,
            "image_id": self._image_id,
            "runner_sha256": runner_sha256(),
            "workers": self._workers,
            "limits": self._limits.model_dump(),
            "container": {
                **_describe_settings(self._settings),
                "job_uid": f"non-root, random per container in [{JOB_UID_RANGE[0]}, {JOB_UID_RANGE[1]})",
                "judge_uid": "non-root, random per container, never the job uid",
                "runtime": self._settings.get("runtime", "default"),
            },
            "docker_server": str(self._server.get("Version", "")),
        }

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        """Run jobs on the warm containers and yield results as they complete (see `RunnerPool.run`)."""
        return self._pool.run(jobs)

    def close(self) -> None:
        """Remove every container of this sandbox, also any a crashed connection left behind."""
        self._pool.close()
        with self._lock:
            self._runners.clear()
        # Errors: already gone, auto_remove is on it, or the daemon went away (then stdin_once and
        # auto_remove end the containers once it is back).
        with contextlib.suppress(Exception):
            for container in self._client.containers.list(
                all=True, filters={"label": f"{LABEL}={self.instance}"}
            ):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
