"""The `scripted` engine: canonical solutions, replayed with a scripted delay and scripted deaths.

For tests and benchmarks of the fan-out (`--executor ray`), where a real model would only add noise and
minutes. It plans `n_samples` requests per task like a generating engine, and every sample is the task's
canonical solution, so a correct harness scores pass@1 = 1.0.

It accepts every backend name but constrains nothing: `effective_backend` is always "none", and
`describe()` says so. Samples keep the requested backend in their key, so a (model × backend) matrix still
produces one set of samples per pair.

Configuration, read from the environment when the engine is built (inside the Ray actor for
`--executor ray`; the Ray executor forwards every `EVALPIPE_*` variable of the driver to its actors):

- `EVALPIPE_SCRIPTED_DELAY_S` (float, default 0): wall time of each request. Requests of one `generate`
  call run one after another, like a sequential engine, on a fixed schedule (request k ends at call start +
  (k+1) x delay), so that late wake-ups on a loaded host do not add up over a run.
- `EVALPIPE_SCRIPTED_TTFT_S` (float, default a quarter of the delay): when, within a request, the first
  token counts as produced. The recorded `ttft_s`, `tpot_s` and `e2e_s` are measured around the sleeps,
  not copied from the settings; "tokens" are the completion's words and punctuation marks
  (`n_output_tokens`), since there is no tokenizer.
- `EVALPIPE_SCRIPTED_DIE_AFTER` (int, unset: never): the process exits (`os._exit(17)`, no clean-up, like a
  crashed GPU worker) when it is about to start a request after producing this many samples. Each engine
  counts its own samples, so `0` dies on the first request.
- `EVALPIPE_SCRIPTED_DIE_MARKER` (path, optional): die only if this file can be created (atomically, with
  O_EXCL), so only one engine ever dies for it and a restarted replica runs on. Without it, every engine
  dies each time (an engine that keeps dying).

- `EVALPIPE_SCRIPTED_CALLS` (path, optional): each `generate` call appends one line `backend start end`
  (wall-clock seconds) when it ends, so that tests can see when arms computed.

Do not use `EVALPIPE_SCRIPTED_DIE_AFTER` with the inline executor: the engine then lives in, and kills, the
driver.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from evalpipe.engines.base import GenerationRequest, plan_requests
from evalpipe.errors import UserError
from evalpipe.records import Generation, RunConfig, Task
from evalpipe.registry import check_backend
from evalpipe.suites import Suite

DIE_EXIT_CODE = 17
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise UserError(f"{name} must not be negative, got {raw!r}")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise UserError(f"{name} must not be negative, got {raw!r}")
    return value


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


def count_tokens(text: str) -> int:
    """The scripted engine's notion of a token: a word or a punctuation mark."""
    return len(_TOKEN.findall(text))


class ScriptedEngine:
    """Replays canonical solutions with scripted timing and failures (see the module docstring)."""

    PLANS_FROM_CONFIG: ClassVar[bool] = True
    """Requests are `plan_requests(...)`: see `evalpipe.engines.base.plans_from_config`."""

    def __init__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> None:
        self._config = config
        self._model = model
        self._backend = check_backend(backend)
        self.delay_s = _env_float("EVALPIPE_SCRIPTED_DELAY_S", 0.0)
        self.ttft_s = min(_env_float("EVALPIPE_SCRIPTED_TTFT_S", self.delay_s / 4), self.delay_s)
        self.die_after = _env_int("EVALPIPE_SCRIPTED_DIE_AFTER")
        self.die_marker = os.environ.get("EVALPIPE_SCRIPTED_DIE_MARKER") or None
        self.produced = 0

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        missing = [task.id for task in tasks if task.canonical_solution is None]
        if missing:
            raise UserError(f"the scripted engine needs canonical solutions; {missing[0]} has none")
        return plan_requests(self._config, tasks, self._model, self._backend)

    def _maybe_die(self) -> None:
        if self.die_after is None or self.produced < self.die_after:
            return
        if self.die_marker is not None:
            try:
                os.close(os.open(self.die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return  # someone already died for this marker: run on
        os._exit(DIE_EXIT_CODE)

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        # Request k of a call is due at call start + (k+1) x delay: a sleep that wakes late on a loaded host
        # shortens the next request instead of adding up, like an engine whose speed the host does not set.
        # The first token still comes at least `ttft_s` after a request starts.
        due = time.perf_counter()
        called = time.time()
        for request in requests:
            self._maybe_die()
            text = request.task.canonical_solution or ""
            start = time.perf_counter()
            _sleep_until(start + self.ttft_s)
            first = time.perf_counter()
            due = max(due + self.delay_s, first)
            _sleep_until(due)
            end = time.perf_counter()
            tokens = count_tokens(text)
            self.produced += 1
            yield Generation(
                key=request.key,
                raw_text=text,
                text=text,
                finish_reason="stop",
                n_prompt_tokens=count_tokens(request.task.prompt),
                n_output_tokens=tokens,
                ttft_s=first - start,
                tpot_s=(end - first) / (tokens - 1) if tokens > 1 else None,
                e2e_s=end - start,
                effective_backend="none",
            )
        calls = os.environ.get("EVALPIPE_SCRIPTED_CALLS")
        if calls:
            with Path(calls).open("a") as log:  # one short line per call: appends do not interleave
                log.write(f"{self._backend} {called:.6f} {time.time():.6f}\n")

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "scripted",
            "model": self._model,
            "backend": self._backend,
            "effective_backend": "none (it replays canonical solutions and constrains nothing)",
            "delay_s": self.delay_s,
            "ttft_s": self.ttft_s,
            "device": "cpu",
        }

    def close(self) -> None:
        pass
