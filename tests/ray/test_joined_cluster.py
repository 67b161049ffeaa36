"""Joining a real Ray cluster (`ray start --head`, Ray 2.60 with token authentication, one logical GPU): what
a user sees when the token is missing, and when the run needs more GPUs than the cluster has.

The CLI runs in subprocesses, so that this test process's own Ray (the other Ray tests') plays no part."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from evalpipe.cluster import _check_gpus, _share_gpus
from evalpipe.errors import UserError

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on loopback with 2 CPUs and 1 (logical) GPU, in its own temp dir; stopped afterwards."""
    pytest.importorskip("ray")
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--num-cpus", "2", "--num-gpus", "1", "--include-dashboard", "false",
        "--temp-dir", str(temp), "--disable-usage-stats",
    ]  # fmt: skip
    started = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
    if started.returncode != 0:
        pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop_processes_under(temp)


def _stop_processes_under(folder: Path) -> None:
    """Stop the processes whose command line names `folder` (this head's, and only its: `ray stop` would stop
    every Ray on the machine, other users' too): SIGTERM, then SIGKILL what is left."""

    def alive() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(
                    errors="replace"
                ):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while alive() and time.monotonic() < deadline:
            time.sleep(0.5)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evalpipe.cli", *args],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=600, check=False,
    )  # fmt: skip


def test_joining_without_the_token_says_what_to_set(head: str, tmp_path: Path) -> None:
    env = {"RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": "", "RAY_ADDRESS": ""}
    done = _cli(
        "run", "humaneval", "--engine", "reference", "--limit", "1", "--sandbox", "process",
        "--executor", "ray", "--ray-address", head, "--runs-dir", str(tmp_path / "runs"), env=env,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and f"cannot join the Ray cluster at {head}" in errors[0]
    assert "RAY_AUTH_MODE=token" in errors[0] and "RAY_AUTH_TOKEN" in errors[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_replicas_that_cannot_get_a_gpu_are_named_at_the_deadline(head: str, tmp_path: Path) -> None:
    """Three replicas asking a whole GPU each, on a cluster with one: said at once, then the run fails at the
    readiness deadline naming the two that never started."""
    env = {"RAY_AUTH_MODE": "token", "EVALPIPE_READY_TIMEOUT_S": "45"}
    done = _cli(
        "run", "humaneval", "-b", "guidance", "-b", "xgrammar", "-b", "none", "--limit", "1",
        "--engine-arg", "num_gpus=1", "--engine-arg", "device=cpu", "--sandbox", "process",
        "--ray-address", head, "--runs-dir", str(tmp_path / "runs"), env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "needs 3 GPU(s) in all" in done.stderr and "the cluster has 1" in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "not ready after 45 s" in error and error.count("gen/") == 2


def _plan(replicas: int) -> Any:
    return SimpleNamespace(cluster=SimpleNamespace(replicas=replicas), config=SimpleNamespace(engine="hf"))


def test_gpus_are_counted_over_every_replica_before_any_starts(capsys: pytest.CaptureFixture[str]) -> None:
    needs = {("m", "guidance"): 1.0, ("m", "none"): 1.0}
    names = {("m", "guidance"): "gen/guidance/m", ("m", "none"): "gen/none/m"}
    _check_gpus(_plan(1), needs, names, 2.0, local=True)  # 2 of 2: fits
    with pytest.raises(UserError, match=r"needs 4 GPU\(s\) in all .* the cluster has 2; .*num_gpus=FRACTION"):
        _check_gpus(_plan(2), needs, names, 2.0, local=True)
    halves = dict.fromkeys(needs, 0.5)
    _check_gpus(_plan(2), halves, names, 2.0, local=True)  # replicas share devices
    _check_gpus(_plan(2), needs, names, 2.0, local=False)  # a joined cluster may grow: said, not refused
    assert "waiting for the autoscaler" in capsys.readouterr().err


def test_hf_replicas_share_the_gpus_unless_num_gpus_is_given(capsys: pytest.CaptureFixture[str]) -> None:
    needs = {("m", "guidance"): 1.0, ("m", "xgrammar"): 1.0, ("m", "none"): 1.0}
    plan = SimpleNamespace(
        cluster=SimpleNamespace(replicas=1), config=SimpleNamespace(engine="hf", engine_args={})
    )
    shared = _share_gpus(plan, needs, 1.0)
    assert (
        set(shared.values()) == {0.33} and "3 generation replicas share 1 GPU(s)" in capsys.readouterr().err
    )
    asked = SimpleNamespace(
        cluster=plan.cluster, config=SimpleNamespace(engine="hf", engine_args={"num_gpus": "1"})
    )
    assert _share_gpus(asked, needs, 1.0) == needs
    vllm = SimpleNamespace(cluster=plan.cluster, config=SimpleNamespace(engine="vllm", engine_args={}))
    assert _share_gpus(vllm, needs, 1.0) == needs  # vLLM's GPU share is its own setting
