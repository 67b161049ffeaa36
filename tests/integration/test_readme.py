"""The README is executable: every `evalpipe ...` command in its table runs (small `--limit`, the built-in
model, a loopback server) and exits 0; what needs vLLM where it is not installed exits 2 with one line
saying so. A README row without a way to run it here fails the test: a bug in the code or in the README."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evalpipe.engines.builtin import build_random_model
from evalpipe.sources import load_humaneval

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SMALL = ["--limit", "2", "--max-tokens", "16", "--sandbox", "process", "--workers", "1"]
VLLM_ARGS = ["--engine-arg", "dtype=bfloat16", "--engine-arg", "max_model_len=1024"]

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The commands in the first column of the README's table ("What works today")."""
    commands: list[str] = []
    for line in README.read_text().splitlines():
        if not line.startswith("| `evalpipe"):
            continue
        first_cell = line.split(" | ")[0]
        commands += re.findall(r"`(evalpipe [^`]+)`", first_cell)
    return commands


def _docker() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30).returncode == 0


@pytest.fixture
def serve_url(tmp_path: Path) -> Iterator[str]:
    """`evalpipe serve builtin -b guidance` on a free loopback port, as the README runs it."""
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "evalpipe.cli", "serve", "builtin", "-b", "guidance", "--port", "0"],
            stdout=subprocess.PIPE, stderr=sink, text=True, cwd=ROOT,
        )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # blocks until the model is loaded and the port is bound
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert found, f"evalpipe serve printed {line!r}; log: {log.read_text()[-2000:]}"
        yield found.group(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_readme_command_runs(cli: Any, tmp_path: Path, serve_url: str) -> None:
    runs = tmp_path / "runs"
    base = [*SMALL, "--runs-dir", str(runs)]
    vllm = importlib.util.find_spec("vllm") is not None
    docker = _docker()
    outcomes: list[tuple[str, str, int, str]] = []
    made: dict[str, Path] = {}

    def newest() -> Path:
        return max(
            (p for p in runs.iterdir() if (p / "manifest.json").exists()), key=lambda p: p.stat().st_mtime
        )

    def run(readme: str, *argv: str | Path, remember: str | None = None) -> tuple[int, str]:
        before = time.perf_counter()
        code, _, err = cli(*argv)
        outcomes.append((readme, " ".join(map(str, argv)), code, f"{time.perf_counter() - before:.0f} s"))
        if remember and code == 0:
            made[remember] = newest()
        return code, err

    def ok(readme: str, *argv: str | Path, remember: str | None = None) -> None:
        code, err = run(readme, *argv, remember=remember)
        assert code == 0, f"{readme}: exit {code}: {err[-2000:]}"

    def one_line_exit_2(readme: str, *argv: str | Path, says: str) -> None:
        code, err = run(readme, *argv)
        assert code == 2 and err.strip().count("\n") == 0 and says in err, f"{readme}: exit {code}: {err}"

    samples = tmp_path / "my_samples.jsonl"
    tasks, _ = load_humaneval()
    samples.write_text(
        "".join(json.dumps({"task_id": t.id, "completion": t.canonical_solution}) + "\n" for t in tasks[:2])
    )
    other_model = build_random_model(tmp_path / "model_b")

    def main_job(readme: str) -> None:
        ok(
            readme,
            "run",
            "humaneval",
            "-b",
            "guidance",
            "-b",
            "xgrammar",
            "-b",
            "none",
            *base,
            remember="main",
        )

    def vllm_job(readme: str) -> None:
        argv = ["run", "humaneval", "--engine", "vllm", "-m", "builtin", "-b", "guidance", "-b", "xgrammar"]
        argv += ["-b", "none", *base, *VLLM_ARGS]
        if vllm:
            ok(readme, *argv)
        else:
            one_line_exit_2(readme, *argv, says="engine 'vllm' needs vLLM")

    def openai_job(readme: str) -> None:
        ok(readme, "run", "humaneval", "--engine", "openai", "--base-url", f"{serve_url}/v1", "-m", "builtin",
           "-b", "guidance", *base, remember="openai")  # fmt: skip

    def json_job(readme: str) -> None:
        ok(readme, "run", "humaneval_json", "-b", "guidance", *base)

    def chat_job(readme: str) -> None:
        ok(readme, "run", "humaneval_chat", "-b", "guidance", "-b", "xgrammar", "-b", "none", *base)

    def matrix(readme: str) -> None:
        models = ["-m", "builtin", "-m", str(other_model)]
        ok(readme, "run", "humaneval", *models, "-b", "none", "--replicas", "2", *base)

    def resume(readme: str) -> None:
        main = made["main"]
        if readme.startswith("evalpipe run"):
            ok(
                readme,
                "run",
                "humaneval",
                "-b",
                "guidance",
                "-b",
                "xgrammar",
                "-b",
                "none",
                *base,
                "--resume",
                main,
            )
        else:
            ok(readme, "resume", main)

    def sandbox(readme: str) -> None:
        if not docker:
            outcomes.append((readme, "-", -1, "not run: no Docker daemon (tests/docker covers it)"))
            return
        ok(readme, *(["sandbox", "build", "--if-stale"] if "build" in readme else ["sandbox", "check"]))

    handlers: dict[str, Callable[[str], None]] = {
        "evalpipe run humaneval -b guidance -b xgrammar -b none": main_job,
        "evalpipe run humaneval --engine vllm -m builtin -b guidance -b xgrammar -b none": vllm_job,
        "evalpipe run humaneval --engine openai --base-url URL -m SERVED_NAME -b guidance": openai_job,
        "evalpipe run humaneval_json -b guidance": json_job,
        "evalpipe run humaneval_chat -b guidance -b xgrammar -b none": chat_job,
        "evalpipe run ... -m A -m B --replicas 2 [--ray-address auto]": matrix,
        "evalpipe run humaneval --engine reference": lambda r: ok(
            r, "run", "humaneval", "--engine", "reference", *base, remember="reference"
        ),
        "evalpipe run humaneval --samples my_samples.jsonl": lambda r: ok(
            r, "run", "humaneval", "--samples", samples, *base
        ),
        "evalpipe compare RUN RUN... [-f table\\|json\\|csv\\|markdown]": lambda r: [
            ok(r, "compare", made["main"], made["openai"], "-f", fmt)
            for fmt in ("table", "json", "csv", "markdown")
        ],
        "evalpipe report RUN [RUN...]": lambda r: ok(r, "report", made["main"], made["reference"]),
        "evalpipe serve [MODEL] -b guidance": lambda r: outcomes.append(
            (r, f"evalpipe serve builtin -b guidance --port 0 -> {serve_url}", 0, "serves the openai row")
        ),
        "evalpipe run ... --resume RUN_DIR": resume,
        "evalpipe resume RUN_DIR": resume,
        "evalpipe score RUN_DIR": lambda r: ok(r, "score", made["main"]),
        "evalpipe show RUN_DIR": lambda r: ok(r, "show", made["main"]),
        "evalpipe ls runs": lambda r: ok(r, "ls", "runs", "--runs-dir", runs),
        "evalpipe sandbox build": sandbox,
        "evalpipe sandbox check": sandbox,
        "evalpipe ls suites\\|engines\\|backends\\|sandboxes": lambda r: [
            ok(r, "ls", what) for what in ("suites", "engines", "backends", "sandboxes")
        ],
    }
    commands = readme_commands()
    assert sorted(commands) == sorted(handlers), "README rows and this test's handlers differ"
    for command in commands:
        handlers[command](command)
    print("\nREADME commands and outcomes:")
    for readme, argv, code, note in outcomes:
        print(f"  {readme}\n      evalpipe {argv}\n      -> exit {code} ({note})")
