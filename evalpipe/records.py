"""The records that flow through evalpipe: tasks → generations → executions → scores.

Every record is a frozen pydantic model that forbids unknown fields, so a typo in a run directory or a
config file is an error, not a silently ignored value. One JSON object per record in the run directory.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
"""Version of the run-directory format; readers refuse versions they do not know (docs/run-directory.md)."""

ExecutionStatus = Literal[
    "passed", "failed", "timeout", "syntax_error", "exited_early", "oom", "sandbox_error"
]
FinishReason = Literal["stop", "length", "timeout", "error", "replayed"]
"""Why a completion ended, the same words for every engine and backend (`evalpipe.completion`): `stop` it
ended on its own (EOS or a stop sequence), `length` max tokens, `timeout` its deadline, `error` the engine
failed it, `replayed` a replay engine read it from a file."""


class Record(BaseModel):
    """Base of every record: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Task(Record):
    """One benchmark problem, as in HumanEval."""

    id: str
    """Task id, e.g. `HumanEval/0`."""
    prompt: str
    """Text the model continues: signature and docstring."""
    entry_point: str
    """Name of the function that `check` is called with."""
    test: str
    """Test code that defines `check(candidate)`."""
    canonical_solution: str | None = None
    """Reference completion, when the source has one."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Anything else the source had."""


class SampleKey(Record):
    """Identifies one sample: the n-th completion of a task by a (model, backend)."""

    model: str
    backend: str
    task_id: str
    index: int = Field(ge=0)

    def as_tuple(self) -> tuple[str, str, str, int]:
        return (self.model, self.backend, self.task_id, self.index)


class Generation(Record):
    """One completion and how it was produced."""

    key: SampleKey
    raw_text: str
    """What the engine returned, untouched."""
    text: str
    """The extracted completion that is appended to the prompt and executed."""
    finish_reason: FinishReason
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    n_reasoning_tokens: int | None = None
    """Of the output tokens, those of the reasoning block the reply opened with (`</think>` included); None
    where the reply had none or the engine cannot count them."""
    ttft_s: float | None = None
    """Time to first token."""
    tpot_s: float | None = None
    """Time per output token after the first."""
    e2e_s: float | None = None
    """End-to-end latency of the request."""
    grammar_compile_s: float | None = None
    grammar_cache_hit: bool | None = None
    mask_s_per_token: float | None = None
    """Mean time spent computing and applying the token mask per output token."""
    mask_unhidden_s_per_token: float | None = None
    """The part of `mask_s_per_token` that was not hidden behind the forward pass (it adds to TPOT)."""
    constraint_satisfied: bool | None = None
    """Whether the text satisfies the constraint, checked apart from the backend (None: no constraint)."""
    effective_backend: str
    """The structured-output backend actually used (differs from key.backend only for `auto`)."""
    error: str | None = None

    @field_validator("finish_reason", mode="before")
    @classmethod
    def _one_vocabulary(cls, value: object) -> object:
        # Runs written before finish reasons were one vocabulary said `grammar_end` where `stop` is meant.
        return "stop" if value == "grammar_end" else value


class Execution(Record):
    """The outcome of running one sample's program in a sandbox."""

    key: SampleKey
    program_sha256: str
    syntax_valid: bool
    """`ast.parse(prompt + completion)` succeeded."""
    status: ExecutionStatus
    passed: bool
    exit_code: int | None = None
    duration_s: float | None = None
    cpu_s: float | None = None
    attempts: int = 1
    """How often the sandbox ran it (timeouts are re-run alone; sandbox failures are retried once)."""
    note: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""


class LatencySummary(Record):
    """Distribution of one latency metric over the samples of a (model, backend)."""

    mean: float
    p50: float
    p90: float
    p99: float
    n: int


class Score(Record):
    """Results of one (model, backend) in a run; always recomputable from the JSONL files."""

    model: str
    backend: str
    n_tasks: int
    n_samples: int
    pass_at_k: dict[int, float]
    per_task: dict[str, tuple[int, int]]
    """task_id → (n samples, c correct): enough to recompute pass@k for any k ≤ n."""
    syntax_valid_rate: float
    constraint_satisfied_rate: float | None = None
    max_tokens_rate: float | None = None
    """Share of the samples that were cut at max tokens (finish_reason `length`); None for replayed ones."""
    n_ended: int | None = None
    """Samples that ended on their own (finish_reason `stop`): the rates below are over these."""
    syntax_valid_rate_ended: float | None = None
    """Syntax validity over the samples that ended on their own (None where none did)."""
    constraint_satisfied_rate_ended: float | None = None
    """Constraint satisfaction over the samples that ended on their own (None where none did)."""
    status_counts: dict[str, int]
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    latency: dict[str, LatencySummary] = Field(default_factory=dict)
    """ttft_s, tpot_s, e2e_s, tokens_per_s → distribution."""
    grammar_compile_s: float | None = None


class SandboxLimits(Record):
    """Limits every program runs under; they change results, so they are part of the run's identity."""

    cpu_time_s: float = Field(default=5.0, gt=0)
    wall_time_s: float = Field(default=30.0, gt=0)
    memory_mb: int = Field(default=1024, gt=0)
    file_size_mb: int = Field(default=16, gt=0)
    max_processes: int = Field(default=64, gt=0)
    output_bytes: int = Field(default=4096, gt=0)


class RunConfig(Record):
    """Everything that changes a run's results. Hashed into the run's identity."""

    suite: str
    engine: str
    models: tuple[str, ...]
    backends: tuple[str, ...]
    n_samples: int = Field(default=1, ge=1)
    ks: tuple[int, ...] = ()
    """pass@k to report; empty means 1, 10, 100 where each k ≤ the smallest per-task sample count."""
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1)
    seed: int = 0
    limit: int | None = Field(default=None, ge=1)
    """Use only the first `limit` tasks."""
    samples_path: str | None = None
    samples_sha256: str | None = None
    allow_partial: bool = False
    """Score a samples file that covers only some of the suite's tasks (`--allow-partial`)."""
    sandbox: str = "docker"
    limits: SandboxLimits = SandboxLimits()
    engine_args: dict[str, str] = Field(default_factory=dict)
    """Engine options (`--engine-arg KEY=VALUE`): vLLM's engine arguments, the openai engine's options."""
    base_url: str | None = None
    """The `openai` engine's server (`--base-url`); where it listens does not change results, so it is not
    part of the identity and a resume may point elsewhere."""

    def identity(self, dataset_sha256: str, fingerprints: dict[str, str] | None = None) -> str:
        """Hash of everything that changes the run's samples: the config, the dataset and the fingerprints of
        the suite file, constraint files and models (`evalpipe.fingerprint`). Options that only say where
        things are or what to report (`samples_path`, `base_url`, `ks`) are left out, and of the engine args
        only those the engine's options say change results are hashed. A run can only be resumed under the
        same identity."""
        from evalpipe.engines.options import identity_engine_args

        config = self.model_dump(mode="json", exclude=set(TRANSPORT_FIELDS))
        config["engine_args"] = identity_engine_args(self.engine, self.engine_args)
        payload = json.dumps(
            {"config": config, "dataset": dataset_sha256, "fingerprints": fingerprints or {}}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()


TRANSPORT_FIELDS = frozenset({"samples_path", "base_url", "ks"})
"""RunConfig fields that do not change a run's samples: not part of its identity, may change on resume."""


class ClusterConfig(Record):
    """How a run is spread over machines; not part of its identity, may change on resume."""

    runs_dir: str = "runs"
    executor: Literal["inline", "ray"] = "inline"
    """`inline`: engines in the driver process; `ray`: generation replicas and sandbox workers as actors."""
    workers: int | None = Field(default=None, ge=1)
    """Sandbox concurrency; defaults to the number of usable cores."""
    replicas: int = Field(default=1, ge=1)
    ray_address: str | None = None


class Progress(Record):
    """How far each stage has got."""

    expected: int
    generated: int
    executed: int


class Manifest(Record):
    """What a run is and where it stands. `schema_version` comes first in the file."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    identity: str
    status: Literal["running", "completed", "failed", "interrupted"]
    evalpipe_version: str
    git_sha: str | None
    created_at: str
    updated_at: str
    suite: str
    dataset_sha256: str
    grammar_sha256: dict[str, str] = Field(default_factory=dict)
    fingerprints: dict[str, str] = Field(default_factory=dict)
    """What else the identity covers: suite file, constraint files and models (`evalpipe.fingerprint`)."""
    package_versions: dict[str, str | None]
    hardware: dict[str, Any]
    sandbox: dict[str, Any]
    """Kind, limits, image id where there is one."""
    engine: dict[str, Any] = Field(default_factory=dict)
    effective_backends: dict[str, list[str]] = Field(default_factory=dict)
    progress: Progress
    cluster: ClusterConfig
    command: list[str] = Field(default_factory=list)
    error: str | None = None
