"""The hostile-program suite through the docker sandbox: every attack contained, the next program unharmed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import docker
import pytest

from evalpipe.records import SampleKey, SandboxLimits
from evalpipe.sandbox.base import Job, JobResult
from evalpipe.sandbox.docker import DockerSandbox
from evalpipe.sandbox.selfcheck import CANONICAL, CASES, CheckResult, check_sandbox, format_rows

# Small limits keep the suite fast; 512 MiB leaves address space for 16 thread stacks.
LIMITS = SandboxLimits(cpu_time_s=1, wall_time_s=5, memory_mb=512, file_size_mb=8)


@pytest.fixture(scope="module")
def sandbox(image: str) -> Iterator[DockerSandbox]:
    box = DockerSandbox(LIMITS, workers=1)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def rows(sandbox: DockerSandbox) -> dict[str, CheckResult]:
    found = check_sandbox(sandbox)
    print("\n" + format_rows(found))
    return {row.name: row for row in found}


def _run(sandbox: DockerSandbox, program: str, index: int = 0) -> JobResult:
    job = Job(key=SampleKey(model="m", backend="none", task_id="t", index=index), program=program)
    [(_, result)] = list(sandbox.run([job]))
    return result


def test_canonical_program_passes(rows: dict[str, CheckResult]) -> None:
    assert rows["canonical program"].status == "passed", rows["canonical program"]


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_attack_is_contained(rows: dict[str, CheckResult], name: str) -> None:
    row = rows[name]
    assert row.status in row.expected, row
    assert row.status != "passed", row
    assert row.next_status == "passed", row
    assert row.contained, row


def test_no_container_was_replaced(rows: dict[str, CheckResult], sandbox: DockerSandbox) -> None:
    # Killing the runner, forged results, OOM and fork bombs all ended inside the one container.
    assert sandbox.runners_started == 1


def test_timeouts_are_decided_by_cpu_time_and_rerun_alone(sandbox: DockerSandbox) -> None:
    result = _run(sandbox, "while True:\n    pass\n")
    assert result.status == "timeout" and result.note.startswith("CPU time limit"), result
    assert result.attempts == 2
    sleeper = _run(sandbox, "import time\ntime.sleep(0.5 * 3)\n")  # 1.5 s of wall time, no CPU: no timeout
    assert sleeper.status == "passed", sleeper


def test_network_is_unreachable(sandbox: DockerSandbox) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = listener.accept()
            except OSError:
                continue
            accepted.append(peer)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        # Control: the listener works, so a program that could reach the host would be counted.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        program = (
            "import socket\n"
            f"with socket.create_connection(('127.0.0.1', {port}), timeout=3) as connection:\n"
            "    connection.sendall(b'escaped')\n"
        )
        result = _run(sandbox, program)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert result.status == "failed", result
    assert "ConnectionRefusedError" in result.stderr_tail, result.stderr_tail  # failed for the right reason
    assert len(accepted) == 1  # only the control


def test_a_program_leaves_nothing_behind(sandbox: DockerSandbox, client: docker.DockerClient) -> None:
    """Files in unreadable sticky dirs, SysV shared memory: gone before the next program starts."""
    leaver = (
        "import ctypes, os\n"
        "os.mkdir('keep')\n"
        "open('keep/secret', 'w').write('x')\n"
        "os.chmod('keep', 0o1000)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.shmget(ctypes.c_int(0x5eed), ctypes.c_size_t(1 << 20), 0o1666) >= 0\n"
    )
    assert _run(sandbox, leaver).status == "passed"
    [container_id] = sandbox.container_ids()
    container = client.containers.get(container_id)
    code, output = container.exec_run(["sh", "-c", "find /work -mindepth 1; tail -n +2 /proc/sysvipc/shm"])
    assert code == 0 and output.decode().strip() == "", output


def test_program_environment(sandbox: DockerSandbox) -> None:
    probe = (
        "import os\n"
        "assert os.getuid() != 0 and os.geteuid() != 0\n"
        "status = open('/proc/self/status').read()\n"
        "assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status, status\n"
        "assert not os.path.exists('/dev/shm')\n"
        "for path in ('/tmp/x', '/x', '/work/x', '/opt/evalpipe/x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(path + ' is writable')\n"
        "assert int(open('/proc/self/oom_score_adj').read()) == 1000\n"
    )
    result = _run(sandbox, probe)
    assert result.status == "passed", result.stderr_tail
    assert _run(sandbox, CANONICAL).status == "passed"
