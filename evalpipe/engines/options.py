"""The engine contract's options half: each engine declares a typed options model, and
`--engine-arg KEY=VALUE` is validated against it before anything loads.

An engine class (the registry's factory) names its model in `OPTIONS`; `engine_options(config)` finds it and
validates `RunConfig.engine_args` (keys with `-` read as `_`). Unknown keys and bad values are one
`UserError` line naming the keys the engine takes. A factory that declares no `OPTIONS` takes none.

Only options that change results enter the run's identity: each model says which of its keys do not
(`NOT_RESULT_CHANGING`: where a model runs, how many requests go at once, warm-up and deadlines), and
`identity_engine_args` keeps the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evalpipe.errors import UserError


def normalized(args: Mapping[str, str]) -> dict[str, str]:
    """`--engine-arg` keys with `_` for `-` (vLLM's own flags are spelt with dashes)."""
    return {key.strip().replace("-", "_"): value for key, value in args.items()}


def parse_value(raw: str) -> Any:
    """An `--engine-arg` value for a field whose type we do not know: JSON where it parses, else text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class EngineOptions(BaseModel):
    """Base of every engine's options: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    NOT_RESULT_CHANGING: ClassVar[frozenset[str]] = frozenset()
    """Keys that do not change what the engine generates; every other key is part of the run's identity."""

    @classmethod
    def result_changing(cls, key: str) -> bool:
        """Whether `key` can change the generated text (and so belongs in the run's identity)."""
        return key.replace("-", "_") not in cls.NOT_RESULT_CHANGING

    @classmethod
    def known_keys(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def parse(cls, engine: str, args: Mapping[str, str]) -> Self:
        """Validate `--engine-arg` strings (pydantic's lax mode reads "8", "true", "0.5" as numbers and
        booleans); one UserError line naming the valid keys on any problem."""
        try:
            return cls.model_validate(normalized(args))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "?"
            message = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
            raise UserError(f"--engine-arg {where}: {message} ({cls.takes(engine)})") from None

    @classmethod
    def takes(cls, engine: str) -> str:
        keys = cls.known_keys()
        return f"engine {engine!r} takes: {', '.join(keys)}" if keys else f"engine {engine!r} takes none"


class NoOptions(EngineOptions):
    """An engine without options: any `--engine-arg` is refused."""


# -- the built-in engines' options ---------------------------------------------------------------------------


class HFOptions(EngineOptions):
    """The `hf` engine's options."""

    NOT_RESULT_CHANGING: ClassVar[frozenset[str]] = frozenset({"batch_size", "num_gpus"})

    device: str | None = None
    """`cpu`, `cuda`, `cuda:1`, ...; default: cuda where torch sees a GPU, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations; `auto`: float32 on CPU, the checkpoint's dtype on a GPU."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences decoded together (greedy output does not depend on it)."""
    num_gpus: float | None = Field(default=None, gt=0)
    """GPUs one Ray replica reserves (a fraction lets replicas share a device); default 1 on a GPU cluster."""


class VLLMOptions(EngineOptions):
    """The `vllm` engine's options: evalpipe's own (`warmup`, `num_gpus`), then any of vLLM's `EngineArgs`.

    The common engine arguments are typed here; any other key must be a field of vLLM's own `EngineArgs`
    where vLLM is importable (`check_against_vllm`), and is passed through as JSON-or-text.
    """

    model_config = ConfigDict(frozen=True, extra="allow", use_attribute_docstrings=True)

    NOT_RESULT_CHANGING: ClassVar[frozenset[str]] = frozenset(
        {"warmup", "num_gpus", "gpu_memory_utilization", "swap_space", "kv_cache_memory_bytes"}
    )
    RESERVED: ClassVar[dict[str, str]] = {
        "model": "give the model with --model",
        "seed": "give the seed with --seed",
        "structured_outputs_config": "choose the backend with --backend",
        "disable_log_stats": "it must stay False: vLLM reports per-request timings only with statistics on",
    }

    warmup: int = Field(default=2, ge=0)
    """Untimed requests before the run: the first is the cold start (grammar compile), the last warm."""
    num_gpus: float | None = Field(default=None, gt=0)
    """GPUs one Ray replica reserves; default tensor_parallel_size (a fraction lets replicas share one)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "half", "float"] = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """GPU share of all of the run's vLLM engines; default 0.9 divided among them."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    quantization: str | None = None

    @classmethod
    def parse(cls, engine: str, args: Mapping[str, str]) -> Self:
        keys = normalized(args)
        for key in keys:
            if key in cls.RESERVED:
                raise UserError(f"--engine-arg {key}: {cls.RESERVED[key]}")
        typed = {key: value for key, value in keys.items() if key in cls.model_fields}
        extra = {key: value for key, value in keys.items() if key not in cls.model_fields}
        unknown = check_against_vllm(list(extra))
        if unknown:
            raise UserError(
                f"--engine-arg {unknown[0]}: not an option of engine {engine!r} nor one of vLLM's "
                f"EngineArgs (evalpipe's: {', '.join(cls.known_keys())}; vLLM's: python -m "
                "vllm.entrypoints.openai.api_server --help)"
            )
        options = super().parse(engine, typed)
        if not extra:
            return options
        return cls.model_validate(
            {**options.model_dump(exclude_unset=True), **{k: parse_value(v) for k, v in extra.items()}}
        )

    def vllm_engine_args(self) -> dict[str, Any]:
        """What goes to `vllm.LLM` (evalpipe's own keys and unset defaults left out where vLLM decides)."""
        values = self.model_dump()
        values.pop("warmup")
        values.pop("num_gpus")
        return values


def vllm_engine_arg_names() -> frozenset[str] | None:
    """The fields of vLLM's `EngineArgs`, or None where vLLM is not importable."""
    try:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return None
    return frozenset(field.name for field in dataclasses.fields(EngineArgs))


def check_against_vllm(keys: list[str]) -> list[str]:
    """The keys that are not vLLM `EngineArgs` fields; none where vLLM cannot be imported (a Ray driver
    without vLLM: the replicas' vLLM rejects them when it starts)."""
    known = vllm_engine_arg_names() if keys else None
    if known is None:
        return []
    return [key for key in keys if key not in known]


class OpenAIOptions(EngineOptions):
    """The `openai` engine's options (the server's URL is `--base-url`, not an option: it does not change
    results and a resumed run may find the server elsewhere)."""

    NOT_RESULT_CHANGING: ClassVar[frozenset[str]] = frozenset(
        {"concurrency", "timeout_s", "connect_timeout_s", "retries", "backoff_s", "warmup", "wait_s"}
    )

    api: Literal["auto", "completions", "chat"] = "auto"
    """`auto`: /v1/chat/completions for `prompt.format = "chat"` suites, else /v1/completions."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once."""
    timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of one request (each attempt): cut there, recorded as finish_reason "timeout"."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=3, ge=0)
    """Further attempts after a transport error."""
    backoff_s: float = Field(default=0.5, ge=0)
    """Wait before the first retry; doubles on each further one."""
    warmup: int = Field(default=2, ge=0)
    """Untimed requests before the run: the first is reported as the cold start, the last as warm."""
    wait_s: float = Field(default=0.0, ge=0)
    """How long to wait for a server that is still starting (connection refused or HTTP 503 on /health)."""
    constraint_field: Literal["structured_outputs", "response_format"] = "structured_outputs"
    """Request field that carries the constraint; `response_format` takes JSON schemas only."""


# -- lookup ------------------------------------------------------------------------------------------------


def options_model(factory: object) -> type[EngineOptions]:
    """The options model an engine factory declares (`OPTIONS`), else `NoOptions`."""
    declared = getattr(factory, "OPTIONS", None)
    if isinstance(declared, type) and issubclass(declared, EngineOptions):
        return declared
    return NoOptions


def engine_options(engine: str, args: Mapping[str, str]) -> EngineOptions:
    """Validate `args` against the registered engine's options (imports the engine's module)."""
    from evalpipe.registry import load

    return options_model(load("engine", engine)).parse(engine, args)


def identity_engine_args(engine: str, args: Mapping[str, str]) -> dict[str, str]:
    """The engine args that change results: what the run's identity hashes. An engine that cannot be
    imported here keeps them all (the safe side: two runs are never taken for one)."""
    if not args:
        return {}
    try:
        from evalpipe.registry import load

        model = options_model(load("engine", engine))
    except UserError:
        return dict(args)
    return {key: value for key, value in args.items() if model.result_changing(key)}
