"""`evalpipe compare` on two large runs: 164 tasks x 200 samples each, with latency and grammar metrics.

    python benchmarks/bench_compare.py                 # 164 x 200, 10 000 resamples, best of 3
    python benchmarks/bench_compare.py --samples 50 --repeat 5

The two run directories are written with the RunDirectory API into a temporary folder (completions are the
tasks' canonical solutions, so records have realistic sizes). The benchmark times `compare_runs` end to end
(reading both runs included) against just reading them (`RunDirectory.open` and every record), and checks
the target: under 2 seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evalpipe.compare import CompareResult, compare_runs, render
from evalpipe.pipeline import rescore
from evalpipe.records import (
    ClusterConfig,
    Execution,
    Generation,
    Manifest,
    Progress,
    RunConfig,
    SampleKey,
    Task,
)
from evalpipe.rundir import RunDirectory, paused_gc
from evalpipe.sources import load_humaneval

TARGET_S = 2.0


def build_run(
    runs_dir: Path, tasks: list[Task], dataset_sha: str, backend: str, samples: int, seed: int
) -> Path:
    """A completed run of one (model, backend) with pass rates, latency and constraint data."""
    config = RunConfig(
        suite="humaneval", engine="hf", models=("bench-model",), backends=(backend,), n_samples=samples,
        temperature=0.8, sandbox="process",
    )  # fmt: skip
    total = samples * len(tasks)
    manifest = Manifest(
        run_id=f"humaneval-bench-{backend}", identity=config.identity(dataset_sha), status="completed",
        evalpipe_version="0.1.0", git_sha=None, created_at="2026-01-01T00:00:00+00:00",
        updated_at="2026-01-01T00:00:00+00:00", suite="humaneval", dataset_sha256=dataset_sha,
        grammar_sha256={"lark": "0" * 64} if backend != "none" else {}, package_versions={}, hardware={},
        sandbox={"kind": "process"}, progress=Progress(expected=total, generated=total, executed=total),
        cluster=ClusterConfig(),
    )  # fmt: skip
    run = RunDirectory.create(runs_dir, config, manifest, tasks)
    rng = np.random.default_rng(seed)
    constrained = backend != "none"
    for task in tasks:
        difficulty = rng.beta(2, 2)  # tasks differ in difficulty and in latency: both matter for the CIs
        slowness = rng.lognormal(0, 0.4)
        for index in range(samples):
            key = SampleKey(model="bench-model", backend=backend, task_id=task.id, index=index)
            passed = bool(rng.random() < difficulty)
            text = task.canonical_solution or ""
            tokens = int(rng.integers(20, 300))
            tpot = float(rng.lognormal(-4.0, 0.2)) * (1.1 if constrained else 1.0)
            ttft = float(rng.lognormal(-3.0, 0.3)) * slowness
            run.append_generation(
                Generation(
                    key=key, raw_text=text, text=text, finish_reason="stop", n_prompt_tokens=150,
                    n_output_tokens=tokens, ttft_s=ttft, tpot_s=tpot, e2e_s=ttft + tpot * (tokens - 1),
                    grammar_compile_s=float(rng.lognormal(-5, 1)) if constrained else None,
                    grammar_cache_hit=bool(index) if constrained else None,
                    mask_s_per_token=float(rng.lognormal(-9, 0.3)) if constrained else None,
                    constraint_satisfied=bool(rng.random() < 0.97) if constrained else None,
                    effective_backend=backend,
                )
            )  # fmt: skip
            run.append_execution(
                Execution(
                    key=key, program_sha256="0" * 64, syntax_valid=bool(rng.random() < 0.95),
                    status="passed" if passed else "failed", passed=passed, exit_code=0 if passed else 1,
                    duration_s=0.01, cpu_s=0.01,
                    stderr_tail="" if passed else "Traceback (most recent call last):\nAssertionError\n",
                )
            )  # fmt: skip
    run.close()
    rescore(run)
    return run.path


def load_only(paths: list[Path]) -> None:
    """What compare cannot avoid: opening both runs and reading every record."""
    for path in paths:
        run = RunDirectory.open(path)
        _ = (run.manifest, run.config, run.tasks(), run.generations(), run.executions())


def load_only_paused_gc(paths: list[Path]) -> None:
    """The same, with the cyclic GC paused as compare does while it reads (see compare.paused_gc)."""
    with paused_gc():
        load_only(paths)


def timed(function: Callable[[], object], repeat: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per repetition: CPU time shows the work when others share the machine."""
    times = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--samples", type=int, default=200, help="samples per task (default 200)")
    parser.add_argument("--bootstrap", type=int, default=10_000, help="resamples (default 10 000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (default 3)")
    args = parser.parse_args()
    tasks, dataset_sha = load_humaneval()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        paths = [
            build_run(Path(scratch), tasks, dataset_sha, backend, args.samples, seed)
            for seed, backend in enumerate(("none", "guidance"))
        ]
        built_s = time.perf_counter() - started
        print(f"built 2 runs of {len(tasks)} tasks x {args.samples} samples in {built_s:.1f} s")
        size = sum(f.stat().st_size for path in paths for f in path.iterdir()) / 2**20
        load = timed(lambda: load_only(paths), args.repeat)
        load_paused = timed(lambda: load_only_paused_gc(paths), args.repeat)
        results: list[CompareResult] = []
        compare = timed(lambda: results.append(compare_runs(paths, bootstrap=args.bootstrap)), args.repeat)
        rendering = timed(
            lambda: [render(results[-1], fmt) for fmt in ("table", "json", "csv", "markdown")], 1
        )
    best_load, best_paused, best_compare = min(load)[0], min(load_paused)[0], min(compare)[0]
    print(f"{size:.0f} MiB of run files; {args.bootstrap} resamples; {len(results[-1].metrics)} metrics")
    print(f"{'':<34}{'best s':>8}{'median s':>10}{'CPU s':>8}")
    for name, times, (best, cpu) in (
        ("read both runs (RunDirectory)", load, min(load)),
        ("read both runs, GC paused", load_paused, min(load_paused)),
        ("compare_runs (reading included)", compare, min(compare)),
    ):
        print(f"{name:<34}{best:>8.2f}{statistics.median(t for t, _ in times):>10.2f}{cpu:>8.2f}")
    print(f"{'render all four formats':<34}{rendering[0][0]:>8.2f}")
    print(
        f"compare / read: {best_compare / best_load:.2f}x (GC paused: {best_compare / best_paused:.2f}x); "
        f"beyond reading: {best_compare - best_paused:.2f} s"
    )
    print(f"load average while measuring: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    verdict = "ok" if best_compare < TARGET_S else "TOO SLOW"
    print(f"target < {TARGET_S:.0f} s: {verdict}")
    return 0 if best_compare < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
