"""How a run's work is carried out: the `Executor` seam between the driver and the engines/sandboxes.

The driver (pipeline.execute) decides *what* is missing and writes every record; an executor decides *where*
generation and execution happen. `InlineExecutor` runs engines in this process and programs in one sandbox;
`evalpipe.cluster.RayExecutor` fans them out to Ray actors. Both stream: a sample goes to the sandbox as soon
as it is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from evalpipe.engines.base import Engine, GenerationRequest
from evalpipe.records import Generation
from evalpipe.sandbox.base import Job, JobResult, Sandbox

OnGeneration = Callable[[Generation], Job]
"""Called by the executor, in order, for every new generation: the driver records it and returns its job."""


class Executor(Protocol):
    """Generates the requested samples and executes them and the pending jobs."""

    def run(
        self, requests: Sequence[GenerationRequest], pending: Sequence[Job], on_generation: OnGeneration
    ) -> Iterator[tuple[Job, JobResult]]:
        """Yield every job's result (pending jobs and one per request), as they complete."""
        ...

    def sandbox_info(self) -> dict[str, Any]:
        """The sandbox's kind, limits and image: written into the manifest."""
        ...

    def engine_info(self) -> dict[str, dict[str, Any]]:
        """`model/backend` → the engine's `describe()`, once every engine is built: written into the manifest.
        An engine that cannot be built raises here, before the run directory exists."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """Engines in this process, one after another; programs in `sandbox`, overlapping with generation."""

    def __init__(self, engines: dict[tuple[str, str], Engine], sandbox: Sandbox) -> None:
        self._engines = engines
        self._sandbox = sandbox

    def run(
        self, requests: Sequence[GenerationRequest], pending: Sequence[Job], on_generation: OnGeneration
    ) -> Iterator[tuple[Job, JobResult]]:
        def jobs() -> Iterator[Job]:
            yield from pending
            by_engine: dict[tuple[str, str], list[GenerationRequest]] = {}
            for request in requests:
                by_engine.setdefault((request.key.model, request.key.backend), []).append(request)
            for pair, batch in by_engine.items():
                for generation in self._engines[pair].generate(batch):
                    yield on_generation(generation)

        return self._sandbox.run(jobs())

    def sandbox_info(self) -> dict[str, Any]:
        return self._sandbox.describe()

    def engine_info(self) -> dict[str, dict[str, Any]]:
        return {f"{model}/{backend}": engine.describe() for (model, backend), engine in self._engines.items()}

    def close(self) -> None:
        self._sandbox.close()
