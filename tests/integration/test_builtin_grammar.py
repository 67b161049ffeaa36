"""The main job's own setup, small: the built-in model under the real `python_body` grammar (not a toy one).

This is the test that would have caught a constrained arm that cannot stop: a constrained sample that ended
on its own must be valid code that satisfies the grammar, checked apart from the backend, and every arm must
be able to end before max tokens.
"""

from __future__ import annotations

import pytest

from evalpipe.cli import main
from evalpipe.records import Execution, Generation
from evalpipe.rundir import list_runs

pytest.importorskip("llguidance")
pytest.importorskip("xgrammar")
pytest.importorskip("torch")

TASKS = 8
ARMS = ("guidance", "xgrammar", "none")
Run = tuple[dict[tuple[str, str, str, int], Generation], dict[tuple[str, str, str, int], Execution]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    runs = tmp_path_factory.mktemp("runs")
    args = ["run", "humaneval", "--limit", str(TASKS), "--max-tokens", "384", "--executor", "inline"]
    args += ["--sandbox", "process", "--runs-dir", str(runs)]
    for arm in ARMS:
        args += ["-b", arm]
    assert main(args) == 0
    (made,) = list_runs(runs)
    generations = {g.key.as_tuple(): g for g in made.generations()}
    executions = {e.key.as_tuple(): e for e in made.executions()}
    assert len(generations) == len(executions) == TASKS * len(ARMS)
    return generations, executions


@pytest.mark.slow
def test_constrained_samples_that_ended_are_valid_and_satisfy_the_grammar(run: Run) -> None:
    generations, executions = run
    for arm in ("guidance", "xgrammar"):
        for generation in (g for g in generations.values() if g.key.backend == arm):
            assert generation.effective_backend == arm
            assert generation.finish_reason in ("stop", "length"), generation.error
            if generation.finish_reason == "stop":
                assert generation.constraint_satisfied is True, generation.raw_text
                assert executions[generation.key.as_tuple()].syntax_valid, generation.text


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 11, open: the built-in model (builtin-v2) rarely ends a function under the grammar "
    "(2.4% of HumanEval before 512 tokens); when a recipe ends them, this passes and loses its mark",
)
def test_every_arm_ends_most_completions_before_max_tokens(run: Run) -> None:
    generations, _ = run
    for arm in ARMS:
        reasons = [g.finish_reason for g in generations.values() if g.key.backend == arm]
        assert reasons.count("stop") >= TASKS // 2, (arm, reasons)
