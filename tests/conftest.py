"""Shared fixtures: HumanEval tasks and a CLI runner that returns (exit code, stdout, stderr)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from evalpipe.cli import main
from evalpipe.records import Task
from evalpipe.sources import load_humaneval

PLUGINS = Path(__file__).resolve().parent / "plugins"
"""The test-only plugin distribution (tests/plugins/README.md): on sys.path here, on PYTHONPATH for Ray
workers and subprocesses, so `--engine scripted` resolves through the entry-point group as a plugin would."""
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if part
    )

CliResult = tuple[int, str, str]


@pytest.fixture(scope="session")
def humaneval_tasks() -> list[Task]:
    tasks, _ = load_humaneval()
    return tasks


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `evalpipe ARGS...` in this process, as the console script does."""

    def invoke(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with the reason shown, where no CUDA device is visible."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine (marker gpu)")
        for item in gpu_items:
            item.add_marker(skip)
