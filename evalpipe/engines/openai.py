"""The `openai` engine: any OpenAI-compatible server over HTTP (vLLM 0.33's `vllm serve`, `evalpipe serve`).

Where the server is: `RunConfig.base_url` (`--base-url`), else `$EVALPIPE_BASE_URL`. Either is a URL
(`http://host:8000` or `http://host:8000/v1`) or, because a vLLM server serves one structured-output
backend, a list `guidance=URL,xgrammar=URL,...`: one server per backend. The URL is not part of the run's
identity: a resumed run may find the same server elsewhere. The API key comes from `$EVALPIPE_API_KEY` or
`$OPENAI_API_KEY` and goes only into the Authorization header: never into describe(), errors or the run
directory.

Engine options (`RunConfig.engine_args`, `--engine-arg KEY=VALUE`; see `OpenAIOptions`): concurrency, the
per-request deadline, retries, warm-up requests, the endpoint, the request field that carries the constraint.

How a run goes:

1. At construction (so that `prepare` fails before a run directory exists): `GET /health`, then
   `GET /v1/models` (a rejected API key or an unknown model is one UserError line), `GET /version` and, where
   the server has it, `GET /server_info?config_format=json` (vLLM's dev-mode endpoint, also served by
   `evalpipe serve`) for the server's structured-output backend. A server that reports another backend than
   the one asked for is a UserError; `auto` records what the server reports, else "auto".
2. Warm-up requests, with the constraint, before anything is timed: the first is the cold start (grammar
   compile, kernels), reported apart in describe(); a request the server rejects is a UserError here.
3. Every sample is one streamed request (SSE): TTFT is measured here, from sending the request to the first
   chunk with text; usage (`stream_options.include_usage`) gives token counts. `concurrency` requests run
   at once.
4. A request that outlives its deadline is cut: `finish_reason="timeout"` with the text so far, and the run
   goes on. Transport errors (connection refused or reset, a stream cut short) are retried with exponential
   backoff, and nothing else is: an HTTP 4xx about the request is that sample's `error`; 401/403/404/429/5xx
   mean the server cannot serve the run, which fails with one line and stays resumable (finished samples are
   kept).

The constraint goes where vLLM 0.33's server reads it: the request's `structured_outputs` object
(`entrypoints/openai/completion/protocol.py` and `chat_completion/protocol.py`, a `StructuredOutputsParams`
with `grammar` / `json` / `regex`), or, for JSON schemas, `response_format={"type": "json_schema", ...}`,
which vLLM turns into the same params (`entrypoints/generate/base/protocol.py`,
`structured_outputs_from_response_format`). Never the removed `guided_*` fields, which vLLM 0.33 ignores
with HTTP 200 and unconstrained output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast
from urllib.parse import urlsplit, urlunsplit

import httpx

from evalpipe.completion import REASONING, check_suite, complete, constraint_satisfied, stop_sequences
from evalpipe.engines.base import GenerationRequest, plan_requests
from evalpipe.engines.common import (
    WARMUP_MAX_TOKENS,
    check_outlines,
    package_versions,
    time_per_output_token,
    warmup_request,
)
from evalpipe.engines.options import OpenAIOptions
from evalpipe.engines.vllm import constraint_and_fields
from evalpipe.errors import EvalpipeError, RunFailed, UserError
from evalpipe.prompting import chat_messages, sample_seed
from evalpipe.records import FinishReason, Generation, RunConfig, Task
from evalpipe.registry import BACKENDS
from evalpipe.suites import Suite

if TYPE_CHECKING:
    from evalpipe.constraints import Constraint

ENV_BASE_URL = "EVALPIPE_BASE_URL"
ENV_API_KEYS = ("EVALPIPE_API_KEY", "OPENAI_API_KEY")

# Transport errors: the request may not have reached the server, or its answer was cut off. Retrying these is
# safe (generation has no side effects); an HTTP error status is an answer and is never retried.
RETRYABLE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException)


# ------------------------------------------------------------------------------------------------------------
# Configuration: URL, key, options


def base_url_spec(config: RunConfig) -> str | None:
    """`RunConfig.base_url` where the config has it, else `$EVALPIPE_BASE_URL`."""
    configured = config.base_url
    return str(configured) if configured else os.environ.get(ENV_BASE_URL) or None


def resolve_base_url(spec: str | None, backend: str) -> str:
    """The server root (no trailing `/v1`) for `backend` from a URL or a `backend=URL,...` list."""
    if not spec:
        raise UserError(f"engine 'openai' needs the server's URL: --base-url URL or ${ENV_BASE_URL}")
    chosen: str | None = None
    shared: str | None = None
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if sep and "://" not in name:
            if name not in BACKENDS:
                raise UserError(f"base URL list: unknown backend {name!r} in {safe_url_list(item)!r}")
            if name == backend:
                chosen = value.strip()
        else:
            shared = item
    url = chosen or shared
    if not url:
        raise UserError(f"base URL list {safe_url_list(spec)!r} has no server for backend {backend!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"base URL {safe_url(url)!r} is not an http(s) URL")
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")


def safe_url(url: str) -> str:
    """The URL without user info, query or fragment: what may be written down."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def safe_url_list(spec: str) -> str:
    return ",".join(
        f"{name}={safe_url(url)}" if sep and "://" not in name else safe_url(item)
        for item in spec.split(",")
        if item.strip()
        for name, sep, url in [item.strip().partition("=")]
    )


def api_key() -> str | None:
    """The first of `$EVALPIPE_API_KEY`, `$OPENAI_API_KEY` that is set and not empty."""
    for name in ENV_API_KEYS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def parse_options(engine_args: Mapping[str, str]) -> OpenAIOptions:
    return OpenAIOptions.parse("openai", engine_args)


# ------------------------------------------------------------------------------------------------------------
# Requests


def request_body(
    *,
    api: Literal["completions", "chat"],
    model: str,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: Sequence[str] = (),
    structured_outputs: Mapping[str, Any] | None = None,
    constraint_field: str = "structured_outputs",
) -> dict[str, Any]:
    """The JSON body of one streamed request, as vLLM 0.33's `CompletionRequest` / `ChatCompletionRequest`
    read it."""
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        body["messages"] = messages
        body["max_completion_tokens"] = max_tokens  # `max_tokens` is deprecated for chat in vLLM and OpenAI
    else:
        body["prompt"] = prompt
        body["max_tokens"] = max_tokens
    body.update(
        temperature=temperature,
        top_p=top_p,
        stream=True,
        stream_options={"include_usage": True},
    )
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
        # vLLM's extension: the output shows where it ended (see evalpipe.completion).
        body["include_stop_str_in_output"] = True
    if structured_outputs:
        if constraint_field == "response_format":
            if set(structured_outputs) != {"json"}:
                raise UserError("--engine-arg constraint_field=response_format carries JSON schemas only")
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "evalpipe", "schema": structured_outputs["json"], "strict": True},
            }
        else:
            body["structured_outputs"] = dict(structured_outputs)
    return body


def error_message(response: httpx.Response) -> str:
    """The server's error text on one line: vLLM's `{"error": {"message": ...}}`, its 401
    `{"error": "Unauthorized"}`, FastAPI's `{"detail": ...}`, or the start of the body."""
    return " ".join(_error_text(response).split())


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:300]
    return str(data)[:300]


@dataclass
class _Stream:
    """What one streamed response has given so far (mutable working state of one attempt)."""

    started: float
    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    """Chat deltas' reasoning (a vLLM server with a reasoning parser sends it apart from the content)."""
    first: float | None = None
    end: float | None = None
    finish: str | None = None
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0


FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}
"""Server finish reasons that evalpipe keeps; anything else (vLLM: abort, error, repetition) is an error."""


# ------------------------------------------------------------------------------------------------------------
# The engine


class OpenAIEngine:
    """Generation through an OpenAI-compatible server; see the module docstring."""

    PLANS_FROM_CONFIG: ClassVar[bool] = True
    """Requests are `plan_requests(...)`: see `evalpipe.engines.base.plans_from_config`."""
    OPTIONS: ClassVar[type[OpenAIOptions]] = OpenAIOptions

    @staticmethod
    def preflight(config: RunConfig, suite: Suite, joins_cluster: bool) -> None:
        """Before anything starts: the backends the suite's constraint allows."""
        check_outlines("openai", suite, config.backends)

    def __init__(self, config: RunConfig, suite: Suite, model: str, backend: str) -> None:
        if suite.prompt.format not in ("raw", "chat"):
            raise UserError(f"suite prompt format {suite.prompt.format!r} is not raw or chat")
        self._config, self._suite, self._model, self._backend = config, suite, model, backend
        check_suite(suite)
        self._options = parse_options(config.engine_args)
        self._api: Literal["completions", "chat"] = (
            self._options.api
            if self._options.api != "auto"
            else ("chat" if suite.prompt.format == "chat" else "completions")
        )
        self._constraint, self._fields = constraint_and_fields(suite, backend)
        response_format = self._options.constraint_field == "response_format"
        if self._fields is not None and response_format and set(self._fields) != {"json"}:
            raise UserError("--engine-arg constraint_field=response_format carries JSON schemas only")
        self._stops = stop_sequences(suite)  # in every arm: see evalpipe.completion
        self._root = resolve_base_url(base_url_spec(config), backend)
        self._key = api_key()
        self._server: dict[str, Any] = {}
        self._effective = "none" if self._fields is None else backend
        self._cold: dict[str, Any] = {}
        self._check_server()
        if self._options.warmup:
            self._warm_up()

    # -- set-up --------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _where(self) -> str:
        return f"the server at {safe_url(self._root)}"

    def _check_server(self) -> None:
        timeout = httpx.Timeout(
            self._options.connect_timeout_s, read=max(30.0, self._options.connect_timeout_s)
        )
        started = time.perf_counter()
        with httpx.Client(base_url=self._root, headers=self._headers(), timeout=timeout) as client:
            self._wait_healthy(client)
            self._server["health_s"] = round(time.perf_counter() - started, 3)
            self._check_models(client)
            self._server["version"] = self._optional_json(client, "/version", lambda d: d.get("version"))
            reported = self._optional_json(
                client,
                "/server_info",
                lambda d: d["vllm_config"]["structured_outputs_config"]["backend"],
                params={"config_format": "json"},
            )
        self._server["structured_outputs_backend"] = reported
        self._server["backend_verified"] = reported is not None
        if self._fields is None or reported is None:
            return
        if self._backend == "auto":
            self._effective = str(reported)
        elif reported != self._backend:
            raise UserError(
                f"{self._where()} runs structured-output backend {reported!r}, not {self._backend!r}: vLLM "
                f"serves one backend per server (vllm serve ... --structured-outputs-config.backend "
                f"{self._backend}); give one URL per backend: --base-url {self._backend}=URL,..."
            )

    def _wait_healthy(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + self._options.wait_s
        while True:
            try:
                response = client.get("/health")
            except httpx.TransportError as error:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise UserError(
                    f"cannot reach {self._where()} ({type(error).__name__}: {error}); start it "
                    "(vllm serve MODEL, or evalpipe serve MODEL) or give another --base-url"
                ) from None
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            # Servers without /health (404) are judged by /v1/models instead.
            if response.status_code >= 500:
                raise UserError(f"{self._where()} is not healthy: HTTP {response.status_code} on /health")
            return

    def _check_models(self, client: httpx.Client) -> None:
        try:
            response = client.get("/v1/models")
        except httpx.TransportError as error:
            raise UserError(f"cannot reach {self._where()}: {type(error).__name__}: {error}") from None
        if response.status_code in (401, 403):
            raise UserError(self._key_message(response.status_code))
        if response.status_code != 200:
            raise UserError(
                f"{self._where()} answers GET /v1/models with HTTP {response.status_code}: "
                f"{error_message(response)}"
            )
        try:
            served = [str(card["id"]) for card in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{self._where()} is not an OpenAI-compatible server (bad /v1/models)") from None
        self._server["models"] = served
        if self._model not in served:
            raise UserError(
                f"{self._where()} does not serve model {self._model!r}; it serves: "
                f"{', '.join(served) or '-'} (give --model the served name: vllm serve --served-model-name)"
            )

    def _key_message(self, status: int) -> str:
        if self._key is None:
            return (
                f"{self._where()} wants an API key (HTTP {status}); "
                f"set {ENV_API_KEYS[0]} or {ENV_API_KEYS[1]}"
            )
        return (
            f"{self._where()} rejected the API key (HTTP {status}); set {ENV_API_KEYS[0]} or "
            f"{ENV_API_KEYS[1]} to the key it was started with (--api-key)"
        )

    def _optional_json(
        self,
        client: httpx.Client,
        path: str,
        pick: Callable[[dict[str, Any]], Any],
        params: dict[str, str] | None = None,
    ) -> Any:
        """A value from an endpoint that not every server has; None where it is missing or lacks the value."""
        try:
            response = client.get(path, params=params)
            if response.status_code != 200:
                return None
            return pick(response.json())
        except (httpx.TransportError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _warm_up(self) -> None:
        requests = [warmup_request(self._model, self._backend)] * self._options.warmup
        try:
            done = self._run_loop(self._sequential(requests))
        except RunFailed as error:
            raise UserError(f"warm-up failed: {error}") from None
        for name, generation in (("first", done[0]), ("warm", done[-1])):
            if generation.error is not None and generation.finish_reason == "error":
                hint = ""
                if self._stops and "stop" in generation.error.lower():
                    # vLLM's server takes at most $VLLM_MAX_STOP_STRINGS (default 4) stop sequences.
                    hint = (
                        f" (the suite sends {len(self._stops)} stop sequences, every arm the same; a vLLM "
                        f"server takes them when started with VLLM_MAX_STOP_STRINGS={len(self._stops)}+)"
                    )
                raise UserError(f"{self._where()} rejects the warm-up request: {generation.error}{hint}")
            if generation.finish_reason == "timeout":
                raise UserError(
                    f"the warm-up request to {self._where()} did not finish within --engine-arg "
                    f"timeout_s={self._options.timeout_s:g}"
                )
            self._cold[f"{name}_ttft_s"] = generation.ttft_s
            self._cold[f"{name}_e2e_s"] = generation.e2e_s

    # -- Engine protocol -----------------------------------------------------------------------------------

    def plan(self, tasks: Sequence[Task]) -> list[GenerationRequest]:
        return plan_requests(self._config, tasks, self._model, self._backend)

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[Generation]:
        """Yield each sample as its request finishes; raises RunFailed when the server cannot go on."""
        if not requests:
            return
        out: queue.Queue[Generation | BaseException | None] = queue.Queue()
        loop = asyncio.new_event_loop()
        main = loop.create_task(self._all(requests, out.put))

        def drive() -> None:
            try:
                loop.run_until_complete(main)
            except BaseExceptionGroup as group:
                out.put(_first_error(group))
            except BaseException as error:
                out.put(error)
            finally:
                # Close async generators left open (a stream read up to `[DONE]`) before the loop goes.
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                out.put(None)

        thread = threading.Thread(target=drive, name="evalpipe-openai", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    raise item
                yield item
        finally:
            # The consumer stopped early (an error, Ctrl-C): cancel what is still in flight.
            if thread.is_alive():
                with contextlib.suppress(RuntimeError):  # the loop may have just finished
                    loop.call_soon_threadsafe(main.cancel)
                thread.join(timeout=10)

    def describe(self) -> dict[str, Any]:
        # Nothing secret: the URL without user info or query, and never the API key.
        return {
            "engine": "openai",
            "model": self._model,
            "backend": self._backend,
            "effective_backend": self._effective,
            "base_url": safe_url(self._root),
            "api": self._api,
            "api_key_set": self._key is not None,
            "structured_output_field": None
            if self._fields is None
            else (self._options.constraint_field, next(iter(self._fields))),
            "server": dict(self._server),
            "options": self._options.model_dump(),
            "cold_start": dict(self._cold),
            "versions": package_versions("httpx"),
        }

    def close(self) -> None:
        pass  # every generate() opens and closes its own connections

    # -- requests ------------------------------------------------------------------------------------------

    def _run_loop(self, coroutine: Any) -> Any:
        """Run a coroutine to its end on a fresh event loop (set-up and warm-up, outside any other loop)."""
        try:
            return asyncio.run(coroutine)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    def _client(self) -> httpx.AsyncClient:
        options = self._options
        return httpx.AsyncClient(
            base_url=self._root,
            headers=self._headers(),
            # No read timeout: the request's own deadline bounds it (a stalled stream must end as "timeout").
            timeout=httpx.Timeout(options.connect_timeout_s, read=None, pool=None),
            limits=httpx.Limits(
                max_connections=options.concurrency, max_keepalive_connections=options.concurrency
            ),
        )

    async def _sequential(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        async with self._client() as client:
            return [await self._request(client, r, max_tokens=WARMUP_MAX_TOKENS) for r in requests]

    async def _all(self, requests: Sequence[GenerationRequest], emit: Callable[[Generation], None]) -> None:
        slots = asyncio.Semaphore(self._options.concurrency)

        async def one(request: GenerationRequest) -> None:
            async with slots:
                emit(await self._request(client, request))

        async with self._client() as client, asyncio.TaskGroup() as group:
            # A RunFailed in one request cancels the others: the TaskGroup raises it when all have stopped.
            for request in requests:
                group.create_task(one(request))

    def _body(self, request: GenerationRequest, max_tokens: int | None) -> dict[str, Any]:
        config = self._config
        chat = self._api == "chat"
        return request_body(
            api=self._api,
            model=self._model,
            prompt=None if chat else request.task.prompt,
            messages=chat_messages(self._suite, request.task) if chat else None,
            max_tokens=config.max_tokens if max_tokens is None else max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=sample_seed(config.seed, request.key.task_id, request.key.index),
            stop=self._stops,
            structured_outputs=self._fields,
            constraint_field=self._options.constraint_field,
        )

    async def _request(
        self, client: httpx.AsyncClient, request: GenerationRequest, max_tokens: int | None = None
    ) -> Generation:
        """One sample: stream it, retrying transport errors; the deadline cuts each attempt."""
        body = self._body(request, max_tokens)
        path = "/v1/chat/completions" if self._api == "chat" else "/v1/completions"
        options = self._options
        attempt = 0
        while True:
            attempt += 1
            state = _Stream(started=time.perf_counter())
            try:
                async with asyncio.timeout(options.timeout_s):
                    await self._stream(client, path, body, state)
            except TimeoutError:
                state.end = time.perf_counter()
                state.finish = "timeout"
                state.error = f"cut at the request deadline of {options.timeout_s:g} s"
            except RETRYABLE as error:
                if attempt > options.retries:
                    raise RunFailed(
                        f"{self._where()} went away ({type(error).__name__}: {error or 'no answer'}; "
                        f"{attempt} attempts); start it again and continue with `evalpipe resume RUN_DIR`"
                    ) from None
                await asyncio.sleep(options.backoff_s * 2 ** (attempt - 1))
                continue
            return self._generation(request, state)

    async def _stream(
        self, client: httpx.AsyncClient, path: str, body: dict[str, Any], state: _Stream
    ) -> None:
        """Send one request and read its SSE stream into `state` (vLLM's chunk shapes)."""
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                self._status_error(response, state)
                state.end = time.perf_counter()
                return
            async for line in response.aiter_lines():
                # SSE: `data: ...` lines; blank lines separate events, `:` lines are keep-alive comments.
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                self._chunk(data, state)
        state.end = time.perf_counter()
        if state.finish is None and state.error is None:
            state.error = "the stream ended without a finish reason"

    def _chunk(self, data: str, state: _Stream) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            state.error = f"the server sent malformed stream data: {data[:100]!r}"
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:  # vLLM reports errors after the stream started as a data event
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            state.error, state.finish = f"server error during the stream: {message}", "error"
            return
        state.chunks += 1
        for choice in chunk.get("choices") or []:
            chat = self._api == "chat"
            delta = choice.get("delta") or {}
            piece = delta.get("content") if chat else choice.get("text")
            # vLLM names the field `reasoning` (`reasoning_content` before 0.11)
            thought = (delta.get("reasoning") or delta.get("reasoning_content")) if chat else None
            if (piece or thought) and state.first is None:
                state.first = time.perf_counter()
            if thought:
                state.reasoning.append(str(thought))
            if piece:
                state.parts.append(str(piece))
            if choice.get("finish_reason"):
                state.finish = str(choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            state.usage = chunk["usage"]

    def _status_error(self, response: httpx.Response, state: _Stream) -> None:
        """An HTTP error status: the sample's own error for a bad request, else the run cannot go on."""
        status, message = response.status_code, error_message(response)
        if status in (401, 403):
            raise RunFailed(self._key_message(status))
        if status in (404, 429) or status >= 500:
            raise RunFailed(
                f"{self._where()} answered HTTP {status}: {message}; once it serves again, continue with "
                "`evalpipe resume RUN_DIR`"
            )
        state.finish, state.error = "error", f"HTTP {status}: {message}"

    def _generation(self, request: GenerationRequest, state: _Stream) -> Generation:
        raw = "".join(state.parts)
        if state.reasoning:
            # The reasoning stays in the raw text as the model wrote it; `complete` judges the answer.
            start, end = REASONING
            raw = start + "".join(state.reasoning) + end + raw
        ended = complete(self._suite, request.task, raw)
        reason: FinishReason = (
            "timeout" if state.finish == "timeout" else FINISH_REASONS.get(state.finish or "", "error")
        )
        error = state.error
        if reason == "error" and error is None:
            error = f"the server finished the request with {state.finish!r}"
        n_out = state.usage.get("completion_tokens")
        n_prompt = state.usage.get("prompt_tokens")
        n_reasoning = (state.usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        ttft = None if state.first is None else state.first - state.started
        e2e = None if state.end is None else state.end - state.started
        tpot = time_per_output_token(ttft, e2e, n_out if isinstance(n_out, int) else None)
        return Generation(
            key=request.key,
            raw_text=raw,
            text=ended.code,
            finish_reason=reason,
            n_prompt_tokens=n_prompt if isinstance(n_prompt, int) else None,
            n_output_tokens=n_out if isinstance(n_out, int) else None,
            n_reasoning_tokens=n_reasoning if isinstance(n_reasoning, int) and n_reasoning > 0 else None,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=e2e,
            constraint_satisfied=constraint_satisfied(cast("Constraint | None", self._constraint), ended),
            effective_backend=self._effective,
            error=error or ended.error,
        )


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a group: evalpipe's own first (RunFailed, UserError), else the first."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, EvalpipeError):
            return leaf
    return leaves[0] if leaves else group
