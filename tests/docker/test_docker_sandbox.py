"""The docker sandbox as a pool: replacement of dead containers, describe(), clean-up, HumanEval programs."""

from __future__ import annotations

import threading
import time

import docker
import pytest

from evalpipe.program import judged_job
from evalpipe.records import SampleKey, SandboxLimits, Task
from evalpipe.sandbox.base import Job
from evalpipe.sandbox.docker import LABEL, DockerSandbox, _Demultiplexer
from evalpipe.sandbox.pool import RunnerGone

LIMITS = SandboxLimits(cpu_time_s=2, wall_time_s=10, memory_mb=512)


def _job(index: int, program: str, task: str = "t") -> Job:
    return Job(key=SampleKey(model="m", backend="none", task_id=task, index=index), program=program)


def _labelled(client: docker.DockerClient, box: DockerSandbox) -> list[str]:
    found = client.containers.list(all=True, filters={"label": f"{LABEL}={box.instance}"})
    return [container.id for container in found]


def test_describe_reports_image_and_every_limit(image: str) -> None:
    box = DockerSandbox(LIMITS, workers=2)
    try:
        described = box.describe()
    finally:
        box.close()
    assert described["kind"] == "docker"
    assert described["image_id"] == image
    assert described["limits"] == LIMITS.model_dump()
    container = described["container"]
    assert container["network_mode"] == "none"
    assert container["ipc_mode"] == "none"
    assert container["read_only"] is True
    assert container["cap_drop"] == ["ALL"]
    assert set(container["cap_add"]) <= {"SETUID", "SETGID", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL"}
    assert container["security_opt"] == ["no-new-privileges"]
    assert container["log_driver"] == "none"
    assert container["cpus"] == 1.0
    assert container["pids_limit"] > LIMITS.max_processes
    assert container["mem_limit"] == container["memswap_limit"]  # no swap
    assert int(container["mem_limit"].rstrip("m")) > LIMITS.memory_mb
    assert {"/work", "/tmp"} <= set(container["tmpfs"])


def test_container_killed_mid_job_is_replaced_and_nothing_is_lost(
    client: docker.DockerClient, image: str
) -> None:
    box = DockerSandbox(LIMITS, workers=2)
    jobs = [_job(i, f"import time\ntime.sleep(0.4)\nassert {i} == {i}\n") for i in range(10)]
    killed: list[str] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(box.container_ids()) < 2:
            time.sleep(0.05)
        time.sleep(0.2)  # mid-job: every job sleeps 0.4 s
        victim = box.container_ids()[0]
        client.api.kill(victim)
        killed.append(victim)

    killer = threading.Thread(target=kill_one)
    try:
        killer.start()
        results = list(box.run(jobs))
        killer.join()
        assert killed
        keys = [job.key.index for job, _ in results]
        assert sorted(keys) == list(range(10))  # each job exactly once
        assert all(result.status == "passed" for _, result in results), results
        assert sum(result.attempts for _, result in results) == 11  # the killed job ran twice
        assert box.runners_started == 3
        assert killed[0] not in box.container_ids()
    finally:
        box.close()
    assert _labelled(client, box) == []  # close() removed every container, the killed one included


def test_a_dead_container_is_removed_when_replaced(client: docker.DockerClient, image: str) -> None:
    box = DockerSandbox(LIMITS, workers=1)
    try:
        assert [r.status for _, r in box.run([_job(0, "pass\n")])] == ["passed"]
        [first] = box.container_ids()
        client.api.kill(first)
        assert [r.status for _, r in box.run([_job(1, "pass\n")])] == ["passed"]
        assert box.runners_started == 2
        assert _labelled(client, box) == box.container_ids()  # the dead one is gone
    finally:
        box.close()


def test_humaneval_canonical_solutions_all_pass(humaneval_tasks: list[Task], image: str) -> None:
    """All 164 reference solutions pass in the container, judged from the judge process: its Python has every
    module they import, and every test's calls cross the boundary."""
    jobs = [
        judged_job(SampleKey(model="m", backend="none", task_id=t.id, index=0), t, t.canonical_solution or "")
        for t in humaneval_tasks
    ]
    box = DockerSandbox(SandboxLimits(), workers=2)
    try:
        results = list(box.run(jobs))
    finally:
        box.close()
    failed = {job.key.task_id: (r.status, r.stderr_tail[-300:]) for job, r in results if not r.passed}
    assert len(results) == len(jobs)
    assert failed == {}


@pytest.mark.parametrize("split", [1, 3, 8, 9, 20])
def test_demultiplexer_reassembles_split_frames(split: int) -> None:
    def frame(stream: int, payload: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload

    wire = frame(1, b'{"a": 1}\n') + frame(2, b"warning\n") + frame(1, b'{"b"') + frame(1, b": 2}\n")
    demux = _Demultiplexer()
    stdout = b"".join(demux.feed(wire[i : i + split]) for i in range(0, len(wire), split))
    assert stdout == b'{"a": 1}\n{"b": 2}\n'
    assert demux.stderr_tail == b"warning\n"


def test_demultiplexer_rejects_a_tty_stream() -> None:
    with pytest.raises(RunnerGone):
        _Demultiplexer().feed(b'{"ready": true}\n')
