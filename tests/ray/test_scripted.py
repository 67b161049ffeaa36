"""The scripted engine on its own (no Ray): measured timings, canonical text, scripted deaths.

Not marked `ray`: it starts no Ray instance and runs in well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evalpipe.engines.scripted import DIE_EXIT_CODE, ScriptedEngine, count_tokens
from evalpipe.errors import UserError
from evalpipe.records import RunConfig, Task
from evalpipe.suites import load_suite


def _engine(backend: str = "guidance", n_samples: int = 1) -> ScriptedEngine:
    config = RunConfig(
        suite="humaneval", engine="scripted", models=("m",), backends=(backend,), n_samples=n_samples
    )
    return ScriptedEngine(config, load_suite("humaneval"), "m", backend)


def test_replays_canonical_solutions_with_measured_timings(
    humaneval_tasks: list[Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0.04")
    monkeypatch.setenv("EVALPIPE_SCRIPTED_TTFT_S", "0.01")
    engine = _engine(n_samples=2)
    requests = engine.plan(humaneval_tasks[:2])
    assert [(r.key.task_id, r.key.index, r.key.backend) for r in requests] == [
        (humaneval_tasks[0].id, 0, "guidance"), (humaneval_tasks[0].id, 1, "guidance"),
        (humaneval_tasks[1].id, 0, "guidance"), (humaneval_tasks[1].id, 1, "guidance"),
    ]  # fmt: skip
    generations = list(engine.generate(requests))
    assert [g.key for g in generations] == [r.key for r in requests]
    for request, generation in zip(requests, generations, strict=True):
        assert generation.text == request.task.canonical_solution
        assert generation.effective_backend == "none"  # it constrains nothing, and says so
        assert generation.n_output_tokens == count_tokens(generation.text) > 1
        assert (
            generation.ttft_s is not None and generation.tpot_s is not None and generation.e2e_s is not None
        )
        assert 0.01 <= generation.ttft_s <= generation.e2e_s
        assert generation.ttft_s + generation.tpot_s * (generation.n_output_tokens - 1) == pytest.approx(
            generation.e2e_s
        )
    # On a fixed schedule: a late wake-up shortens the next request, the total stays 4 x delay.
    total = sum(g.e2e_s or 0 for g in generations)
    assert 4 * 0.04 - 0.002 <= total < 4 * 0.04 + 0.1
    assert "none" in engine.describe()["effective_backend"]


def test_bad_settings_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "soon")
    with pytest.raises(UserError, match="EVALPIPE_SCRIPTED_DELAY_S"):
        _engine()
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DELAY_S", "0")
    monkeypatch.setenv("EVALPIPE_SCRIPTED_DIE_AFTER", "-1")
    with pytest.raises(UserError, match="EVALPIPE_SCRIPTED_DIE_AFTER"):
        _engine()


SCRIPT = textwrap.dedent(
    """
    import sys
    from evalpipe.engines.scripted import ScriptedEngine
    from evalpipe.records import RunConfig
    from evalpipe.sources import load_humaneval
    from evalpipe.suites import load_suite
    config = RunConfig(suite="humaneval", engine="scripted", models=("m",), backends=("none",))
    engine = ScriptedEngine(config, load_suite("humaneval"), "m", "none")
    tasks, _ = load_humaneval()
    for generation in engine.generate(engine.plan(tasks[:4])):
        print(generation.key.task_id, flush=True)
    """
)


def test_die_after_kills_the_process_once_per_marker(tmp_path: Path) -> None:
    marker = tmp_path / "died"
    env = {**os.environ, "EVALPIPE_SCRIPTED_DIE_AFTER": "2", "EVALPIPE_SCRIPTED_DIE_MARKER": str(marker)}
    first = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == DIE_EXIT_CODE, first.stderr
    assert len(first.stdout.split()) == 2 and marker.exists()
    again = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr  # the marker is taken: a restarted replica runs on
    assert len(again.stdout.split()) == 4
