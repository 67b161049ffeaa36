"""`evalpipe serve`: a small OpenAI-compatible server on loopback, speaking vLLM 0.33's dialect.

It exists so that the `openai` engine can be tested end to end over real HTTP without vLLM or a GPU, and so
that a local model can be put behind the same client code that talks to `vllm serve`. It is not a production
server: it listens on loopback only and generates one request at a time.

Endpoints and shapes follow vLLM 0.33's server (paths inside the vLLM wheel):

- `GET /health` (200, empty body; never behind the API key), `GET /version` (`{"version": ...}`),
  `GET /v1/models` (`ModelList` of `ModelCard`s, `entrypoints/serve/engine/protocol.py`),
  `GET /server_info?config_format=json`: vLLM's dev-mode endpoint (`entrypoints/serve/dev/server_info/`);
  we answer with the one part clients read, `vllm_config.structured_outputs_config.backend`.
- `POST /v1/completions`, `POST /v1/chat/completions`, streamed (`data: {json}` events, then
  `data: [DONE]`) or not. Chunk and response fields as `CompletionStreamResponse` / `CompletionResponse`
  (`entrypoints/openai/completion/protocol.py`) and `ChatCompletionStreamResponse` / `ChatCompletionResponse`
  (`entrypoints/openai/chat_completion/protocol.py`): the first chat chunk carries the role; with
  `stream_options.include_usage` a last chunk with no choices carries `usage`. An error after the stream has
  started is a `data: {"error": {...}}` event before `[DONE]`, as vLLM sends it.
- The constraint is read from `structured_outputs` (`json`, `regex` or `grammar`; exactly one) or from
  `response_format` (`json_schema`), which overrides it, as `structured_outputs_from_response_format` does.
  The removed `guided_*` fields are ignored with a warning, as vLLM 0.33 ignores them.
- With an API key, `/v1/*` needs `Authorization: Bearer KEY`; otherwise HTTP 401 `{"error": "Unauthorized"}`
  (vLLM's `AuthenticationMiddleware`). Bad requests are HTTP 400 with vLLM's
  `{"error": {"message", "type", "param", "code"}}`; an unknown model is 404.

Generation goes through a `CompletionBackend`. `HFBackend` puts the `hf` engine
(`evalpipe.engines.hf.HFEngine`) behind it: one HFEngine per (model, backend, constraint) — a request's
constraint is written into a temporary suite — all sharing one loaded model, so llguidance/XGrammar masks work
exactly as in `--engine hf` and each grammar is compiled once. Seed, temperature, top_p, max_tokens and stop
sequences are per request (`HFEngine.with_sampling`: a view of the engine, nothing built again). Tokens are
streamed as HFEngine decodes them. `/server_info` also reports `evalpipe.engines_built` and
`evalpipe.grammar_compiles`, so that a client can check that grammars are not compiled per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import queue
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from evalpipe import __version__
from evalpipe.errors import UserError

logger = logging.getLogger("evalpipe.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
REMOVED_GUIDED_FIELDS = frozenset(
    {
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
    }
)
"""vLLM 0.33's `_REMOVED_GUIDED_FIELDS` (`entrypoints/serve/engine/protocol.py`): ignored, unconstrained."""


# ------------------------------------------------------------------------------------------------------------
# The backend seam


@dataclass(frozen=True)
class RequestConstraint:
    """The one structured-output constraint of a request."""

    kind: Literal["grammar", "json", "regex"]
    value: str
    """Grammar text (Lark or GBNF), JSON schema text, or regex."""


@dataclass(frozen=True)
class BackendRequest:
    """One completion to generate, from a plain prompt (chat requests are rendered to one first)."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    """Keep the stop sequence that ended the text in it (vLLM's `include_stop_str_in_output`)."""
    constraint: RequestConstraint | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of a completion. The last chunk has `finish_reason` ("stop" or "length", vLLM's words) and the
    token counts."""

    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop sequence that ended the completion, None for EOS or length (as vLLM reports it)."""
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None


class CompletionBackend(Protocol):
    """Generates completions for the server. Calls come from worker threads, one request at a time or not."""

    @property
    def structured_outputs_backend(self) -> str:
        """The structured-output backend applied to constrained requests (auto, guidance, xgrammar)."""
        ...

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt for a conversation (the model's chat template); ValueError where there is none."""
        ...

    def open(self, request: BackendRequest) -> Iterator[Chunk]:
        """Check and prepare a request (ValueError: a bad request, answered with HTTP 400), then return the
        iterator of its chunks. Closing the iterator early abandons the request."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------------
# Requests (only the fields evalpipe serve acts on; others are accepted and ignored, as OpenAI servers do)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    logprobs: Any = None
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[Any] | None = None
    max_tokens: int | None = 16
    echo: bool | None = False


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def request_constraint(
    structured_outputs: dict[str, Any] | None, response_format: dict[str, Any] | None
) -> RequestConstraint | None:
    """The request's constraint, as vLLM 0.33 reads it; ValueError for what it would reject."""
    fields = dict(structured_outputs) if structured_outputs is not None else None
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if schema is None:
                raise ValueError(
                    "When response_format type is 'json_schema', the 'json_schema' field must be provided."
                )
            # vLLM replaces the constraint fields of `structured_outputs` with the response format's.
            fields = {**{k: v for k, v in (fields or {}).items() if k not in _KINDS}, "json": schema}
        elif kind == "json_object":
            raise ValueError("response_format json_object is not supported by evalpipe serve")
        elif kind not in (None, "text"):
            raise ValueError(f"response_format type {kind!r} is not supported by evalpipe serve")
    if fields is None:
        return None
    given = [name for name in _KINDS if fields.get(name) is not None]
    if len(given) != 1:
        raise ValueError(
            "You must use one kind of structured outputs constraint "
            f"but {'none' if not given else ', '.join(given)} are specified"
        )
    name = given[0]
    value = fields[name]
    if name in ("choice", "json_object", "structural_tag"):
        raise ValueError(f"structured_outputs.{name} is not supported by evalpipe serve")
    if name == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        return RequestConstraint("json", text)
    if not isinstance(value, str) or (name == "grammar" and not value.strip()):
        raise ValueError(f"structured_outputs.{name} must be a non-empty string")
    return RequestConstraint("grammar" if name == "grammar" else "regex", value)


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _check_common(body: _Body) -> None:
    if body.n not in (None, 1):
        raise ValueError("evalpipe serve generates one choice per request (n=1)")
    if body.logprobs not in (None, False, 0):
        raise ValueError("logprobs are not supported by evalpipe serve")
    if body.stream_options and not body.stream:
        raise ValueError("Stream options can only be defined when `stream=True`.")
    removed = sorted(set(body.model_extra or {}) & REMOVED_GUIDED_FIELDS)
    if removed:
        logger.warning(
            "Request contains the removed guided-decoding field(s) %s, which are ignored; output will NOT be "
            "constrained. Use `structured_outputs` (or `response_format`) instead.",
            removed,
        )


# ------------------------------------------------------------------------------------------------------------
# The app


def error_body(
    message: str, kind: str = "BadRequestError", code: int = 400, param: str | None = None
) -> dict[str, Any]:
    """vLLM's `ErrorResponse`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    message: str, kind: str = "BadRequestError", code: int = 400, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=code)


class _BearerAuth:
    """vLLM's `AuthenticationMiddleware` (`entrypoints/serve/middleware/authenticate.py`): `/v1` needs
    `Authorization: Bearer KEY`, compared in constant time; everything else (health checks) is open.

    A plain ASGI middleware, not `@app.middleware("http")`: that one turns a request cancelled by a server
    shutdown into an HTTP 500, where a dying vLLM server just drops the connection.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self._app = app
        self._key = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and scope["path"].startswith("/v1"):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self._key):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def create_app(
    backend: CompletionBackend,
    *,
    served_model_name: str,
    api_key: str | None = None,
    default_max_tokens: int = 256,
) -> FastAPI:
    """The FastAPI app serving `backend` under `served_model_name` (see the module docstring)."""
    app = FastAPI(
        title="evalpipe serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    created = int(time.time())
    fingerprint = f"evalpipe-serve-{__version__}"

    if api_key:
        app.add_middleware(_BearerAuth, key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": str(error)}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def show_version() -> dict[str, str]:
        return {"version": f"evalpipe-serve {__version__}"}

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        return {
            "vllm_config": {
                "structured_outputs_config": {"backend": backend.structured_outputs_backend},
                "model_config": {"served_model_name": served_model_name},
            },
            "server": fingerprint,
            "evalpipe": _stats(backend),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "evalpipe"}
        return {
            "object": "list",
            "data": [{**card, "root": served_model_name, "parent": None, "permission": []}],
        }

    def unknown_model(name: str | None) -> JSONResponse | None:
        if name is None or name == served_model_name:
            return None
        return _error(
            f"The model `{name}` does not exist. Valid aliases: {served_model_name}.",
            "NotFoundError",
            404,
            "model",
        )

    async def respond(body: _Body, prompt: Callable[[], str], max_tokens: int | None, chat: bool) -> Response:
        if (missing := unknown_model(body.model)) is not None:
            return missing
        try:
            _check_common(body)
            request = BackendRequest(
                prompt=await run_in_threadpool(prompt),
                max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=_stops(body.stop),
                include_stop=body.include_stop_str_in_output,
                constraint=request_constraint(body.structured_outputs, body.response_format),
            )
            if request.max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
            chunks = await run_in_threadpool(backend.open, request)
        except ValueError as error:
            return _error(str(error))
        except NotImplementedError as error:
            return _error(str(error), "NotImplementedError", 501)
        except Exception as error:  # as vLLM's last-resort handler: a JSON 500, the server goes on
            logger.exception("error preparing a completion")
            return _error(f"{type(error).__name__}: {error}", "InternalServerError", 500)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(request_id, int(time.time()), served_model_name, chat, fingerprint)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(chunks, shape, usage), media_type="text/event-stream")
        return await _whole(chunks, shape)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Response:
        if not isinstance(body.prompt, str) or not body.prompt:
            return _error("evalpipe serve takes one non-empty string prompt per request", param="prompt")
        if body.echo:
            return _error("echo is not supported by evalpipe serve", param="echo")
        text = body.prompt
        return await respond(body, lambda: text, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Response:
        if not body.messages:
            return _error("messages must not be empty", param="messages")
        messages = body.messages
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(body, lambda: backend.chat_prompt(messages), limit, chat=True)

    return app


@dataclass(frozen=True)
class _Shape:
    """How a response is labelled: id, creation time, model, completion or chat."""

    request_id: str
    created: int
    model: str
    chat: bool
    fingerprint: str

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def chunk(
        self, text: str | None, finish: str | None, stop_reason: str | int | None, role: bool = False
    ) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
            choice.update(finish_reason=finish, stop_reason=stop_reason)
            kind = "text_completion"
        data: dict[str, Any] = {"id": self.request_id, "object": kind, "created": self.created}
        data["model"] = self.model
        return f"data: {json.dumps({**data, 'choices': [choice]})}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }


async def _closing(chunks: Iterator[Chunk]) -> AsyncIterator[Chunk]:
    """The chunks, read in a worker thread; the iterator is closed however the reading ends (a client that
    goes away cancels the response, and the backend must hear of it)."""
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if callable(close):
            await run_in_threadpool(close)


async def _sse(chunks: Iterator[Chunk], shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    n_prompt = n_out = 0
    try:
        if shape.chat:
            yield shape.chunk(None, None, None, role=True)
        async for chunk in _closing(chunks):
            if chunk.finish_reason is not None:
                n_prompt, n_out = chunk.n_prompt_tokens or 0, chunk.n_output_tokens or 0
            if chunk.text or chunk.finish_reason is not None:
                yield shape.chunk(chunk.text, chunk.finish_reason, chunk.stop_reason)
        if include_usage:
            data: dict[str, Any] = {
                "id": shape.request_id,
                "object": "chat.completion.chunk" if shape.chat else "text_completion",
                "created": shape.created,
                "model": shape.model,
                "choices": [],
                "usage": shape.usage(n_prompt, n_out),
                "system_fingerprint": shape.fingerprint,
            }
            yield f"data: {json.dumps(data)}\n\n"
    except Exception as error:  # after the headers: report in the stream, as vLLM does
        logger.exception("error in the completion stream")
        yield f"data: {json.dumps(error_body(str(error), 'InternalServerError', 500))}\n\n"
    yield "data: [DONE]\n\n"


async def _whole(chunks: Iterator[Chunk], shape: _Shape) -> JSONResponse:
    parts: list[str] = []
    last = Chunk()
    try:
        async for chunk in _closing(chunks):
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                last = chunk
    except Exception as error:
        logger.exception("error in a completion")
        return _error(str(error), "InternalServerError", 500)
    text = "".join(parts)
    common = {
        "index": 0,
        "logprobs": None,
        "finish_reason": last.finish_reason,
        "stop_reason": last.stop_reason,
    }
    choice = (
        {**common, "message": {"role": "assistant", "content": text}}
        if shape.chat
        else {**common, "text": text}
    )
    return JSONResponse(
        {
            "id": shape.request_id,
            "object": shape.object,
            "created": shape.created,
            "model": shape.model,
            "choices": [choice],
            "usage": shape.usage(last.n_prompt_tokens or 0, last.n_output_tokens or 0),
            "system_fingerprint": shape.fingerprint,
        }
    )


# ------------------------------------------------------------------------------------------------------------
# Running it


class RunningServer:
    """A server on a background thread (tests, `evalpipe serve`); `url` is its root, `stop()` ends it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in LOOPBACK_HOSTS:
            raise UserError(
                f"evalpipe serve listens on loopback only ({', '.join(LOOPBACK_HOSTS)}), not {host!r}"
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as error:
            self._socket.close()
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        self.port = int(self._socket.getsockname()[1])
        bracketed = f"[{host}]" if ":" in host else host
        self.url = f"http://{bracketed}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="evalpipe-serve", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._server.serve(sockets=[self._socket]))
        finally:
            self._loop.close()

    def start(self, timeout_s: float = 30.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("evalpipe serve did not start")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """As when the server's process dies: open connections are reset, unanswered, and the server stops.
        Does not wait (it may be called from a request's own worker thread); `stop()` waits."""

        def reset() -> None:
            for server in self._server.servers:
                server.close()
            for connection in list(self._server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()

        self._server.should_exit = self._server.force_exit = True
        with contextlib.suppress(RuntimeError):  # the loop has already stopped
            self._loop.call_soon_threadsafe(reset)

    def stop(self) -> None:
        """Stop now: open streams are cut, as when a server process dies."""
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------------
# The hf engine behind the seam


def grammar_is_likely_lark(text: str) -> bool:
    """vLLM's rule (`v1/structured_output/utils.py`): Lark unless a line, comments removed, has `::=`."""
    lines = (re.sub(r"(#|//).*$", "", line).strip() for line in text.split("\n"))
    return not any("::=" in line for line in lines)


class HFBackend:
    """`CompletionBackend` over `evalpipe.engines.hf.HFEngine`; see the module docstring.

    Streaming needs HFEngine to tell us each token as it is chosen. It has no public hook for that yet, so a
    subclass overrides its `_advance(slot, token, now)` step to report the slot's tokens after each step;
    `HFEngine.generate(requests, on_token=...)` would replace that override.
    """

    def __init__(
        self, model: str, backend: str = "auto", *, max_engines: int = 4, device: str | None = None
    ) -> None:
        from evalpipe.engines import hf

        if backend not in ("auto", "guidance", "xgrammar"):
            raise UserError(
                f"evalpipe serve applies constraints with auto, guidance or xgrammar; not {backend!r}"
            )
        self._hf = hf
        self._model = model
        self._backend = backend
        self._device = device
        self._max_engines = max_engines
        self._engines: OrderedDict[RequestConstraint | None, Any] = OrderedDict()
        self._engines_lock = threading.Lock()
        self.engines_built = 0
        self.grammar_compiles = 0
        # One generation at a time: the engines share one model, and this is a test server.
        self._generate_lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="evalpipe-serve-")
        source, local_only = hf.resolve_model(model)
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as error:
            raise UserError(
                f"model {model!r} cannot be loaded: {str(error).strip().splitlines()[0]}"
            ) from None
        self._streaming_engine = _streaming_engine_class(hf.HFEngine)
        # Load the model now (through the unconstrained engine), so a bad model fails at start-up.
        self._engine(BackendRequest(prompt="x", max_tokens=16, temperature=0.0))

    @property
    def structured_outputs_backend(self) -> str:
        return self._backend

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(f"model {self._model!r} has no chat template: use /v1/completions")
        return str(
            self._tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        )

    def open(self, request: BackendRequest) -> Iterator[Chunk]:
        engine = self._engine(request).with_sampling(
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.seed or 0,
            stop=request.stop,
        )
        return self._stream(engine, request)

    def stats(self) -> dict[str, int]:
        """What the server has built so far: engines (one per constraint) and grammar compiles."""
        return {"engines_built": self.engines_built, "grammar_compiles": self.grammar_compiles}

    def close(self) -> None:
        with self._engines_lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
        self._tmp.cleanup()

    # -- engines -------------------------------------------------------------------------------------------

    def _engine(self, request: BackendRequest) -> Any:
        """The HFEngine for this request's constraint (built on first use); sampling settings and stop
        sequences are the request's own (`open`). Evicting an engine while a request uses it is safe: the
        request holds a view that keeps the model and grammar alive."""
        from evalpipe.records import RunConfig
        from evalpipe.suites import ConstraintSpec, PromptSpec, Suite

        key = request.constraint
        with self._engines_lock:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                return engine
            folder = Path(self._tmp.name) / f"c{uuid.uuid4().hex[:12]}"
            folder.mkdir()
            spec = self._constraint_spec(ConstraintSpec, request.constraint, folder)
            suite = Suite(
                name="serve",
                prompt=PromptSpec(format="raw"),
                constraint=spec,
                path=str(folder / "serve.toml"),
            )
            backend = "none" if spec is None else self._backend
            config = RunConfig(
                suite="serve",
                engine="hf",
                models=(self._model,),
                backends=(backend,),
                sandbox="process",
            )
            try:
                engine = self._streaming_engine(
                    config, suite, self._model, backend, batch_size=1, device=self._device
                )
            except UserError as error:
                raise ValueError(str(error)) from None
            self.engines_built += 1
            described = engine.describe()
            if described["grammar_compile_s"] is not None and not described["grammar_cache_hit"]:
                self.grammar_compiles += 1
            self._engines[key] = engine
            while len(self._engines) > self._max_engines:
                _, old = self._engines.popitem(last=False)
                old.close()
            return engine

    @staticmethod
    def _constraint_spec(spec_class: Any, constraint: RequestConstraint | None, folder: Path) -> Any:
        """The request's constraint as a suite `ConstraintSpec`: the text in a file beside the suite."""
        if constraint is None:
            return None
        if constraint.kind == "grammar":
            lark = grammar_is_likely_lark(constraint.value)
            name = "grammar.lark" if lark else "grammar.gbnf"
            (folder / name).write_text(constraint.value)
            return spec_class(kind="grammar", **{"lark" if lark else "gbnf": name})
        if constraint.kind == "json":
            (folder / "schema.json").write_text(constraint.value)
            return spec_class(kind="json_schema", json_schema="schema.json")
        (folder / "pattern.regex").write_text(constraint.value)
        return spec_class(kind="regex", regex="pattern.regex")

    # -- streaming -----------------------------------------------------------------------------------------

    def _stream(self, engine: Any, request: BackendRequest) -> Iterator[Chunk]:
        """Run the request on a worker thread and turn the token ids it reports into text chunks."""
        from evalpipe.engines.base import GenerationRequest
        from evalpipe.records import SampleKey, Task

        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        task = Task(id="request", prompt=request.prompt, entry_point="", test="")
        key = SampleKey(model=self._model, backend=engine.describe()["backend"], task_id=task.id, index=0)

        def produce() -> None:
            try:
                with self._generate_lock:
                    engine.listener = lambda ids: events.put(("tokens", ids))
                    try:
                        generation = next(iter(engine.generate([GenerationRequest(key=key, task=task)])))
                    finally:
                        engine.listener = None
                events.put(("done", generation))
            except BaseException as error:
                events.put(("error", error))

        threading.Thread(target=produce, name="evalpipe-serve-generate", daemon=True).start()
        holdback = max((len(stop) for stop in request.stop), default=1) - 1
        sent = 0
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "tokens":
                text = str(self._tokenizer.decode(payload, skip_special_tokens=False))
                # Hold back an incomplete UTF-8 sequence and whatever could be the start of a stop sequence.
                ready = len(text) - holdback
                while ready > sent and text[ready - 1] == "\ufffd":
                    ready -= 1
                if ready > sent:
                    yield Chunk(text=text[sent:ready])
                    sent = ready
                continue
            yield self._last(payload, request, sent)
            return

    @staticmethod
    def _last(generation: Any, request: BackendRequest, sent: int) -> Chunk:
        """The last chunk: the rest of the text, cut before the first stop sequence (after it with
        `include_stop`), as vLLM returns it."""
        if generation.finish_reason == "error":
            raise RuntimeError(generation.error or "generation failed")
        final = generation.raw_text  # without the EOS token
        found = [(final.find(stop), stop) for stop in request.stop if stop in final]
        stop_reason = min(found)[1] if found else None
        if stop_reason is not None:
            cut = final.find(stop_reason) + (len(stop_reason) if request.include_stop else 0)
            final = final[:cut]
        finish = "length" if generation.finish_reason == "length" and stop_reason is None else "stop"
        return Chunk(
            text=final[sent:],
            finish_reason=finish,
            stop_reason=stop_reason,
            n_prompt_tokens=generation.n_prompt_tokens,
            n_output_tokens=generation.n_output_tokens,
        )


def _stats(backend: CompletionBackend) -> dict[str, int]:
    """A backend's counters where it keeps them (`HFBackend.stats`)."""
    stats = getattr(backend, "stats", None)
    return dict(stats()) if callable(stats) else {}


def _streaming_engine_class(base: type[Any]) -> type[Any]:
    """HFEngine with a `listener`, called with a sequence's token ids after each step that does not end it
    (the step that ends it may add EOS, which is not text; the Generation then has the whole text)."""

    class StreamingHFEngine(base):  # type: ignore[misc]
        listener: Callable[[list[int]], None] | None = None

        def _advance(self, slot: Any, token: int, now: float) -> None:
            super()._advance(slot, token, now)
            if self.listener is not None and slot.finish is None:
                self.listener(list(slot.out))

    return StreamingHFEngine
