"""evalpipe.compare: alignment, comparability warnings, paired bootstrap CIs, McNemar, output formats.

Run directories are written with the RunDirectory API (create, append, rescore), as the pipeline does.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from evalpipe.compare import (
    CSV_COLUMNS,
    FORMATS,
    ArmInfo,
    ArmMetric,
    BootstrapInfo,
    CompareResult,
    CompareWarning,
    McNemarTest,
    MetricRow,
    RunInfo,
    align,
    compare_command,
    compare_runs,
    mcnemar_exact,
    render,
    resample_counts,
    resampled_quantiles,
)
from evalpipe.errors import UserError
from evalpipe.pipeline import rescore
from evalpipe.records import (
    ClusterConfig,
    Execution,
    Generation,
    Manifest,
    Progress,
    RunConfig,
    SampleKey,
    SandboxLimits,
    Task,
)
from evalpipe.rundir import RunDirectory


@dataclass(frozen=True)
class Sample:
    passed: bool
    valid: bool = True
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    tokens: int | None = None
    compile_s: float | None = None
    satisfied: bool | None = None
    finish: str = "stop"


Arms = dict[tuple[str, str], dict[str, list[Sample]]]


def tasks_named(
    ids: list[str], prompt: str = "def f():\n", test: str = "def check(c):\n    pass\n"
) -> list[Task]:
    return [Task(id=i, prompt=prompt, entry_point="f", test=test) for i in ids]


def make_run(
    runs_dir: Path,
    name: str,
    arms: Arms,
    *,
    tasks: list[Task] | None = None,
    config: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """A completed run directory holding exactly these samples."""
    task_ids = sorted({t for per_task in arms.values() for t in per_task}, key=lambda t: (len(t), t))
    models = tuple(dict.fromkeys(m for m, _ in arms))
    backends = tuple(dict.fromkeys(b for _, b in arms))
    fields = {"suite": "humaneval", "engine": "hf", "sandbox": "process", **(config or {})}
    run_config = RunConfig(models=models, backends=backends, **fields)
    total = sum(len(s) for per_task in arms.values() for s in per_task.values())
    run_manifest = Manifest(
        **{
            "run_id": name,
            "identity": "0" * 64,
            "status": "completed",
            "evalpipe_version": "0.1.0",
            "git_sha": None,
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:00:00+00:00",
            "suite": "humaneval",
            "dataset_sha256": "d" * 64,
            "package_versions": {"xgrammar": "0.2.8", "llguidance": "1.7.6"},
            "hardware": {},
            "sandbox": {"kind": "process"},
            "progress": Progress(expected=total, generated=total, executed=total),
            "cluster": ClusterConfig(),
            **(manifest or {}),
        }
    )
    run = RunDirectory.create(runs_dir, run_config, run_manifest, tasks or tasks_named(task_ids))
    for (model, backend), per_task in arms.items():
        for task_id, samples in per_task.items():
            for index, sample in enumerate(samples):
                key = SampleKey(model=model, backend=backend, task_id=task_id, index=index)
                run.append_generation(
                    Generation(
                        key=key, raw_text="x", text=f"    return {index}\n", finish_reason=sample.finish,
                        n_output_tokens=sample.tokens, ttft_s=sample.ttft, tpot_s=sample.tpot,
                        e2e_s=sample.e2e,
                        grammar_compile_s=sample.compile_s, constraint_satisfied=sample.satisfied,
                        effective_backend=backend,
                    )
                )  # fmt: skip
                status = "passed" if sample.passed else ("failed" if sample.valid else "syntax_error")
                run.append_execution(
                    Execution(
                        key=key, program_sha256="0" * 64, syntax_valid=sample.valid, status=status,
                        passed=sample.passed,
                    )
                )  # fmt: skip
    run.close()
    rescore(run)
    return run.path


def simple(task_ids: list[str], outcomes: list[bool]) -> dict[str, list[Sample]]:
    """One sample per task with the given outcome."""
    return {t: [Sample(passed=p)] for t, p in zip(task_ids, outcomes, strict=True)}


IDS = [f"T/{i}" for i in range(12)]


# -- McNemar ---------------------------------------------------------------------------------------------
def test_mcnemar_matches_scipy_binomtest() -> None:
    from scipy.stats import binomtest  # type: ignore[import-untyped]  # dev dependency: the reference

    for b in range(0, 40):
        for c in range(0, 40, 3):
            if b + c == 0:
                continue
            expected = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
            assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    big = binomtest(3, 150, 0.5).pvalue
    assert mcnemar_exact(147, 3) == pytest.approx(big, rel=1e-9)


def test_mcnemar_exact_values() -> None:
    assert mcnemar_exact(1, 9) == 22 / 1024  # 2 * (C(10,0) + C(10,1)) / 2**10
    assert mcnemar_exact(9, 1) == 22 / 1024
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == 2 / 64


def test_compare_counts_discordant_first_samples(tmp_path: Path) -> None:
    # Reference passes T/0..T/5; the other arm passes T/4..T/11: 4 reference-only, 6 arm-only, 2 both, 0 none.
    reference = simple(IDS, [i < 6 for i in range(12)])
    other = simple(IDS, [i >= 4 for i in range(12)])
    # Extra samples beyond index 0 must not enter McNemar.
    for samples in other.values():
        samples.append(Sample(passed=False))
    a = make_run(tmp_path, "run-a", {("m", "none"): reference})
    b = make_run(tmp_path, "run-b", {("m", "guidance"): other})
    result = compare_runs([a, b], bootstrap=200)
    (test,) = result.mcnemar
    assert (test.both_pass, test.reference_only, test.arm_only, test.neither) == (2, 4, 6, 0)
    assert test.p_value == pytest.approx(mcnemar_exact(4, 6))
    assert not test.significant
    assert test.reference == "m/none" and test.arm == "m/guidance"


# -- bootstrap --------------------------------------------------------------------------------------------
def _random_arm(
    rng: np.random.Generator, task_ids: list[str], skill: float, slow: float
) -> dict[str, list[Sample]]:
    arm = {}
    for task_id in task_ids:
        n = int(rng.integers(2, 5))  # uneven samples per task: ratios must weight by samples, not tasks
        arm[task_id] = [
            Sample(
                passed=bool(rng.random() < skill),
                valid=bool(rng.random() < 0.9),
                ttft=float(np.round(rng.lognormal(-3, 0.5) * slow, 4)),  # rounded: ties happen
                tpot=float(rng.lognormal(-4, 0.2)),
                e2e=float(rng.lognormal(0, 0.3) * slow),
                tokens=int(rng.integers(5, 200)),
            )
            for _ in range(n)
        ]
    return arm


def _loop_statistics(
    run: Path, model: str, backend: str, draws: np.ndarray, tasks: list[str]
) -> dict[str, Any]:
    """Straightforward per-resample statistics from the records, one resample at a time."""
    directory = RunDirectory.open(run)
    executions: dict[str, list[Execution]] = {t: [] for t in tasks}
    for e in directory.executions():
        if (e.key.model, e.key.backend) == (model, backend):
            executions[e.key.task_id].append(e)
    generations: dict[str, list[Generation]] = {t: [] for t in tasks}
    for g in directory.generations():
        if (g.key.model, g.key.backend) == (model, backend):
            generations[g.key.task_id].append(g)
    out: dict[str, list[float]] = {
        name: [] for name in ("pass@1", "syntax_valid", "ttft_p50", "ttft_p90", "tps")
    }
    for row in draws:
        chosen = [tasks[i] for i in row]
        out["pass@1"].append(
            sum(sum(e.passed for e in executions[t]) / len(executions[t]) for t in chosen) / len(chosen)
        )
        out["syntax_valid"].append(
            sum(sum(e.syntax_valid for e in executions[t]) for t in chosen)
            / sum(len(executions[t]) for t in chosen)
        )
        ttft = np.array([g.ttft_s for t in chosen for g in generations[t]], dtype=np.float64)
        out["ttft_p50"].append(float(np.percentile(ttft, 50)))
        out["ttft_p90"].append(float(np.percentile(ttft, 90)))
        tps = [g.n_output_tokens / g.e2e_s for t in chosen for g in generations[t]]  # type: ignore[operator]
        out["tps"].append(sum(tps) / len(tps))
    return {name: np.array(values) for name, values in out.items()}


def test_paired_bootstrap_matches_a_plain_loop(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    task_ids = [f"T/{i}" for i in range(30)]
    arms = {
        ("m", "none"): _random_arm(rng, task_ids, 0.4, 1.0),
        ("m", "guidance"): _random_arm(rng, task_ids, 0.6, 1.3),
    }
    run = make_run(tmp_path, "run", arms)
    resamples, seed = 400, 7
    result = compare_runs([run], bootstrap=resamples, seed=seed)
    assert list(result.tasks) == task_ids
    # The documented draws: row b of default_rng(seed).integers(0, T, (resamples, T)) is resample b.
    draws = np.random.default_rng(seed).integers(0, len(task_ids), size=(resamples, len(task_ids)))
    loops = [_loop_statistics(run, "m", backend, draws, task_ids) for backend in ("none", "guidance")]
    names = {"pass@1": "pass@1", "syntax_valid": "syntax_valid", "ttft_p50": "ttft_p50",
             "ttft_p90": "ttft_p90", "tokens_per_s_mean": "tps"}  # fmt: skip
    rows = {row.name: row for row in result.metrics}
    for metric, loop_name in names.items():
        reference, other = rows[metric].values
        for value, loop in ((reference, loops[0][loop_name]), (other, loops[1][loop_name])):
            low, high = np.percentile(loop, [2.5, 97.5])
            assert value.ci_low == pytest.approx(low, rel=1e-9)
            assert value.ci_high == pytest.approx(high, rel=1e-9)
        delta_low, delta_high = np.percentile(loops[1][loop_name] - loops[0][loop_name], [2.5, 97.5])
        assert other.delta_ci_low == pytest.approx(delta_low, rel=1e-9, abs=1e-12), metric
        assert other.delta_ci_high == pytest.approx(delta_high, rel=1e-9, abs=1e-12), metric
        assert other.significant == (delta_low > 0 or delta_high < 0)
        assert reference.delta is None and reference.significant is None


@settings(max_examples=150, deadline=None)
@given(
    per_task=st.lists(
        st.lists(st.integers(0, 6).map(lambda v: v / 4), min_size=0, max_size=6), min_size=1, max_size=7
    ),
    seed=st.integers(0, 2**16),
    coarse=st.integers(1, 5),
    cell=st.integers(1, 4),
)
def test_resampled_quantiles_are_exact(
    per_task: list[list[float]], seed: int, coarse: int, cell: int
) -> None:
    """Ties, empty tasks and uneven tasks: each resample's percentile equals numpy's on the pooled copies."""
    values = np.array([v for vs in per_task for v in vs], dtype=np.float64)
    task = np.array([t for t, vs in enumerate(per_task) for _ in vs], dtype=np.int64)
    counts = resample_counts(len(per_task), 25, seed)
    quantiles = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
    got = resampled_quantiles(values, task, counts, quantiles, coarse=coarse, cell=cell)
    draws = np.random.default_rng(seed).integers(0, len(per_task), size=(25, len(per_task)))
    for b, row in enumerate(draws):
        pooled = [v for t in row for v in per_task[t]]
        if not pooled:
            assert np.isnan(got[b]).all()
            continue
        expected = np.percentile(pooled, [100 * q for q in quantiles])
        np.testing.assert_allclose(got[b], expected, rtol=1e-12, atol=1e-12)


def test_identical_arms_are_not_significant_and_clear_differences_are(tmp_path: Path) -> None:
    same = simple(IDS, [i % 2 == 0 for i in range(12)])
    a = make_run(tmp_path, "run-a", {("m", "none"): same})
    b = make_run(tmp_path, "run-b", {("m", "guidance"): same})
    result = compare_runs([a, b], bootstrap=500)
    pass1 = next(row for row in result.metrics if row.name == "pass@1")
    assert pass1.values[1].delta == 0.0 and pass1.values[1].significant is False
    many = [f"T/{i}" for i in range(40)]
    c = make_run(tmp_path, "run-c", {("m", "none"): simple(many, [i < 4 for i in range(40)])})
    d = make_run(tmp_path, "run-d", {("m", "guidance"): simple(many, [i < 36 for i in range(40)])})
    result = compare_runs([c, d], bootstrap=500)
    pass1 = next(row for row in result.metrics if row.name == "pass@1")
    assert pass1.values[1].delta == pytest.approx(0.8)
    assert pass1.values[1].significant is True
    assert result.mcnemar[0].significant and result.mcnemar[0].p_value == mcnemar_exact(0, 32)


# -- alignment ----------------------------------------------------------------------------------------------
def test_disjoint_task_sets_are_refused(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS[:5], [True] * 5)})
    b = make_run(tmp_path, "run-b", {("m", "none"): simple(IDS[5:], [True] * 7)})
    with pytest.raises(UserError, match="share no task"):
        compare_runs([a, b])


def test_partial_overlap_compares_the_intersection_and_warns(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS[:8], [True] * 8)})
    b = make_run(tmp_path, "run-b", {("m", "guidance"): simple(IDS[3:], [False] * 9)})
    result = compare_runs([a, b], bootstrap=100)
    assert list(result.tasks) == IDS[3:8]
    (warning,) = [w for w in result.warnings if w.field == "tasks"]
    assert (
        "5 task(s)" in warning.message and "m/none 3" in warning.message and "m/guidance 4" in warning.message
    )
    assert [arm.tasks_left_out for arm in result.arms] == [3, 4]
    pass1 = next(row for row in result.metrics if row.name == "pass@1")
    assert [v.value for v in pass1.values] == [1.0, 0.0]


def test_a_task_id_naming_another_task_is_refused(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)})
    other_test = tasks_named(IDS, test="def check(c):\n    assert c() == 1\n")
    b = make_run(tmp_path, "run-b", {("m", "none"): simple(IDS, [True] * 12)}, tasks=other_test)
    with pytest.raises(UserError, match="not the same task"):
        compare_runs([a, b])


def test_arms_of_one_run_in_the_order_given(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        "run",
        {("m", "none"): simple(IDS, [True] * 12), ("m", "guidance"): simple(IDS, [False] * 12)},
    )
    result = compare_runs([run], bootstrap=100)
    assert [arm.label for arm in result.arms] == ["m/none", "m/guidance"]
    assert result.reference == "m/none"
    assert result.warnings == ()  # one run: nothing to be incomparable with


def test_same_labels_in_two_runs_are_told_apart(tmp_path: Path) -> None:
    a = make_run(tmp_path, "humaneval-x-aaaa1111", {("m", "none"): simple(IDS, [True] * 12)})
    b = make_run(tmp_path, "humaneval-x-bbbb2222", {("m", "none"): simple(IDS, [False] * 12)})
    result = compare_runs([a, b], bootstrap=100)
    assert [arm.label for arm in result.arms] == ["m/none@aaaa1111", "m/none@bbbb2222"]


def test_nothing_to_compare_and_bad_options_are_user_errors(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)})
    with pytest.raises(UserError, match="nothing to compare"):
        compare_runs([a])
    with pytest.raises(UserError, match="given twice"):
        compare_runs([a, a])
    with pytest.raises(UserError, match="unknown format 'yaml'"):
        compare_runs([a, a], fmt="yaml")
    with pytest.raises(UserError, match="--bootstrap"):
        compare_runs([a, a], bootstrap=0)
    with pytest.raises(UserError, match="not a directory"):
        compare_runs([a, tmp_path / "missing"])


def test_replayed_runs_have_no_latency_rows(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)})
    sample = Sample(passed=True, ttft=0.1, tpot=0.01, e2e=1.0, tokens=50, compile_s=0.002, satisfied=True)
    timed = {t: [sample] for t in IDS}
    b = make_run(tmp_path, "run-b", {("m", "guidance"): timed})
    names = [row.name for row in compare_runs([a, b], bootstrap=100).metrics]
    assert names == [
        "pass@1", "syntax_valid", "constraint_satisfied", "max_tokens", "syntax_valid_ended",
        "constraint_satisfied_ended", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "e2e_p90",
        "grammar_compile_mean", "tokens_per_s_mean",
    ]  # fmt: skip
    result = compare_runs([a, b], bootstrap=100)
    ttft = next(row for row in result.metrics if row.name == "ttft_p50")
    assert ttft.values[0].value is None and ttft.values[0].ci_low is None
    assert ttft.values[1].value == pytest.approx(0.1) and ttft.values[1].delta is None
    c = make_run(tmp_path, "run-c", {("m", "none"): simple(IDS, [False] * 12)})
    assert [row.name for row in compare_runs([a, c], bootstrap=100).metrics] == [
        "pass@1", "syntax_valid", "max_tokens", "syntax_valid_ended",
    ]  # fmt: skip


def test_samples_cut_at_max_tokens_are_a_metric_and_the_ended_rates_leave_them_out(tmp_path: Path) -> None:
    """The max-tokens share is compared with its CI; syntax validity and constraint satisfaction are also
    compared over the samples that ended on their own."""
    cut = Sample(passed=False, valid=False, satisfied=False, finish="length")
    ended = Sample(passed=False, valid=True, satisfied=True)
    free = {t: [cut if i % 2 else ended] for i, t in enumerate(IDS)}  # half of the tasks cut
    constrained = {t: [ended] for t in IDS}
    run = make_run(tmp_path, "run", {("m", "none"): free, ("m", "guidance"): constrained})
    rows = {row.name: row for row in compare_runs([run], bootstrap=200).metrics}
    none, guidance = rows["max_tokens"].values
    assert none.value == pytest.approx(0.5) and guidance.value == 0.0
    assert guidance.delta == pytest.approx(-0.5) and guidance.significant
    assert none.ci_low is not None and none.ci_high is not None and none.ci_low < 0.5 < none.ci_high
    assert rows["syntax_valid"].values[0].value == pytest.approx(0.5)
    assert rows["syntax_valid_ended"].values[0].value == 1.0  # the cut samples are left out
    assert rows["constraint_satisfied_ended"].values[0].value == 1.0
    assert rows["max_tokens"].higher_is_better is False


# -- comparability -----------------------------------------------------------------------------------------
CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "temperature": ({"temperature": 0.8}, {}),
    "top_p": ({"top_p": 0.95}, {}),
    "max_tokens": ({"max_tokens": 256}, {}),
    "seed": ({"seed": 3}, {}),
    "limits.cpu_time_s": ({"limits": SandboxLimits(cpu_time_s=2.0)}, {}),
    "sandbox": ({"sandbox": "docker"}, {}),
    "engine": ({"engine": "vllm"}, {}),
    "dataset_sha256": ({}, {"dataset_sha256": "e" * 64}),
    "suite": ({}, {"suite": "humaneval-plus"}),
    "evalpipe_version": ({}, {"evalpipe_version": "0.2.0"}),
    "package_versions.xgrammar": ({}, {"package_versions": {"xgrammar": "0.2.9", "llguidance": "1.7.6"}}),
    "prompt_format": ({}, {"engine": {"m/none": {"prompt_format": "chat"}}}),
    "package_versions.torch": ({}, {"engine": {"m/none": {"versions": {"torch": "2.13.0"}}}}),
    "grammar_sha256": ({}, {"grammar_sha256": {"lark": "b" * 64}}),
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_difference_is_named(tmp_path: Path, field: str) -> None:
    config, manifest = CHANGES[field]
    base_manifest = {"grammar_sha256": {"lark": "a" * 64}} if field == "grammar_sha256" else {}
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)}, manifest=base_manifest)
    b = make_run(
        tmp_path, "run-b", {("m", "none"): simple(IDS, [False] * 12)}, config=config, manifest=manifest
    )
    result = compare_runs([a, b], bootstrap=50)
    assert [w.field for w in result.warnings] == [field]
    (warning,) = result.warnings
    assert set(warning.values) == {"run-a", "run-b"}
    assert warning.values["run-a"] != warning.values["run-b"]
    assert "run-a" in warning.message and "run-b" in warning.message


def test_several_differences_and_their_values(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)})
    b = make_run(
        tmp_path, "run-b", {("m", "none"): {t: [Sample(True), Sample(False)] for t in IDS}},
        config={"temperature": 0.8, "seed": 1}, manifest={"evalpipe_version": "0.2.0"},
        tasks=tasks_named(IDS, prompt="def f():\n    '''Other words.'''\n"),
    )  # fmt: skip
    result = compare_runs([a, b], bootstrap=50)
    by_field = {w.field: w for w in result.warnings}
    assert set(by_field) == {"prompt", "temperature", "seed", "n_samples", "evalpipe_version"}
    assert by_field["temperature"].values == {"run-a": "0.0", "run-b": "0.8"}
    assert by_field["n_samples"].values == {"run-a": "1", "run-b": "2"}
    assert "12 of 12" in by_field["prompt"].message


def test_unconstrained_against_constrained_is_not_a_grammar_difference(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)})
    b = make_run(
        tmp_path, "run-b", {("m", "guidance"): simple(IDS, [True] * 12)},
        manifest={"grammar_sha256": {"lark": "a" * 64}},
    )  # fmt: skip
    assert compare_runs([a, b], bootstrap=50).warnings == ()


def test_replayed_runs_compare_sampling_settings_as_unknown(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run-a", {("m", "none"): simple(IDS, [True] * 12)}, config={"engine": "samples"})
    b = make_run(tmp_path, "run-b", {("n", "none"): simple(IDS, [True] * 12)}, config={"engine": "reference"})
    fields = [w.field for w in compare_runs([a, b], bootstrap=50).warnings]
    assert fields == ["engine"]  # defaults in config.json of replayed runs are not sampling settings
    c = make_run(tmp_path, "run-c", {("m", "none"): simple(IDS, [True] * 12)}, config={"temperature": 0.2})
    warnings = {w.field: w for w in compare_runs([a, c], bootstrap=50).warnings}
    assert "temperature" in warnings and "replayed" in warnings["temperature"].values["run-a"]


# -- formats ------------------------------------------------------------------------------------------------
@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    a = make_run(tmp_path, "run-a", {("m", "none"): _random_arm(rng, IDS, 0.3, 1.0)})
    arm = _random_arm(rng, IDS, 0.7, 1.2)
    arm = {
        t: [Sample(**{**s.__dict__, "satisfied": True, "compile_s": 0.01}) for s in ss]
        for t, ss in arm.items()
    }
    b = make_run(tmp_path, "run-b", {("m", "guidance"): arm}, config={"temperature": 0.5})
    return [a, b]


def test_every_format_renders_and_json_round_trips(two_runs: list[Path]) -> None:
    result = compare_runs(two_runs, bootstrap=300)
    outputs = {fmt: render(result, fmt) for fmt in FORMATS}
    assert CompareResult.model_validate_json(outputs["json"]) == result
    payload = json.loads(outputs["json"])
    assert payload["schema_version"] == 1 and payload["reference"] == "m/none"
    assert {m["name"] for m in payload["metrics"]} >= {
        "pass@1",
        "syntax_valid",
        "ttft_p50",
        "tokens_per_s_mean",
    }

    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == len(result.metrics) * len(result.arms) + len(result.mcnemar)
    pass1 = [r for r in rows if r["metric"] == "pass@1"]
    assert [r["arm"] for r in pass1] == ["m/none", "m/guidance"]
    assert pass1[0]["delta"] == "" and math.isclose(
        float(pass1[1]["delta"]), result.metrics[0].values[1].delta or 0
    )
    (mcnemar_row,) = [r for r in rows if r["test"] == "mcnemar_exact"]
    assert float(mcnemar_row["p_value"]) == result.mcnemar[0].p_value

    markdown = outputs["markdown"]
    assert "| metric | `m/none` | `m/guidance` |" in markdown
    assert "McNemar" in markdown and "temperature differs" in markdown
    assert markdown.count("\n| ") >= len(result.metrics) + 2

    table = outputs["table"]
    for text in ("m/none", "m/guidance", "pass@1", "TTFT p50", "McNemar", "Δ"):
        assert text in table


def test_significant_differences_are_marked_in_every_format(tmp_path: Path) -> None:
    many = [f"T/{i}" for i in range(40)]
    c = make_run(tmp_path, "run-c", {("m", "none"): simple(many, [i < 4 for i in range(40)])})
    d = make_run(tmp_path, "run-d", {("m", "guidance"): simple(many, [i < 36 for i in range(40)])})
    result = compare_runs([c, d], bootstrap=300)
    assert "Δ +80.0 pp" in render(result, "table") and "pp [" in render(result, "table")
    assert "] *" in render(result, "table")
    assert "**Δ +80.0 pp" in render(result, "markdown") and "\\***" in render(result, "markdown")
    csv_rows = list(csv.DictReader(io.StringIO(render(result, "csv"))))
    assert (
        next(r for r in csv_rows if r["metric"] == "pass@1" and r["arm"] == "m/guidance")["significant"]
        == "true"
    )


def test_the_command_registers_in_one_line(two_runs: list[Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("compare")(compare_command)
    app.command("other")(lambda: None)  # with two commands typer keeps the command name
    runner = CliRunner()
    done = runner.invoke(app, ["compare", *map(str, two_runs), "--format", "json", "--bootstrap", "200"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["bootstrap"]["resamples"] == 200
    assert "temperature differs" in done.stderr  # warnings on stderr: stdout stays JSON
    out = tmp_path / "compare.csv"
    done = runner.invoke(
        app, ["compare", *map(str, two_runs), "-f", "csv", "-o", str(out), "--bootstrap", "50"]
    )
    assert done.exit_code == 0 and out.read_text().startswith("metric,arm,")
    done = runner.invoke(app, ["compare", str(two_runs[0]), str(two_runs[1]), "--bootstrap", "50"])
    assert done.exit_code == 0 and "pass@1" in done.stdout
    done = runner.invoke(app, ["compare", str(two_runs[0]), "-f", "xml"])
    assert isinstance(done.exception, UserError)


def test_alignment_arrays_match_scores_json(two_runs: list[Path]) -> None:
    """What compare pairs is what scores.json counted: per-task (n, c) of every arm."""
    aligned = align(two_runs)
    for arm, path in zip(aligned.arms, two_runs, strict=True):
        (score,) = RunDirectory.open(path).scores()
        assert {
            t: (int(n), int(c)) for t, n, c in zip(aligned.tasks, arm.n, arm.c, strict=True)
        } == score.per_task


DOC = Path(__file__).resolve().parents[2] / "docs" / "compare.md"


def _documented(heading: str) -> list[str]:
    section = DOC.read_text().split(f"### {heading}", 1)[1].strip().split("\n\n", 1)[0]
    return re.findall(r"`(\w+)`", section)


@pytest.mark.parametrize(
    ("heading", "record"),
    [
        ("CompareResult", CompareResult), ("RunInfo (`runs[]`)", RunInfo), ("ArmInfo (`arms[]`)", ArmInfo),
        ("BootstrapInfo (`bootstrap`)", BootstrapInfo), ("MetricRow (`metrics[]`)", MetricRow),
        ("ArmMetric (`metrics[].values[]`)", ArmMetric),
        ("McNemarTest (`mcnemar[]`, one per non-reference arm)", McNemarTest),
        ("CompareWarning (`warnings[]`)", CompareWarning),
    ],
)  # fmt: skip
def test_json_shape_is_documented(heading: str, record: type[BaseModel]) -> None:
    assert _documented(heading) == list(record.model_fields)


def test_csv_columns_are_documented() -> None:
    assert tuple(_documented("columns")) == CSV_COLUMNS
