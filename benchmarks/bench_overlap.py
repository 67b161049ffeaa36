"""Overlap and overhead of the Ray executor, all measured in this one process under the same load.

    python benchmarks/bench_overlap.py                   # 164 tasks x 3 samples, 2 sandbox workers
    python benchmarks/bench_overlap.py --samples 1 --workers 1

The scripted engine replays canonical solutions with a per-request delay (it sleeps, using no CPU, like a
GPU-bound engine seen from the host), through one replica; programs run in the `process` sandbox.

1. execution only: every program through the Ray sandbox workers (E);
2. the delay is set so that generation takes about as long (`--balance`, default 1.0 x E);
3. generation only: the same requests through the replica, nothing executed (G);
4. the run: `pipeline.execute` into a run directory, generation and execution overlapped (T);
5. the engine called directly in this process, and through Ray, with the delay and with none: what Ray adds
   per sample.

Targets: T <= 1.1 x max(G, E) (overlap works), and Ray adds <= 1 ms per sample over the direct call.
Actor start-up is excluded from every timing (each executor is warmed first) and reported apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

from evalpipe import pipeline
from evalpipe.cluster import MAX_BATCH, RayExecutor
from evalpipe.engines.base import GenerationRequest
from evalpipe.engines.scripted import ScriptedEngine
from evalpipe.program import judged_job
from evalpipe.records import ClusterConfig, RunConfig
from evalpipe.rundir import RunDirectory
from evalpipe.sandbox.base import Job
from evalpipe.sandbox.process import ProcessSandbox
from evalpipe.suites import load_suite

# `scripted` is a test-only engine, registered by tests/plugins/ (an entry point) as a user's plugin would be:
# on sys.path for this process, on PYTHONPATH for the Ray workers.
PLUGINS = Path(__file__).resolve().parent.parent / "tests" / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)


def plan_for(samples: int, workers: int, runs: Path) -> pipeline.RunPlan:
    suite = load_suite("humaneval")
    config = RunConfig(
        suite="humaneval",
        engine="scripted",
        models=("bench",),
        backends=("none",),
        n_samples=samples,
        ks=(1,),
        sandbox="process",
        limits=suite.execution,
    )
    cluster = ClusterConfig(runs_dir=str(runs), executor="ray", workers=workers, replicas=1)
    return pipeline.prepare(config, cluster)


def jobs_for(plan: pipeline.RunPlan, requests: list[GenerationRequest]) -> list[Job]:
    return [judged_job(r.key, r.task, r.task.canonical_solution or "") for r in requests]


def timed_executor(plan: pipeline.RunPlan) -> tuple[RayExecutor, float]:
    """A RayExecutor whose actors have all started and served one call (start-up is not the benchmark)."""
    started = time.perf_counter()
    executor = RayExecutor(plan)
    executor.sandbox_info()
    warm = plan.requests[: 2 * executor.workers]
    executor.generate_only(warm[:1])
    for _ in executor.run([], jobs_for(plan, warm), lambda g: Job(key=g.key, program="")):
        pass
    return executor, time.perf_counter() - started


def time_execution(executor: RayExecutor, jobs: list[Job]) -> float:
    started = time.perf_counter()
    results = list(executor.run([], jobs, lambda g: Job(key=g.key, program="")))
    elapsed = time.perf_counter() - started
    assert len(results) == len(jobs) and all(r.passed for _, r in results), "a canonical program failed"
    return elapsed


def time_generation(executor: RayExecutor, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    generations = executor.generate_only(requests)
    elapsed = time.perf_counter() - started
    assert len(generations) == len(requests)
    return elapsed


def time_direct(plan: pipeline.RunPlan, requests: list[GenerationRequest], batch: int) -> float:
    """The engine called in this process, `batch` requests per generate() call, as the dispatcher calls it."""
    engine = ScriptedEngine(plan.config, plan.suite, "bench", "none")  # reads the delay now
    started = time.perf_counter()
    count = 0
    for first in range(0, len(requests), batch):
        count += sum(1 for _ in engine.generate(requests[first : first + batch]))
    elapsed = time.perf_counter() - started
    assert count == len(requests)
    return elapsed


def time_direct_execution(plan: pipeline.RunPlan, jobs: list[Job], workers: int) -> float:
    """The run's sandbox kind with `workers` runners, in this process: execution without Ray."""
    sandbox = ProcessSandbox(plan.config.limits, workers=workers)
    try:
        started = time.perf_counter()
        results = list(sandbox.run(jobs))
        elapsed = time.perf_counter() - started
    finally:
        sandbox.close()
    assert len(results) == len(jobs) and all(r.passed for _, r in results), "a canonical program failed"
    return elapsed


def time_run(plan: pipeline.RunPlan, executor: RayExecutor, runs: Path) -> float:
    manifest = pipeline.new_manifest(plan, executor, pipeline.run_id_for(plan) + os.urandom(2).hex())
    run = RunDirectory.create(runs, plan.config, manifest, plan.tasks)
    started = time.perf_counter()
    scores = pipeline.execute(plan, run, executor)
    elapsed = time.perf_counter() - started
    run.close()
    assert scores[0].pass_at_k[1] == 1.0 and scores[0].n_samples == len(plan.requests), scores
    return elapsed


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--samples", type=int, default=3, help="samples per task (default 3: 492 programs)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="sandbox workers")
    parser.add_argument("--balance", type=float, default=1.0, help="generation time as a multiple of E")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every timing; medians are shown")
    args = parser.parse_args()

    ray.init(
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    figures: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        figures.setdefault(name, []).append(seconds)

    try:
        with tempfile.TemporaryDirectory() as scratch:
            runs = Path(scratch)
            # No delay: what Ray costs a generation when the engine is infinitely fast; and E to calibrate.
            os.environ["EVALPIPE_SCRIPTED_DELAY_S"] = "0"
            plan = plan_for(args.samples, args.workers, runs)
            requests, n = plan.requests, len(plan.requests)
            jobs = jobs_for(plan, requests)
            executor, startup_s = timed_executor(plan)
            calibration_s = time_execution(executor, jobs)
            for _ in range(args.rounds):
                record("G0 ray", time_generation(executor, requests))
                record("G0 direct", time_direct(plan, requests, MAX_BATCH))
            executor.close()

            # Delay so that generation alone takes about `balance` x E; the replica reads it when built.
            delay = args.balance * calibration_s / n
            os.environ["EVALPIPE_SCRIPTED_DELAY_S"] = f"{delay:.6f}"
            plan = plan_for(args.samples, args.workers, runs)
            executor, _ = timed_executor(plan)
            # Every figure once per round, so that all of them see the same (shared, noisy) machine.
            for _ in range(args.rounds):
                record("E", time_execution(executor, jobs))
                record("E direct", time_direct_execution(plan, jobs, args.workers))
                record("G", time_generation(executor, requests))
                record("G direct", time_direct(plan, requests, MAX_BATCH))
                record("G direct one call", time_direct(plan, requests, n))
                record("T", time_run(plan, executor, runs))
            executor.close()
    finally:
        ray.shutdown()

    med = {name: statistics.median(values) for name, values in figures.items()}
    per_round = [t / max(g, e) for t, g, e in zip(figures["T"], figures["G"], figures["E"], strict=True)]
    print(f"\n{n} samples (164 tasks x {args.samples}), 1 replica, {args.workers} sandbox workers, "
          f"delay {delay * 1000:.2f} ms/request; medians of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'figure':<60}{'seconds':>9}")
    for name, value in [
        ("actor start-up + warm-up (excluded below)", startup_s),
        ("E  execution only (Ray sandbox workers)", med["E"]),
        ("   execution only, sandbox in this process", med["E direct"]),
        ("G  generation only (Ray replica)", med["G"]),
        (f"   generation, engine called directly, {MAX_BATCH} per call", med["G direct"]),
        ("   generation, engine called directly, all in one call", med["G direct one call"]),
        ("T  run: overlapped, records written, scored", med["T"]),
        ("   generation with no delay, through Ray", med["G0 ray"]),
        (f"   generation with no delay, engine directly, {MAX_BATCH} per call", med["G0 direct"]),
    ]:
        print(f"{name:<60}{value:>9.3f}")
    print(f"\nT / max(G, E)   = {med['T'] / max(med['G'], med['E']):.3f}   (target <= 1.1; per round: "
          f"{', '.join(f'{r:.3f}' for r in per_round)})")  # fmt: skip
    print(f"T / (G + E)     = {med['T'] / (med['G'] + med['E']):.3f}   (1.0 would be no overlap at all)")
    per_sample = {
        "generation with the delay": (med["G"] - med["G direct"]) / n,
        "generation, no delay": (med["G0 ray"] - med["G0 direct"]) / n,
        "execution": (med["E"] - med["E direct"]) / n,
    }
    for name, seconds in per_sample.items():
        target = "   (target <= 1 ms)" if name == "generation with the delay" else ""
        print(f"Ray per sample, {name:<27}{seconds * 1000:+.3f} ms{target}")


if __name__ == "__main__":
    main()
