"""`evalpipe sandbox check`: run hostile programs through a sandbox and report whether each was contained.

Every hostile program is written so that it *passes* only when its attack worked (it reached the network,
found another sample's files, forged its result, wrote outside its work dir...), and otherwise fails.
After each one a canonical program runs on the same runner and must pass: that shows the runner survived and
nothing the hostile program did (leftover processes, files, memory, IPC objects) reached the next sample.

Build the sandbox with `workers=1` so that "the same runner" holds: with more workers the canonical program
may land on another one and prove less.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evalpipe.records import Record, SampleKey
from evalpipe.sandbox.base import Job, JobResult, Sandbox

SCRATCH_PREFIX = "evalpipe-selfcheck-"
"""Files the checks try to leave outside their work dir are named so; the check removes any it finds."""
_LEFTOVER_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

CANONICAL = """\
from typing import List
import os


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True
    return False


# A clean start: a fresh, empty work dir, and memory to use.
assert sorted(os.listdir(".")) == [".stderr", ".stdout"], os.listdir(".")
assert len(bytearray(64 << 20)) == 64 << 20
"""
CANONICAL_TEST = """\
def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
"""
"""HumanEval/0's canonical solution and checks of a fresh work dir; CANONICAL_TEST judges it."""


@dataclass(frozen=True)
class HostileCase:
    """One attack: `program` may use @PORT@, @SECRET@ and @JOB_ID@; `setup` runs just before it.

    With a `test` the program is judged as a sample is (the test's `check` calls `entry_point` from the
    judge); without one it passes when its module runs to completion.
    """

    name: str
    program: str
    expected: frozenset[str]
    setup: str | None = None
    test: str = ""
    entry_point: str = ""


_SOLUTION = "def add(a, b):\n    return a + b\n\n\n"
ADD_TEST = (
    "def check(candidate):\n"
    "    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n"
    "    assert candidate(10, 5) == 15\n"
)
"""The test of the forgery attempts: each program's `add` is wrong, so only a forged verdict passes."""
SORT_TEST = "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n"
FLOAT_TEST = "def check(candidate):\n    assert abs(candidate(1.5, 1.5) - 3.0) < 1e-6\n"
_FORGED_FRAMES = (
    # What the judge would read from a program that answered, and what the runner would take for a verdict.
    "fake = [b'\\x00\\x00\\x00\\x09[\"ready\"]', b'\\x00\\x00\\x00\\x08[\"ok\",5]',\n"
    "        (json.dumps({'id': '@JOB_ID@', 'status': 'passed', 'passed': True}) + '\\n').encode()]\n"
)


def _forgery(name: str, program: str, expected: str = "failed", *, test: str = ADD_TEST) -> HostileCase:
    entry = "sort_list" if test is SORT_TEST else "add"
    return HostileCase(name, program, frozenset({expected}), test=test, entry_point=entry)


FORGERIES: tuple[HostileCase, ...] = (
    _forgery(
        "forgery: walking frames for the verdict's secret",
        "import os, sys\n"
        "def add(a, b):\n"
        "    secrets = set()\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        for value in [*frame.f_locals.values(), *frame.f_globals.values()]:\n"
        "            if isinstance(value, bytes) and len(value) == 32:\n"
        "                secrets.add(value)\n"
        "        frame = frame.f_back\n"
        "    for secret in secrets:\n"
        "        for fd in range(3, 64):\n"
        "            try:\n"
        "                os.write(fd, secret)\n"
        "            except OSError:\n"
        "                pass\n"
        "    os._exit(0)\n",
        "exited_early",
    ),
    _forgery(
        "forgery: walking frames at module level",
        "import os, sys\n"
        "secrets = set()\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    secrets |= {v for v in frame.f_locals.values() if isinstance(v, bytes) and len(v) == 32}\n"
        "    frame = frame.f_back\n"
        "for secret in secrets:\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            os.write(fd, secret)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
        "def add(a, b):\n"
        "    return 0\n",
        "exited_early",
    ),
    _forgery(
        "forgery: an object equal to everything",
        "class Anything:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    def __ne__(self, other):\n"
        "        return False\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n"
        "    return Anything()\n",
    ),
    _forgery(
        "forgery: an int subclass equal to everything",
        "class Int(int):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n"
        "    return Int(0)\n",
    ),
    _forgery(
        "forgery: a list subclass equal to everything",
        "class Lying(list):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "def sort_list(values):\n"
        "    return Lying()\n",
        test=SORT_TEST,
    ),
    _forgery(
        "forgery: patched builtins at module level",
        "import builtins, operator\n"
        "builtins.AssertionError = type('Ignored', (Exception,), {})\n"
        "builtins.abs = lambda value: 0\n"
        "operator.eq = lambda a, b: True\n"
        "def add(a, b):\n"
        "    return 0.5\n",
        test=FLOAT_TEST,
    ),
    _forgery(
        "forgery: patching the runner's and json's functions",
        "import json, sys\n"
        "runner = sys._getframe(1).f_globals\n"
        "for name in ('from_plain', 'to_plain', '_read_frame', '_encode_frame', 'CandidateFailed'):\n"
        "    if name in runner:\n"
        "        runner[name] = lambda *args, **kwargs: None\n"
        "json.dumps = lambda *args, **kwargs: '[\"ok\",5]'\n"
        "json.loads = lambda *args, **kwargs: ['ok', 5]\n"
        "def add(a, b):\n"
        "    return 0\n",
    ),
    _forgery(
        "forgery: tracing hooks that rewrite results",
        "import sys\n"
        "def tracer(frame, event, arg):\n"
        "    if event == 'return' and frame.f_code.co_name == 'check':\n"
        "        frame.f_locals.clear()\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"
        "sys.setprofile(tracer)\n"
        "def add(a, b):\n"
        "    return a - b\n",
    ),
    _forgery(
        "forgery: writing fake replies and verdicts to every descriptor",
        "import json, os\n" + _FORGED_FRAMES + "targets = [f'/proc/self/fd/{fd}' for fd in range(64)]\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        try:\n"
        "            targets += [f'/proc/{pid}/fd/{fd}' for fd in os.listdir(f'/proc/{pid}/fd')]\n"
        "        except OSError:\n"
        "            pass\n"
        "for path in targets:\n"
        "    try:\n"
        "        out = os.open(path, os.O_WRONLY | os.O_NONBLOCK)\n"
        "    except OSError:\n"
        "        continue\n"
        "    for data in fake:\n"
        "        try:\n"
        "            os.write(out, data)\n"
        "        except OSError:\n"
        "            pass\n"
        "    os.close(out)\n"
        "def add(a, b):\n"
        "    return 0\n",
    ),
    _forgery(
        "forgery: killing every other process it can see",
        "import os, signal\n"
        "def add(a, b):\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit() and int(pid) not in (os.getpid(), os.getppid(), 1):\n"
        "            try:\n"
        "                os.kill(int(pid), signal.SIGKILL)\n"
        "            except OSError:\n"
        "                pass\n"
        "    return 0\n",
    ),
    _forgery(
        "forgery: exiting 0 inside the call", "import os\ndef add(a, b):\n    os._exit(0)\n", "exited_early"
    ),
    _forgery(
        "forgery: a reply too large to read",
        "def add(a, b):\n    return 'x' * (64 << 20)\n",
    ),
    _forgery(
        "forgery: a reply that never ends",
        "import os, sys, time\n"
        "def add(a, b):\n"
        "    for fd in range(3, 16):\n"
        "        try:\n"
        "            os.write(fd, b'\\x00\\x00\\x10\\x00[\"ok\",')\n"
        "        except OSError:\n"
        "            pass\n"
        "    time.sleep(3600)\n",
        "timeout",
    ),
)
"""Programs that try to forge a pass of a test they fail: each must end not passed."""

CASES: tuple[HostileCase, ...] = (
    HostileCase(
        "fork bomb",
        "import os\nwhile True:\n    os.fork()\n",
        frozenset({"failed", "timeout", "oom"}),
    ),
    HostileCase(
        "memory bomb",
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 << 20))\n",
        frozenset({"oom"}),
    ),
    HostileCase(
        # Each process stays under its own RLIMIT_AS; together they exceed the container's memory.
        "memory bomb across processes",
        "import os, resource, time\n"
        "soft = resource.getrlimit(resource.RLIMIT_AS)[0]\n"
        "size = (1 << 30) if soft == resource.RLIM_INFINITY else int(soft * 0.8) - (64 << 20)\n"
        "pids = []\n"
        "for _ in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * size\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids), 'some allocation was stopped'\n",
        frozenset({"failed", "oom"}),
    ),
    HostileCase("infinite loop", "while True:\n    pass\n", frozenset({"timeout"})),
    HostileCase(
        "CPU spin in many threads",
        "import threading\n\ndef spin():\n    while True:\n        pass\n\n"
        "for _ in range(16):\n    threading.Thread(target=spin, daemon=True).start()\nspin()\n",
        # "failed" when a low memory limit leaves no address space for 16 thread stacks.
        frozenset({"timeout", "failed"}),
    ),
    HostileCase(
        "writing a huge file",
        "with open('big', 'wb') as handle:\n"
        "    for _ in range(1024):\n"
        "        handle.write(b'x' * (1 << 20))\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "filling the disk with many files",
        "for i in range(128):\n    with open(f'part{i}', 'wb') as handle:\n"
        "        handle.write(b'x' * (8 << 20))\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "printing gigabytes",
        "line = 'x' * (1 << 20)\nfor _ in range(2048):\n    print(line)\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "opening a network connection",
        "import socket\n"
        "with socket.create_connection(('127.0.0.1', @PORT@), timeout=3) as connection:\n"
        "    connection.sendall(b'escaped')\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "reading another sample's files",
        "import ctypes, os\n"
        "name = 'evalpipe-selfcheck-@SECRET@'\n"
        "places = [os.getcwd(), '/tmp', '/var/tmp', '/dev/shm', os.path.dirname(os.getcwd())]\n"
        "found = [p for p in places if os.path.exists(os.path.join(p, name))]\n"
        "for root, _, files in os.walk(os.path.dirname(os.getcwd())):\n"
        "    found += [root] if name in files else []\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.shmget(ctypes.c_int(0x@SECRET_KEY@), ctypes.c_size_t(0), 0) >= 0:\n"
        "    found.append('SysV shared memory')\n"
        "assert found, 'no trace of the previous sample'\n"
        "print(found)\n",
        frozenset({"failed"}),
        # The previous sample leaves its secret everywhere it can: work dir, shared dirs, an unreadable sticky
        # subdir the runner must still wipe, and a SysV shared memory segment (outlives processes).
        setup="import ctypes, os\n"
        "name = 'evalpipe-selfcheck-@SECRET@'\n"
        "for place in [os.getcwd(), '/tmp', '/var/tmp', '/dev/shm', os.path.dirname(os.getcwd())]:\n"
        "    try:\n"
        "        with open(os.path.join(place, name), 'w') as handle:\n"
        "            handle.write('@SECRET@')\n"
        "    except OSError:\n"
        "        pass\n"
        "os.mkdir('keep')\n"
        "with open(os.path.join('keep', name), 'w') as handle:\n"
        "    handle.write('@SECRET@')\n"
        "os.chmod('keep', 0o1000)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmget(ctypes.c_int(0x@SECRET_KEY@), ctypes.c_size_t(4096), 0o1666)\n",
    ),
    HostileCase(
        "writing outside the work dir",
        "import json, os\n"
        "name = 'evalpipe-selfcheck-@SECRET@'\n"
        "written = []\n"
        "for path in ['/opt/evalpipe/runner.py', json.__file__, os.__file__]:\n"
        "    try:\n"
        "        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "for place in ['/tmp', '/var/tmp', '/dev/shm', os.path.dirname(os.getcwd()), '/']:\n"
        "    try:\n"
        "        os.close(os.open(os.path.join(place, name), os.O_WRONLY | os.O_CREAT, 0o644))\n"
        "        written.append(place)\n"
        "    except OSError:\n"
        "        pass\n"
        "assert written, 'nothing outside the work dir is writable'\n"
        "print(written)\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "sys.exit(0) before the check",
        _SOLUTION + "import sys\nsys.exit(0)\n",
        frozenset({"exited_early"}),
        test=ADD_TEST,
        entry_point="add",
    ),
    HostileCase(
        "os._exit(0) before the check",
        _SOLUTION + "import os\nos._exit(0)\n",
        frozenset({"exited_early"}),
        test=ADD_TEST,
        entry_point="add",
    ),
    HostileCase(
        "forging a passed result",
        "import json, os\n"
        "line = (json.dumps({'id': '@JOB_ID@', 'status': 'passed', 'passed': True}) + '\\n').encode()\n"
        "for pid in {os.getppid(), 1}:\n"
        "    try:\n"
        "        fds = os.listdir(f'/proc/{pid}/fd')\n"
        "    except OSError:\n"
        "        continue\n"
        "    for fd in fds:\n"
        "        try:\n"
        "            out = os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY)\n"
        "            os.write(out, line)\n"
        "            os.close(out)\n"
        "        except OSError:\n"
        "            pass\n"
        "raise AssertionError('could not forge a result')\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "killing the runner",
        "import os, signal, time\n"
        "for pid in {os.getppid(), 1}:\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "time.sleep(0.2)\n"
        "raise AssertionError('the runner survived')\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        # If the daemon outlived the program it would kill the next program (another child of the runner).
        "spawning a daemon that outlives the program",
        "import os, signal, time\n"
        "runner, program = os.getppid(), os.getpid()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        me = os.getpid()\n"
        "        end = time.time() + 20\n"
        "        while time.time() < end:\n"
        "            for entry in os.listdir('/proc'):\n"
        "                try:\n"
        "                    with open(f'/proc/{entry}/stat') as handle:\n"
        "                        ppid = int(handle.read().rsplit(')', 1)[1].split()[1])\n"
        "                    if ppid == runner and int(entry) not in (me, program):\n"
        "                        os.kill(int(entry), signal.SIGKILL)\n"
        "                except (OSError, ValueError, IndexError):\n"
        "                    pass\n"
        "            time.sleep(0.005)\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "raise AssertionError('daemon started')\n",
        frozenset({"failed"}),
    ),
    HostileCase(
        "raising the recursion limit and recursing",
        "import sys\nsys.setrecursionlimit(10 ** 8)\n\ndef down(n):\n    return down(n + 1)\n\ndown(0)\n",
        # Python 3.11 keeps pure-Python frames off the C stack: this ends in the CPU or memory limit, or a
        # crash, depending on the limits.
        frozenset({"failed", "timeout", "oom"}),
    ),
    HostileCase(
        "closing stdin, stdout and stderr",
        "import os\nfor fd in (0, 1, 2):\n    os.close(fd)\nprint('x' * 100000)\n"
        "raise AssertionError('closed')\n",
        frozenset({"failed"}),
    ),
    *FORGERIES,
)
"""The hostile-program suite, in the order it runs."""


class CheckResult(Record):
    """One row of the self-check."""

    name: str
    expected: tuple[str, ...]
    """Statuses that mean the sandbox stopped the attack."""
    status: str
    """What the sandbox reported for the hostile program."""
    contained: bool
    """Status as expected, not passed, the next canonical program passed on a runner that was not replaced,
    and (network check) nothing reached the listener on the host."""
    next_status: str
    """Status of the canonical program run right after it."""
    duration_s: float | None = None
    detail: str = ""


class _Listener:
    """A TCP listener on the host's 127.0.0.1 that counts connections: the network check's target."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(8)
        self._socket.settimeout(0.2)
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="selfcheck-listener")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@contextlib.contextmanager
def _listening() -> Iterator[_Listener]:
    listener = _Listener()
    try:
        yield listener
    finally:
        listener.close()


def _run(
    sandbox: Sandbox, name: str, index: int, program: str, test: str = "", entry_point: str = ""
) -> tuple[Job, JobResult]:
    key = SampleKey(model="selfcheck", backend="none", task_id=name, index=index)
    job = Job(key=key, program=program, test=test, entry_point=entry_point)
    results = list(sandbox.run([job]))
    if len(results) != 1:
        raise RuntimeError(f"the sandbox returned {len(results)} results for one job")
    return results[0]


_CANONICAL_JOB = (CANONICAL, CANONICAL_TEST, "has_close_elements")


def _fill(template: str, fields: dict[str, str]) -> str:
    for token, value in fields.items():
        template = template.replace(token, value)
    return template


def _runners_started(sandbox: Sandbox) -> int | None:
    value = getattr(sandbox, "runners_started", None)
    return value if isinstance(value, int) else None


def check_sandbox(sandbox: Sandbox, *, only: tuple[str, ...] | None = None) -> list[CheckResult]:
    """Run the hostile-program suite (`CASES`, or those named in `only`) and report one row per attack.

    The first row is the canonical program alone (it must pass, or nothing else means anything). Network
    traffic goes only to a listener this function opens on 127.0.0.1.
    """
    secret = secrets.token_hex(8)
    rows: list[CheckResult] = []
    index = 0
    with _listening() as listener:
        _, baseline = _run(sandbox, "selfcheck/canonical", index, *_CANONICAL_JOB)
        rows.append(
            CheckResult(
                name="canonical program",
                expected=("passed",),
                status=baseline.status,
                contained=baseline.passed,
                next_status=baseline.status,
                duration_s=baseline.duration_s,
                detail=baseline.note or (baseline.stderr_tail.strip().splitlines() or [""])[-1],
            )
        )
        for case in CASES:
            if only is not None and case.name not in only:
                continue
            index += 1
            task = "selfcheck/" + case.name.replace(" ", "-")
            before = _runners_started(sandbox)
            fields = {
                "@PORT@": str(listener.port),
                "@SECRET_KEY@": secret[:7],
                "@SECRET@": secret,
                "@JOB_ID@": f"{task}#{index}",  # as RunnerPool names jobs
            }
            if case.setup is not None:
                _run(sandbox, task + "/setup", index, _fill(case.setup, fields))
            connections = listener.connections
            program = _fill(case.program, fields)
            _, result = _run(sandbox, task, index, program, case.test, case.entry_point)
            _, after = _run(sandbox, "selfcheck/canonical", index, *_CANONICAL_JOB)
            replaced = before is not None and _runners_started(sandbox) != before
            reasons = []
            if result.status not in case.expected:
                reasons.append(f"status {result.status}")
            if result.passed:
                reasons.append("the attack worked (the program passed)")
            if listener.connections != connections:
                reasons.append("a connection reached the host")
            if replaced:
                reasons.append("the runner was replaced")
            if not after.passed:
                reasons.append(f"the next program ended {after.status}")
            rows.append(
                CheckResult(
                    name=case.name,
                    expected=tuple(sorted(case.expected)),
                    status=result.status,
                    contained=not reasons,
                    next_status=after.status,
                    duration_s=result.duration_s,
                    detail="; ".join(reasons) or result.note,
                )
            )
    _remove_leftovers(secret)
    return rows


def _remove_leftovers(secret: str) -> None:
    """Delete what the checks managed to write on this host (only possible with the `process` sandbox)."""
    for place in _LEFTOVER_DIRS:
        with contextlib.suppress(OSError):
            Path(place, SCRATCH_PREFIX + secret).unlink()


def format_rows(rows: list[CheckResult]) -> str:
    """A plain-text table of the rows, for logs and the CLI."""
    header = ("check", "expected", "got", "next", "contained", "detail")
    table = [header] + [
        (r.name, "|".join(r.expected), r.status, r.next_status, "yes" if r.contained else "NO", r.detail)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in table
    )


__all__ = [
    "CANONICAL",
    "CANONICAL_TEST",
    "CASES",
    "FORGERIES",
    "CheckResult",
    "HostileCase",
    "check_sandbox",
    "format_rows",
]
