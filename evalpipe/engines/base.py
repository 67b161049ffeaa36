"""The Engine seam: generation requests in, Generation records out.

An engine serves one (model, backend) pair, because structured-output backends are engine-level settings in
vLLM. Heavy imports (torch, vllm, transformers) happen only inside the engine modules that need them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from evalpipe.records import Generation, Record, RunConfig, SampleKey, Task
from evalpipe.suites import Suite


class GenerationRequest(Record):
    """Ask for one sample: the `key.index`-th completion of `task`."""

    key: SampleKey
    task: Task


class Engine(Protocol):
    """Produces completions for one (model, backend)."""

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        """The samples this engine will produce for these tasks (known before anything runs)."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        """Yield one Generation per request, in any order, as they finish."""
        ...

    def describe(self) -> dict[str, Any]:
        """engine, model, backend, versions, device: written into the manifest."""
        ...

    def close(self) -> None:
        """Release the model and any servers or processes."""
        ...


class EngineFactory(Protocol):
    """What the registry holds for an engine name: a class or function building the engine."""

    def __call__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> Engine: ...


def plans_from_config(factory: object) -> bool:
    """Whether an engine's requests follow from the config alone (`plan_requests`): such an engine declares
    `PLANS_FROM_CONFIG = True`. Under Ray the driver then plans without building it, and only replicas
    build it: a model is loaded once, and a GPU engine never holds the driver's GPU besides its replica's."""
    return bool(getattr(factory, "PLANS_FROM_CONFIG", False))


def plan_requests(
    config: RunConfig, tasks: Sequence[Task], model: str, backend: str
) -> list[GenerationRequest]:
    """`n_samples` requests per task, for engines that generate (replay engines plan their own)."""
    return [
        GenerationRequest(key=SampleKey(model=model, backend=backend, task_id=task.id, index=i), task=task)
        for task in tasks
        for i in range(config.n_samples)
    ]
