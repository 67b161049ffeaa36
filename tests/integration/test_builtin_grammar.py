"""The main job's own setup, small: the built-in model under the real `python_body` grammar (not a toy one).

This is the test that would have caught a constrained arm that cannot stop: every arm must be able to end
before max tokens, and a constrained sample that ended on its own must be valid code that satisfies the
grammar, checked apart from the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from evalpipe.rundir import list_runs

pytest.importorskip("llguidance")
pytest.importorskip("xgrammar")
pytest.importorskip("torch")

TASKS = 8
ARMS = ("guidance", "xgrammar", "none")


@pytest.mark.slow
def test_constrained_arms_of_the_builtin_model_end_and_are_valid(
    cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    args = ["run", "humaneval", "--limit", str(TASKS), "--max-tokens", "384", "--executor", "inline"]
    args += ["--sandbox", "process", "--runs-dir", str(tmp_path)]
    for arm in ARMS:
        args += ["-b", arm]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "max tokens" in out and "ended: syntax ok" in out
    (run,) = list_runs(tmp_path)
    generations = {g.key.as_tuple(): g for g in run.generations()}
    executions = {e.key.as_tuple(): e for e in run.executions()}
    assert len(generations) == len(executions) == TASKS * len(ARMS)
    for arm in ARMS:
        own = [g for g in generations.values() if g.key.backend == arm]
        ended = [g for g in own if g.finish_reason == "stop"]
        assert len(ended) >= TASKS // 2, (arm, [g.finish_reason for g in own])
        if arm == "none":
            continue
        for generation in ended:
            execution = executions[generation.key.as_tuple()]
            assert generation.constraint_satisfied is True, generation.raw_text
            assert execution.syntax_valid, generation.text
            assert generation.effective_backend == arm
