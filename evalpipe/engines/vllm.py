"""The `vllm` engine: vLLM 0.33 in this process (`pip install 'evalpipe[vllm]'`, a CUDA GPU).

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

`engine_kwargs` and `sampling_kwargs` build plain dicts, so that tests check them without vLLM (and against
vLLM's own classes where it is installed). `structured_outputs_fields` is shared with the `openai` engine: the
OpenAI-compatible server reads the same fields from the request's `structured_outputs` object.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
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
from evalpipe.errors import RunFailed, UserError
from evalpipe.prompting import chat_messages, sample_seed
from evalpipe.records import FinishReason, Generation, RunConfig, SampleKey, Task
from evalpipe.suites import Suite

if TYPE_CHECKING:
    from evalpipe.constraints import Constraint

VLLM_BACKENDS = ("auto", "xgrammar", "guidance", "outlines")
"""evalpipe backends that are vLLM structured-output backends (`none` sends no constraint)."""

RESERVED_ENGINE_ARGS = {
    "model": "give the model with --model",
    "seed": "give the seed with --seed",
    "structured_outputs_config": "choose the backend with --backend",
    "disable_log_stats": "it must stay False: vLLM reports per-request timings only with statistics on",
}

DEFAULT_GPU_MEMORY = 0.9
"""GPU share of all of a run's vLLM engines together (one per (model, backend), all alive at once)."""

WARMUP_MAX_TOKENS = 8
DEFAULT_WARMUPS = 2
"""Untimed requests before the run (`--engine-arg warmup=N`): the first is the cold start, the last warm."""
WARMUP_PROMPT = "def add(a, b):\n"


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


def parse_engine_value(raw: str) -> Any:
    """An `--engine-arg KEY=VALUE` value: JSON where it parses (numbers, true/false, null), else text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def engine_args_of(config: RunConfig) -> dict[str, str]:
    """`RunConfig.engine_args` (`--engine-arg KEY=VALUE`), keys with `_` for `-`."""
    return {key.replace("-", "_"): value for key, value in config.engine_args.items()}


def engine_kwargs(
    config: RunConfig, model: str, backend: str, engine_args: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (with `structured_outputs_config` as a dict of its fields).

    The GPU share defaults to `DEFAULT_GPU_MEMORY` divided among the run's engines, because the pipeline
    builds every (model, backend) engine before any runs and each `LLM` claims its share at start-up.
    `engine_args` (strings, `--engine-arg KEY=VALUE`) override or add any other `LLM`/`EngineArgs` keyword.
    """
    n_engines = max(1, len(config.models) * len(config.backends))
    kwargs: dict[str, Any] = {
        "model": model,
        "seed": config.seed,
        "structured_outputs_config": {"backend": backend if backend in VLLM_BACKENDS else "auto"},
        "disable_log_stats": False,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": round(DEFAULT_GPU_MEMORY / n_engines, 3),
        "max_model_len": None,
        "dtype": "auto",
        "quantization": None,
        "enforce_eager": False,
        # Sampling settings are ours alone: vLLM's neutral defaults, not the model's generation_config.json.
        "generation_config": "vllm",
    }
    for key, raw in (engine_args or {}).items():
        name = key.replace("-", "_")
        if name in RESERVED_ENGINE_ARGS:
            raise UserError(f"--engine-arg {key}: {RESERVED_ENGINE_ARGS[name]}")
        kwargs[name] = parse_engine_value(raw)
    return kwargs


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
    tpot = decode / (n_output_tokens - 1) if decode is not None and n_output_tokens > 1 else None
    e2e = ttft + decode if ttft is not None and decode is not None else None
    return ttft, tpot, e2e


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------------------
# The engine


class VLLMEngine:
    """`vllm.LLM` in this process for one (model, backend); see the module docstring."""

    PLANS_FROM_CONFIG: ClassVar[bool] = True
    """Requests are `plan_requests(...)`: see `evalpipe.engines.base.plans_from_config`."""

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
        args = engine_args_of(config)
        try:
            self._warmups = int(args.pop("warmup", str(DEFAULT_WARMUPS)))
        except ValueError:
            raise UserError("--engine-arg warmup: expects a whole number of requests") from None
        self._kwargs = engine_kwargs(config, model, backend, args)
        self._vllm = _import_vllm()
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
            raise UserError(f"vLLM cannot start model {self._model!r}: {_first_line(error)}") from error

    def _warm_up(self) -> None:
        """Requests before timing: the first compiles the grammar and warms the kernels (reported as the cold
        start), the second shows the warm latency. A constraint vLLM rejects is a UserError here."""
        task = Task(id="warm-up", prompt=WARMUP_PROMPT, entry_point="add", test="")
        key = SampleKey(model=self._model, backend=self._backend, task_id=task.id, index=0)
        for number in range(self._warmups):
            name = "first" if number == 0 else "warm"
            request = GenerationRequest(key=key, task=task)
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
            "engine_kwargs": {k: v for k, v in self._kwargs.items() if k != "model"},
            "structured_output_field": None if self._fields is None else next(iter(self._fields)),
            "cold_start": dict(self._cold),
            "versions": {name: _version(name) for name in ("vllm", "torch", "llguidance", "xgrammar")},
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
            raise RunFailed(f"vLLM rejected a request: {_first_line(error)}") from error
        pending = {
            str(request_id): (request, param)
            for request_id, request, param in zip(ids, requests, params, strict=True)
        }
        engine = llm.llm_engine
        while pending and engine.has_unfinished_requests():
            for output in engine.step():
                if not getattr(output, "finished", False) or str(output.request_id) not in pending:
                    continue
                request, param = pending.pop(str(output.request_id))
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

    def __init__(self, llm: Any, sampling_params: Any, so_params: Any, so_config: Any) -> None:
        self.LLM = llm
        self.SamplingParams = sampling_params
        self.StructuredOutputsParams = so_params
        self.StructuredOutputsConfig = so_config


def _import_vllm() -> _VLLM:
    try:
        from vllm import LLM, SamplingParams
        from vllm.config import StructuredOutputsConfig
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as error:
        raise UserError(
            f"engine 'vllm' needs vLLM 0.33 and a CUDA GPU: pip install 'evalpipe[vllm]' ({error})"
        ) from None
    return _VLLM(LLM, SamplingParams, StructuredOutputsParams, StructuredOutputsConfig)
