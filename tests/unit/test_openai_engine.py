"""The `openai` engine against `evalpipe serve`, over real HTTP on 127.0.0.1.

Most tests put a scripted `CompletionBackend` behind the real server app (`evalpipe.serve.create_app`), so
that timings, stalls, failures and a server that goes away are exact and fast. The last tests put the `hf`
engine on a tiny random model behind it, with a grammar, end to end.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_support import TINY_GBNF, TINY_LARK, TINY_REGEX, tiny_suite

from evalpipe.engines.openai import OpenAIEngine, request_body, resolve_base_url, safe_url
from evalpipe.errors import RunFailed, UserError
from evalpipe.records import Generation, RunConfig, Task
from evalpipe.rundir import RunDirectory
from evalpipe.serve import BackendRequest, Chunk, RunningServer, create_app
from evalpipe.suites import ConstraintSpec, PromptSpec, Suite, load_suite

KEY = "sk-test-0123456789abcdef"
MODEL = "scripted"
RAW = Suite(name="t", prompt=PromptSpec(format="raw", stop=("\ndef ",)), path="/nonexistent/t.toml")


class ScriptedBackend:
    """Answers by markers in the prompt; records every request it gets."""

    def __init__(self, structured_outputs_backend: str = "guidance") -> None:
        self.structured_outputs_backend = structured_outputs_backend
        self.requests: list[BackendRequest] = []
        self.release = threading.Event()
        self.on_open: Callable[[BackendRequest], None] | None = None

    def chat_prompt(self, messages: Any) -> str:
        return "CHAT " + str(messages[-1]["content"])

    def open(self, request: BackendRequest) -> Iterator[Chunk]:
        self.requests.append(request)
        if self.on_open is not None:
            self.on_open(request)
        if "BAD400" in request.prompt:
            raise ValueError("this prompt is not allowed")
        if "FAIL500" in request.prompt:
            raise RuntimeError("the engine broke")
        return self._chunks(request)

    def _chunks(self, request: BackendRequest) -> Iterator[Chunk]:
        if request.constraint is not None and request.constraint.kind == "json":
            answer = (
                '{"code": "def f0():\\n    return 1\\n"}'
                if "TRUNCATED" not in request.prompt
                else '{"code": "de'
            )
            yield Chunk(text=answer[:5])
            yield Chunk(text=answer[5:], finish_reason="stop", n_prompt_tokens=9, n_output_tokens=12)
            return
        if "STALL" in request.prompt:
            yield Chunk(text="    partial")
            self.release.wait(20)  # never answers within the test's deadline
            return
        slow = "SLOW" in request.prompt
        pieces = ["    return", " 1", "\n"]
        time.sleep(0.3 if slow else 0.0)
        for number, piece in enumerate(pieces, 1):
            if number > 1 and slow:
                time.sleep(0.1)
            last = number == len(pieces)
            yield Chunk(
                text=piece,
                finish_reason="stop" if last else None,
                n_prompt_tokens=7 if last else None,
                n_output_tokens=len(pieces) if last else None,
            )


class FlakyProxy:
    """A TCP forwarder that drops the next `drop` connections without answering, then forwards."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.drop = 0
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.drop > 0:
                self.drop -= 1
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                end.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALPIPE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("EVALPIPE_BASE_URL", raising=False)


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def server(backend: ScriptedBackend) -> Iterator[RunningServer]:
    running = RunningServer(create_app(backend, served_model_name=MODEL, api_key=KEY)).start()
    yield running
    backend.release.set()
    running.stop()


def make_engine(url: str, suite: Suite = RAW, backend: str = "none", **options: Any) -> OpenAIEngine:
    options.setdefault("warmup", 0)
    config = RunConfig(
        suite="t", engine="openai", models=(MODEL,), backends=(backend,), max_tokens=32, base_url=url,
        engine_args={name: str(value) for name, value in options.items()},
    )  # fmt: skip
    return OpenAIEngine(config, suite, MODEL, backend)


def tasks(*markers: str) -> list[Task]:
    return [
        Task(id=f"T/{i}", prompt=f"def f{i}():\n    # {marker}\n", entry_point=f"f{i}", test="")
        for i, marker in enumerate(markers)
    ]


def run(engine: OpenAIEngine, *markers: str) -> dict[str, Generation]:
    requests = engine.plan(tasks(*markers))
    return {g.key.task_id: g for g in engine.generate(requests)}


# -- streaming, measurements, request contents ---------------------------------------------------------------


def test_streaming_measures_ttft_and_tokens(server: RunningServer, backend: ScriptedBackend) -> None:
    engine = make_engine(server.url, concurrency=2)
    out = run(engine, "SLOW", "plain")
    slow, plain = out["T/0"], out["T/1"]
    assert slow.raw_text == slow.text == "    return 1\n"
    assert slow.finish_reason == "stop" and slow.error is None
    assert (slow.n_prompt_tokens, slow.n_output_tokens) == (7, 3)
    # The first chunk comes after 0.3 s, the last two 0.1 s apart: TTFT is the first, not the whole request.
    assert slow.ttft_s is not None and slow.e2e_s is not None and slow.tpot_s is not None
    assert 0.3 <= slow.ttft_s < slow.e2e_s - 0.15
    assert slow.tpot_s == pytest.approx((slow.e2e_s - slow.ttft_s) / 2)
    assert plain.ttft_s is not None and plain.ttft_s < slow.ttft_s
    assert plain.effective_backend == "none" and plain.constraint_satisfied is None
    sent = backend.requests[-1]
    assert sent.stop == ("\ndef ",) and sent.max_tokens == 32 and sent.constraint is None


def test_samples_get_distinct_seeds(server: RunningServer, backend: ScriptedBackend) -> None:
    config = RunConfig(
        suite="t", engine="openai", models=(MODEL,), backends=("none",), n_samples=3, temperature=0.8,
        base_url=server.url, engine_args={"warmup": "0"},
    )  # fmt: skip
    engine = OpenAIEngine(config, RAW, MODEL, "none")
    list(engine.generate(engine.plan(tasks("plain"))))
    assert len({r.seed for r in backend.requests}) == 3
    assert {r.temperature for r in backend.requests} == {0.8}


def test_chat_suites_use_the_chat_endpoint_and_extract_code(
    server: RunningServer, backend: ScriptedBackend
) -> None:
    chat = Suite(name="c", prompt=PromptSpec(format="chat"), path="/nonexistent/c.toml")
    engine = make_engine(server.url, suite=chat)
    generation = run(engine, "plain")["T/0"]
    assert backend.requests[-1].prompt.startswith("CHAT Complete the following Python function")
    assert generation.raw_text == "    return 1\n" and generation.finish_reason == "stop"
    assert engine.describe()["api"] == "chat"


# -- deadlines, failures, retries ----------------------------------------------------------------------------


def test_a_stalled_request_is_cut_at_its_deadline_and_the_run_goes_on(server: RunningServer) -> None:
    engine = make_engine(server.url, timeout_s=1, concurrency=2)
    started = time.monotonic()
    out = run(engine, "STALL", "plain")
    assert time.monotonic() - started < 5
    stalled = out["T/0"]
    assert stalled.finish_reason == "timeout"
    assert stalled.raw_text == "    partial"  # the text so far is kept
    assert stalled.error is not None and "deadline" in stalled.error
    assert stalled.e2e_s is not None and 1.0 <= stalled.e2e_s < 3
    assert out["T/1"].finish_reason == "stop"


def test_a_bad_request_is_that_samples_error_and_not_retried(
    server: RunningServer, backend: ScriptedBackend
) -> None:
    engine = make_engine(server.url, retries=3, backoff_s=0.01)
    out = run(engine, "BAD400", "plain")
    assert out["T/0"].finish_reason == "error"
    assert out["T/0"].error == "HTTP 400: this prompt is not allowed"
    assert out["T/1"].finish_reason == "stop"
    assert sum("BAD400" in r.prompt for r in backend.requests) == 1


def test_a_server_error_fails_the_run_without_retrying(
    server: RunningServer, backend: ScriptedBackend
) -> None:
    engine = make_engine(server.url, retries=3, backoff_s=0.01)
    with pytest.raises(RunFailed, match=r"HTTP 500: RuntimeError: the engine broke.*evalpipe resume"):
        run(engine, "FAIL500")
    assert sum("FAIL500" in r.prompt for r in backend.requests) == 1


def test_transport_errors_are_retried(server: RunningServer, backend: ScriptedBackend) -> None:
    proxy = FlakyProxy(server.port)
    try:
        engine = make_engine(proxy.url, retries=3, backoff_s=0.01)
        proxy.drop = 2
        out = run(engine, "plain")
    finally:
        proxy.close()
    assert proxy.dropped == 2
    assert out["T/0"].finish_reason == "stop" and out["T/0"].text == "    return 1\n"
    assert sum("plain" in r.prompt for r in backend.requests) == 1  # only the third attempt reached it


def test_a_server_that_went_away_is_one_run_failed_after_the_retries(server: RunningServer) -> None:
    engine = make_engine(server.url, retries=2, backoff_s=0.01)
    server.stop()
    with pytest.raises(RunFailed) as failed:
        run(engine, "plain")
    message = str(failed.value)
    assert "went away" in message and "3 attempts" in message and "evalpipe resume" in message
    assert "\n" not in message


# -- set-up: health, key, model, backend ---------------------------------------------------------------------


def test_a_wrong_api_key_is_one_clear_user_error(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_API_KEY", "sk-wrong-key")
    with pytest.raises(UserError) as wrong:
        make_engine(server.url)
    assert "rejected the API key (HTTP 401)" in str(wrong.value)
    assert "sk-wrong-key" not in str(wrong.value)
    monkeypatch.delenv("EVALPIPE_API_KEY")
    with pytest.raises(UserError, match="wants an API key"):
        make_engine(server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the OpenAI SDK's variable works too
    make_engine(server.url)


def test_no_server_and_unknown_models_are_user_errors(server: RunningServer) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(UserError, match=r"cannot reach the server at http://127\.0\.0\.1:\d+"):
        make_engine(f"http://127.0.0.1:{port}")
    config = RunConfig(suite="t", engine="openai", models=("other",), backends=("none",), base_url=server.url)
    with pytest.raises(UserError, match=r"does not serve model 'other'; it serves: scripted"):
        OpenAIEngine(config, RAW, "other", "none")
    with pytest.raises(UserError, match="engine 'openai' takes"):
        make_engine(server.url, concurency=2)


def test_warm_up_is_untimed_and_reported_apart(server: RunningServer, backend: ScriptedBackend) -> None:
    engine = make_engine(server.url, warmup=2)
    assert len(backend.requests) == 2 and backend.requests[0].max_tokens == 8
    cold = engine.describe()["cold_start"]
    assert set(cold) == {"first_ttft_s", "first_e2e_s", "warm_ttft_s", "warm_e2e_s"}
    assert all(isinstance(value, float) for value in cold.values())


def test_describe_holds_no_secret(server: RunningServer) -> None:
    engine = make_engine(server.url + "/v1?token=x")
    described = json.dumps(engine.describe())
    for secret in (KEY, "token=x"):
        assert secret not in described
    assert engine.describe()["base_url"] == server.url
    assert engine.describe()["api_key_set"] is True


def test_base_url_lists_pick_the_backends_server() -> None:
    spec = "guidance=http://a:1/v1,xgrammar=http://b:2/,http://c:3"
    assert resolve_base_url(spec, "guidance") == "http://a:1"
    assert resolve_base_url(spec, "xgrammar") == "http://b:2"
    assert resolve_base_url(spec, "none") == "http://c:3"
    with pytest.raises(UserError, match="no server for backend 'auto'"):
        resolve_base_url("guidance=http://a:1", "auto")
    with pytest.raises(UserError, match="unknown backend 'guidence'"):
        resolve_base_url("guidence=http://a:1", "guidance")
    with pytest.raises(UserError, match="needs the server's URL"):
        resolve_base_url(None, "none")
    assert safe_url("https://u:p@h:9/x?k=v#f") == "https://h:9/x"


# -- constraints ---------------------------------------------------------------------------------------------


@pytest.fixture
def grammar_suite(tmp_path: Path) -> Suite:
    return tiny_suite(tmp_path / "tiny")


def test_the_grammar_goes_in_structured_outputs_for_the_servers_backend(
    server: RunningServer, backend: ScriptedBackend, grammar_suite: Suite
) -> None:
    # The server reports guidance (/server_info): `auto` records it, and llguidance gets the Lark grammar.
    engine = make_engine(server.url, suite=grammar_suite, backend="auto")
    generation = run(engine, "plain")["T/0"]
    assert backend.requests[-1].constraint is not None
    assert (backend.requests[-1].constraint.kind, backend.requests[-1].constraint.value) == (
        "grammar",
        TINY_LARK,
    )
    assert backend.requests[-1].stop == grammar_suite.prompt.stop  # every arm ends the same way
    assert generation.effective_backend == "guidance"
    assert generation.constraint_satisfied is False  # "    return 1\n" is not in the tiny grammar's language
    with pytest.raises(UserError, match="runs structured-output backend 'guidance', not 'xgrammar'"):
        make_engine(server.url, suite=grammar_suite, backend="xgrammar")


def test_request_bodies_use_vllms_fields_and_never_the_removed_ones() -> None:
    common: dict[str, Any] = {"model": "m", "max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    body = request_body(api="completions", prompt="p", structured_outputs={"grammar": "start: x"}, **common)
    assert body["structured_outputs"] == {"grammar": "start: x"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = request_body(
        api="chat", messages=[{"role": "user", "content": "c"}],
        structured_outputs={"json": {"type": "object"}}, constraint_field="response_format", **common,
    )  # fmt: skip
    assert chat["max_completion_tokens"] == 5 and "max_tokens" not in chat
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    for sent in (body, chat):
        assert not any(name.startswith("guided_") for name in sent)
    with pytest.raises(UserError, match="JSON schemas only"):
        request_body(api="completions", prompt="p", structured_outputs={"regex": "a"},
                     constraint_field="response_format", **common)  # fmt: skip


def test_the_server_reads_response_format_and_rejects_two_constraints(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    base = {"model": MODEL, "prompt": "def f():\n", "max_tokens": 4}
    two = httpx.post(
        f"{server.url}/v1/completions", headers=headers,
        json={**base, "structured_outputs": {"regex": "a", "grammar": "start: x"}},
    )  # fmt: skip
    assert two.status_code == 400 and two.json()["error"]["type"] == "BadRequestError"
    unknown = httpx.post(f"{server.url}/v1/completions", headers=headers, json={**base, "model": "nope"})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json=base).json() == {"error": "Unauthorized"}
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key, as in vLLM


# -- the JSON suite ------------------------------------------------------------------------------------------


def test_the_shipped_json_suite_says_how_its_code_is_extracted() -> None:
    suite = load_suite("humaneval_json")
    assert suite.constraint is not None and suite.constraint.kind == "json_schema"
    assert suite.prompt.extract == "json:code"
    assert "{prompt}" in str(suite.prompt.instruction)


def test_a_json_suite_without_an_extract_rule_is_refused(server: RunningServer, tmp_path: Path) -> None:
    suite = load_suite("humaneval_json")
    suite = suite.model_copy(update={"prompt": suite.prompt.model_copy(update={"extract": None})})
    with pytest.raises(UserError, match=r"constrains the output to JSON but has no prompt\.extract rule"):
        make_engine(server.url, suite=suite, backend="guidance")


def test_json_answers_are_extracted_and_the_raw_json_kept(
    server: RunningServer, backend: ScriptedBackend, tmp_path: Path
) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
    (tmp_path / "code.schema.json").write_text(json.dumps(schema))
    suite = Suite(
        name="j",
        prompt=PromptSpec(
            format="chat", instruction='Reply {"code": ...} for:\n{prompt}', extract="json:code"
        ),
        constraint=ConstraintSpec(kind="json_schema", json_schema="code.schema.json"),
        path=str(tmp_path / "j.toml"),
    )
    engine = make_engine(server.url, suite=suite, backend="guidance")
    out = run(engine, "plain", "TRUNCATED")
    (sent,) = [r for r in backend.requests if "plain" in r.prompt]
    assert sent.constraint is not None and json.loads(sent.constraint.value) == schema
    assert sent.prompt == 'CHAT Reply {"code": ...} for:\ndef f0():\n    # plain\n'
    good, bad = out["T/0"], out["T/1"]
    assert good.raw_text == '{"code": "def f0():\\n    return 1\\n"}'
    assert (
        good.text == "def f0():\n    return 1\n" and good.error is None and good.constraint_satisfied is True
    )
    assert bad.text == bad.raw_text == '{"code": "de' and bad.constraint_satisfied is False
    assert bad.error is not None and "not a JSON object" in bad.error


# -- shared helpers ------------------------------------------------------------------------------------------


# -- through the CLI: a wrong key, a server that goes away, resume -------------------------------------------


def _run_args(runs: Path) -> list[str]:
    return [
        "run", "humaneval", "--engine", "openai", "--model", MODEL, "--backend", "none", "--limit", "3",
        "--sandbox", "process", "--executor", "inline", "--workers", "1", "--runs-dir", str(runs),
    ]  # fmt: skip


def test_cli_wrong_key_is_one_line_and_leaves_no_run(
    server: RunningServer, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVALPIPE_BASE_URL", server.url)
    monkeypatch.setenv("EVALPIPE_API_KEY", "sk-wrong")
    code, _, err = cli(*_run_args(tmp_path / "runs"))
    assert code == 2
    assert err.strip().count("\n") == 0 and "rejected the API key" in err and "sk-wrong" not in err
    assert not list((tmp_path / "runs").glob("*/manifest.json"))


def test_cli_server_going_away_mid_run_fails_cleanly_and_resumes(
    backend: ScriptedBackend,
    server: RunningServer,
    cli: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    humaneval_tasks: list[Task],
) -> None:
    monkeypatch.setenv("EVALPIPE_BASE_URL", server.url)
    first_done = threading.Event()
    doomed = humaneval_tasks[2].prompt

    def kill_on_doomed(request: BackendRequest) -> None:
        if request.prompt == humaneval_tasks[0].prompt:
            first_done.set()
        elif request.prompt == doomed:
            first_done.wait(10)
            time.sleep(0.3)  # let the first sample's answer reach the client
            server.kill()
            time.sleep(0.3)  # no answer: the connection is reset first

    backend.on_open = kill_on_doomed
    code, _, err = cli(*_run_args(tmp_path / "runs"))
    assert code == 1, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "went away" in error_lines[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    run_ = RunDirectory.open(run_dir)
    assert run_.manifest.status == "failed"
    kept = {g.key.task_id for g in run_.generations()}
    assert humaneval_tasks[0].id in kept and humaneval_tasks[2].id not in kept

    # The server comes back elsewhere; the URL is not part of the run's identity, so the run resumes.
    again = ScriptedBackend()
    with RunningServer(create_app(again, served_model_name=MODEL, api_key=KEY)) as second:
        monkeypatch.setenv("EVALPIPE_BASE_URL", second.url)
        code, _, err = cli("resume", run_dir)
    assert code == 0, err
    run_ = RunDirectory.open(run_dir)
    assert run_.manifest.status == "completed"
    assert sorted(g.key.task_id for g in run_.generations()) == [t.id for t in humaneval_tasks[:3]]
    warmups = 2
    assert len(again.requests) == warmups + 3 - len(kept)  # only the missing samples were generated again
    written = "".join(path.read_text() for path in run_dir.rglob("*") if path.is_file())
    assert KEY not in written


# -- end to end with a model: the hf engine behind evalpipe serve --------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evalpipe.engines.builtin import build_random_model

    return build_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XGrammar's compiled grammars are cached on disk: in this test's folder, not the user's cache."""
    monkeypatch.setenv("EVALPIPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.usefixtures("cache")
@pytest.mark.parametrize("served_backend", ["guidance", "xgrammar"])
def test_end_to_end_with_a_grammar_on_a_real_model(
    tiny_model: Path, tmp_path: Path, served_backend: str
) -> None:
    from evalpipe.serve import HFBackend

    model_backend = HFBackend(str(tiny_model), served_backend)
    try:
        app = create_app(model_backend, served_model_name="tiny", api_key=KEY)
        with RunningServer(app) as running:
            suite = tiny_suite(tmp_path / "suite", lark=TINY_LARK, gbnf=TINY_GBNF)
            config = RunConfig(
                suite="t", engine="openai", models=("tiny",), backends=(served_backend,), max_tokens=48,
                base_url=running.url, engine_args={"warmup": "1"},
            )  # fmt: skip
            engine = OpenAIEngine(config, suite, "tiny", served_backend)
            requests = engine.plan(tasks("a", "b"))
            out = list(engine.generate(requests))
    finally:
        model_backend.close()
    assert len(out) == 2
    for generation in out:
        assert generation.finish_reason == "stop", generation
        assert TINY_REGEX.fullmatch(generation.raw_text), generation.raw_text
        assert generation.constraint_satisfied is True
        assert generation.effective_backend == served_backend
        assert generation.ttft_s is not None and generation.e2e_s is not None
        assert 0 < generation.ttft_s <= generation.e2e_s
        assert generation.n_output_tokens is not None and generation.n_output_tokens >= 4


def test_end_to_end_unconstrained_streams_tokens_and_stops(tiny_model: Path) -> None:
    from evalpipe.serve import HFBackend

    model_backend = HFBackend(str(tiny_model), "guidance")
    try:
        app = create_app(model_backend, served_model_name="tiny")
        with RunningServer(app) as running:
            body = {"model": "tiny", "prompt": "def f(x):\n", "max_tokens": 12, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            del body["stream_options"]  # only with stream=True, as in vLLM
            whole = httpx.post(f"{running.url}/v1/completions", json={**body, "stream": False}).json()
    finally:
        model_backend.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) > 2  # token by token, not one piece at the end
    assert chunks[-1]["choices"] == []
    assert "".join(texts) == whole["choices"][0]["text"]  # greedy: the same text streamed or not
    # The random model ends at max tokens or at EOS (it has no stop sequences here).
    used, finish = chunks[-1]["usage"]["completion_tokens"], whole["choices"][0]["finish_reason"]
    assert (used, finish) == (12, "length") or (used < 12 and finish == "stop"), (used, finish)
    assert whole["usage"]["completion_tokens"] == used


@pytest.mark.usefixtures("cache")
def test_serve_builds_one_engine_per_constraint_and_samples_per_request(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Seeds, temperatures, max_tokens and stops vary per request; the grammar is compiled once."""
    from evalpipe.serve import HFBackend

    model_backend = HFBackend(str(tiny_model), "guidance")
    grammar = {"grammar": TINY_LARK}
    try:
        app = create_app(model_backend, served_model_name="tiny")
        with RunningServer(app) as running:

            def complete(**fields: Any) -> dict[str, Any]:
                body = {"model": "tiny", "prompt": "def f(x):\n", "max_tokens": 12, **fields}
                answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)
                assert answer.status_code == 200, answer.text
                return dict(answer.json()["choices"][0]) | {"usage": answer.json()["usage"]}

            sampled = [complete(seed=seed, temperature=1.0, structured_outputs=grammar) for seed in range(4)]
            again = complete(seed=0, temperature=1.0, structured_outputs=grammar)
            short = complete(max_tokens=3, temperature=0)
            greedy = complete(temperature=0)
            stopped = complete(temperature=0, stop=[greedy["text"][2:4]]) if len(greedy["text"]) > 4 else None
            info = httpx.get(f"{running.url}/server_info").json()
    finally:
        model_backend.close()
    assert again["text"] == sampled[0]["text"]  # a seed is reproducible
    assert len({s["text"] for s in sampled}) > 1  # and different seeds sample differently
    assert all(TINY_REGEX.fullmatch(s["text"]) for s in sampled if s["finish_reason"] == "stop")
    assert short["usage"]["completion_tokens"] == 3 and short["finish_reason"] == "length"
    if stopped is not None:
        assert stopped["finish_reason"] == "stop" and stopped["text"] == greedy["text"][:2]
    # One engine for the unconstrained requests (built at start-up) and one for the grammar: one compile.
    assert info["evalpipe"] == {"engines_built": 2, "grammar_compiles": 1}
