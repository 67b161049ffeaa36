"""The built-in model: how long it takes to build, and whether it ends its functions.

    python benchmarks/bench_builtin.py build --out /tmp/m [steps=300 seq_len=384 ...]  # RECIPE, overridden
    python -m evalpipe.cli run humaneval -m /tmp/m -b none --executor inline --sandbox process --runs-dir R
    python benchmarks/bench_builtin.py count R/humaneval-*            # one or more run directories

`build` trains `RECIPE` (with KEY=VALUE overrides, values read as JSON) into a folder and prints the build
record: wall time and CPU time of the build, final loss. `count` reads a run directory's tasks and generations
and prints, per (model, backend):

- finish reasons, and the share of completions that *ended* before max tokens: at EOS, at a stop sequence, or
  at a stop sequence at the very start of the completion (the prompt ends with a newline; today's hf engine
  does not see that one and runs on, so it is counted from the text);
- syntax validity of `prompt + completion` cut at the first stop sequence, and how many of those are code (not
  empty, blank or comment-only);
- the indented-body share: completions whose text before the first stop sequence / EOS is only blank lines
  and lines indented by 4 or more spaces, with at least one statement: what the body grammar accepts as is, so
  a model that ends there ends under a constraint too;
- for chat suites (`humaneval_json`): how many replies are a JSON object with a string `code`, how many have a
  code fence, and how many extracted programs parse.

Target (issue 11): at least 75% ended under every arm, and a build of at most 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import sys
from pathlib import Path
from typing import Any

from evalpipe.completion import code_block, find_stop, json_field
from evalpipe.engines.builtin import RECIPE, build_builtin

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
"""tasks/humaneval.toml's stop sequences."""


def build(out: Path, overrides: list[str]) -> None:
    recipe = dict(RECIPE)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in recipe:
            sys.exit(f"unknown recipe key {key!r}")
        recipe[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    out.mkdir(parents=True, exist_ok=True)
    info = build_builtin(out, recipe, progress=True)
    print(json.dumps({k: info[k] for k in ("build_s", "build_cpu_s", "final_loss", "corpus_tokens")}))


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _is_code(completion: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in completion.splitlines())


def _indented_body(cut: str) -> bool:
    lines = cut.split("\n")
    return all(not line.strip() or line.startswith("    ") for line in lines) and _is_code(cut)


def count(run: Path) -> None:
    prompts = {}
    for line in (run / "tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        prompts[task["id"]] = task["prompt"]
    config = json.loads((run / "config.json").read_text())
    max_tokens = config.get("max_tokens", 512)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for line in (run / "generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        groups[record["key"]["model"], record["key"]["backend"]].append(record)
    chat = str(config["suite"]).endswith(("_json", "_chat"))
    for (model, backend), records in sorted(groups.items()):
        n = len(records)
        reasons = collections.Counter(r["finish_reason"] for r in records)
        how: collections.Counter[str] = collections.Counter()
        syntax = code = indented = 0
        json_objects = fences = chat_parses = 0
        for r in records:
            raw = r["raw_text"]
            prompt = prompts[r["key"]["task_id"]]
            # The prompt ends with a newline, so a completion that starts with "def " starts a top-level line.
            match = find_stop(raw, STOPS, lead="\n")
            cut = raw if match is None else raw[: match.code_end]
            if chat:
                how["not ended" if r["finish_reason"] == "length" else "EOS"] += 1
            elif r["finish_reason"] in ("stop", "grammar_end"):
                how["stop sequence" if len(cut) < len(raw) else "EOS"] += 1
            elif len(cut) < len(raw) and r["n_output_tokens"] <= max_tokens:
                how["stop sequence the engine missed"] += 1
            else:
                how["not ended"] += 1
            if chat:
                found = json_field(raw, "code")
                json_objects += found is not None
                fences += "```" in raw
                chat_parses += _parses(prompt + code_block(found if found is not None else raw))
                continue
            syntax += _parses(prompt + cut)
            code += _parses(prompt + cut) and _is_code(cut)
            indented += _indented_body(cut)
        ended = n - how["not ended"]
        print(f"{model} / {backend}: {n} samples, max_tokens {max_tokens}")
        print(f"  finish reasons: {dict(sorted(reasons.items()))}")
        print(f"  ended before max tokens: {ended}/{n} = {ended / n:.1%}  ({dict(sorted(how.items()))})")
        if chat:
            print(f"  JSON object with code: {json_objects}/{n}, code fence: {fences}/{n}")
            print(f"  extracted code parses: {chat_parses}/{n}")
        else:
            print(f"  syntax ok (cut at stop): {syntax}/{n} = {syntax / n:.1%}; and is code: {code}/{n}")
            print(f"  indented body before the end: {indented}/{n} = {indented / n:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build RECIPE (with KEY=VALUE overrides) into --out")
    build_parser.add_argument("--out", type=Path, required=True)
    build_parser.add_argument("overrides", nargs="*")
    count_parser = commands.add_parser("count", help="how a run's completions end")
    count_parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.overrides)
    else:
        for run in args.runs:
            count(run)


if __name__ == "__main__":
    main()
