"""What the `vllm` and `openai` engines hand to vLLM 0.33: checked as plain dicts everywhere, and against
vLLM's own classes where vLLM is importable (skipped otherwise). The last test runs vLLM on a GPU (`gpu`)."""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from hf_support import TINY_GBNF, TINY_LARK, TINY_REGEX, tiny_suite

from evalpipe.engines.openai import request_body
from evalpipe.engines.vllm import (
    VLLMEngine,
    engine_kwargs,
    finish_reason,
    sampling_kwargs,
    structured_outputs_fields,
    timings,
)
from evalpipe.errors import UserError
from evalpipe.records import RunConfig, Task
from evalpipe.serve import BackendRequest, Chunk, create_app
from evalpipe.suites import PromptSpec, Suite

SCHEMA = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def config(**changes: Any) -> RunConfig:
    base: dict[str, Any] = {"suite": "t", "engine": "vllm", "models": ("m",), "backends": ("guidance",)}
    return RunConfig(**{**base, **changes})


def constraint(kind: str = "grammar", **fields: Any) -> SimpleNamespace:
    values = {"lark": None, "gbnf": None, "json_schema": None, "regex": None, **fields}
    return SimpleNamespace(kind=kind, **values)


# -- engine kwargs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["guidance", "xgrammar", "outlines", "auto"])
def test_engine_kwargs_name_the_backend_and_keep_request_metrics(backend: str) -> None:
    kwargs = engine_kwargs(config(seed=7), "m", backend)
    assert kwargs["structured_outputs_config"] == {"backend": backend}
    assert kwargs["disable_log_stats"] is False  # else RequestOutput.metrics is None
    assert kwargs["model"] == "m" and kwargs["seed"] == 7
    assert "disable_fallback" not in json.dumps(kwargs)  # not a field of vLLM 0.33's StructuredOutputsConfig


def test_engine_kwargs_without_a_backend_send_no_constraint_and_share_the_gpu() -> None:
    kwargs = engine_kwargs(config(models=("a", "b"), backends=("none", "guidance")), "a", "none")
    assert kwargs["structured_outputs_config"] == {"backend": "auto"}
    assert kwargs["gpu_memory_utilization"] == pytest.approx(0.9 / 4, abs=1e-3)  # four engines alive at once


def test_engine_args_are_parsed_and_override() -> None:
    kwargs = engine_kwargs(
        config(),
        "m",
        "guidance",
        {
            "gpu-memory-utilization": "0.5",
            "enforce_eager": "true",
            "dtype": "bfloat16",
            "max_model_len": "4096",
        },
    )
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["enforce_eager"] is True
    assert kwargs["dtype"] == "bfloat16" and kwargs["max_model_len"] == 4096
    for reserved in ("model", "structured_outputs_config", "disable_log_stats", "seed"):
        with pytest.raises(UserError, match=f"--engine-arg {reserved}"):
            engine_kwargs(config(), "m", "guidance", {reserved: "x"})


# -- sampling kwargs and constraint fields -------------------------------------------------------------------


def test_sampling_kwargs() -> None:
    kwargs = sampling_kwargs(
        config(temperature=0.2, top_p=0.9, max_tokens=64), seed=5, stop=["\ndef "], structured_outputs=None
    )
    assert kwargs == {
        "n": 1, "temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "seed": 5, "stop": ["\ndef "],
        "include_stop_str_in_output": True, "structured_outputs": None,
    }  # fmt: skip
    constrained = sampling_kwargs(
        config(), seed=1, stop=["\ndef "], structured_outputs={"grammar": "g"}, max_tokens=8
    )
    assert constrained["stop"] == ["\ndef "] and constrained["include_stop_str_in_output"] is True
    assert constrained["max_tokens"] == 8
    assert constrained["structured_outputs"] == {"grammar": "g"}


def test_each_backend_gets_the_grammar_syntax_it_reads() -> None:
    both = constraint(lark=TINY_LARK, gbnf=TINY_GBNF)
    assert structured_outputs_fields(both, "guidance") == {"grammar": TINY_LARK}
    assert structured_outputs_fields(both, "auto") == {"grammar": TINY_LARK}
    assert structured_outputs_fields(both, "xgrammar") == {"grammar": TINY_GBNF}
    assert structured_outputs_fields(constraint(lark=TINY_LARK), "xgrammar") == {"grammar": TINY_LARK}
    with pytest.raises(UserError, match="'outlines' takes no grammars"):
        structured_outputs_fields(both, "outlines")
    with pytest.raises(UserError, match="neither a Lark nor a GBNF"):
        structured_outputs_fields(constraint(), "guidance")


def test_json_schemas_and_regexes() -> None:
    schema = constraint("json_schema", json_schema=json.dumps(SCHEMA))
    assert structured_outputs_fields(schema, "outlines") == {"json": SCHEMA}
    assert structured_outputs_fields(constraint("regex", regex="[a-z]+"), "xgrammar") == {"regex": "[a-z]+"}
    with pytest.raises(UserError, match="unknown constraint kind"):
        structured_outputs_fields(constraint("choice"), "guidance")


def test_finish_reasons_and_timings() -> None:
    assert finish_reason("stop") == ("stop", None)
    assert finish_reason("length") == ("length", None)
    reason, error = finish_reason("abort")
    assert reason == "error" and error is not None and "abort" in error
    metrics = SimpleNamespace(first_token_latency=0.25, first_token_ts=100.0, last_token_ts=100.9)
    ttft, tpot, e2e = timings(metrics, 10)
    assert ttft == 0.25 and tpot == pytest.approx(0.1) and e2e == pytest.approx(1.15)
    assert timings(None, 10) == (None, None, None)  # disable_log_stats=True leaves metrics None
    assert timings(SimpleNamespace(first_token_latency=0.0, first_token_ts=0.0, last_token_ts=0.0), 1) == (
        None,
        None,
        None,
    )


def test_without_vllm_the_engine_is_one_user_error() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    raw = Suite(name="t", prompt=PromptSpec(format="raw"), path="/nonexistent/t.toml")
    with pytest.raises(UserError, match=r"engine 'vllm' needs vLLM: pip install 'evalpipe\[vllm\]'"):
        VLLMEngine(config(backends=("none",)), raw, "m", "none")


# -- the engine's glue, on a stand-in for vLLM (what can be checked without a GPU) ---------------------------


class FakeParams(SimpleNamespace):
    """Stands in for SamplingParams / StructuredOutputsParams / StructuredOutputsConfig: keeps its kwargs."""

    _backend: str | None = None


class FakeLLM:
    """Finishes requests in reverse order, with fixed metrics; sets `_backend` as vLLM's `verify` does."""

    made: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.llm_engine = self
        self.added: list[tuple[str, Any, Any]] = []
        self._pending: list[tuple[str, Any, Any]] = []
        FakeLLM.made.append(self)

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(
            chat_template="t",
            apply_chat_template=lambda messages, **_: "<user>" + messages[-1]["content"] + "<bot>",
            encode=lambda text, add_special_tokens: [len(text), int(add_special_tokens)],
        )

    def enqueue(self, prompts: list[Any], params: list[Any], use_tqdm: bool) -> list[str]:
        configured = self.kwargs["structured_outputs_config"].backend
        ids = []
        for prompt, param in zip(prompts, params, strict=True):
            if param.structured_outputs is not None:
                param.structured_outputs._backend = "xgrammar" if configured == "auto" else configured
            request_id = str(len(self.added))
            self.added.append((request_id, prompt, param))
            self._pending.append((request_id, prompt, param))
            ids.append(request_id)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    def step(self) -> list[Any]:
        request_id, _, _ = self._pending.pop()
        output = SimpleNamespace(text="x = 1\n", token_ids=[5, 6, 7, 8, 9, 10], finish_reason="stop")
        metrics = SimpleNamespace(first_token_latency=0.5, first_token_ts=10.0, last_token_ts=10.25)
        return [
            SimpleNamespace(request_id="ignored", finished=False),
            SimpleNamespace(
                request_id=request_id,
                finished=True,
                prompt_token_ids=[1, 2, 3],
                outputs=[output],
                metrics=metrics,
            ),
        ]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    from evalpipe.engines import vllm as module

    FakeLLM.made = []
    monkeypatch.setattr(
        module, "_import_vllm", lambda: module._VLLM(FakeLLM, FakeParams, FakeParams, FakeParams)
    )
    return FakeLLM


@pytest.mark.parametrize("backend", ["auto", "guidance"])
def test_the_engine_builds_requests_and_records_from_vllms_outputs(
    fake_vllm: type[FakeLLM], tmp_path: Path, backend: str
) -> None:
    suite = tiny_suite(tmp_path / "suite")
    engine = VLLMEngine(config(backends=(backend,), max_tokens=48), suite, "m", backend)
    (llm,) = fake_vllm.made
    assert llm.kwargs["disable_log_stats"] is False and llm.kwargs["generation_config"] == "vllm"
    assert llm.kwargs["structured_outputs_config"].backend == backend
    assert len(llm.added) == 2 and all(p.max_tokens == 8 for _, _, p in llm.added)  # the warm-ups
    tasks = [Task(id=f"T/{i}", prompt=f"p{i}", entry_point="f", test="") for i in range(3)]
    out = list(engine.generate(engine.plan(tasks)))
    assert [g.key.task_id for g in out] == ["T/2", "T/1", "T/0"]  # as vLLM finishes them
    sent = llm.added[2:]
    assert [prompt for _, prompt, _ in sent] == [{"prompt": "p0"}, {"prompt": "p1"}, {"prompt": "p2"}]
    assert all(p.structured_outputs.grammar == TINY_LARK and p.stop is None for _, _, p in sent)  # no stops
    assert len({p.seed for _, _, p in sent}) == 3
    for generation in out:
        assert generation.effective_backend == ("xgrammar" if backend == "auto" else "guidance")
        assert (generation.ttft_s, generation.e2e_s) == (0.5, 0.75)
        assert generation.tpot_s == pytest.approx(0.05)
        assert (generation.n_prompt_tokens, generation.n_output_tokens) == (3, 6)
        assert generation.raw_text == generation.text == "x = 1\n" and generation.constraint_satisfied is True
    assert engine.describe()["cold_start"]["first_ttft_s"] == 0.5


def test_the_engine_renders_chat_prompts_without_a_second_bos(fake_vllm: type[FakeLLM]) -> None:
    chat = Suite(name="c", prompt=PromptSpec(format="chat", stop=("\ndef ",)), path="/nonexistent/c.toml")
    engine = VLLMEngine(config(backends=("none",), engine_args={"warmup": "0"}), chat, "m", "none")
    task = Task(id="T/0", prompt="def f():\n", entry_point="f", test="")
    (generation,) = engine.generate(engine.plan([task]))
    (llm,) = fake_vllm.made
    assert len(llm.added) == 1 and "warmup" not in llm.kwargs  # an engine option, not vLLM's
    _, prompt, param = llm.added[0]
    assert prompt["prompt"].startswith("<user>Complete the following Python function")
    assert prompt["prompt_token_ids"] == [len(prompt["prompt"]), 0]  # tokenized without special tokens
    assert param.stop == ["\ndef "] and param.structured_outputs is None
    assert generation.effective_backend == "none"


# -- against vLLM's own classes (where vLLM is importable) ---------------------------------------------------


@pytest.fixture
def vllm() -> Any:
    return pytest.importorskip("vllm")


@pytest.mark.parametrize("backend", ["guidance", "xgrammar", "outlines", "auto", "none"])
def test_vllms_classes_accept_the_engine_kwargs(vllm: Any, backend: str) -> None:
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs

    kwargs = engine_kwargs(config(), "m", backend)
    so_config = StructuredOutputsConfig(**kwargs.pop("structured_outputs_config"))
    assert so_config.backend == (backend if backend != "none" else "auto")
    accepted = set(inspect.signature(vllm.LLM.__init__).parameters) | set(EngineArgs.__dataclass_fields__)
    assert set(kwargs) <= accepted


def test_vllm_033_has_no_disable_fallback(vllm: Any) -> None:
    from vllm.config import StructuredOutputsConfig

    with pytest.raises(ValueError, match="disable_fallback"):
        StructuredOutputsConfig(backend="guidance", disable_fallback=True)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "fields",
    [{"grammar": TINY_LARK}, {"json": SCHEMA}, {"regex": "[a-z]{1,4}"}],
    ids=["grammar", "json", "regex"],
)
def test_vllms_sampling_params_accept_the_sampling_kwargs(vllm: Any, fields: dict[str, Any]) -> None:
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    kwargs = sampling_kwargs(config(), seed=3, structured_outputs=fields)
    params = SamplingParams(
        structured_outputs=StructuredOutputsParams(**kwargs.pop("structured_outputs")), **kwargs
    )
    ((name, value),) = fields.items()
    assert getattr(params.structured_outputs, name) == value
    assert params.seed == 3 and params.max_tokens == 512


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("field", ["structured_outputs", "response_format"])
def test_vllms_server_reads_our_request_bodies(vllm: Any, api: str, field: str) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import StructuredOutputsParams

    body = request_body(
        api=api,  # type: ignore[arg-type]
        model="m",
        prompt="def f():\n" if api == "completions" else None,
        messages=[{"role": "user", "content": "hi"}] if api == "chat" else None,
        max_tokens=16, temperature=0.0, top_p=1.0, seed=9, stop=["\ndef "],
        structured_outputs={"json": SCHEMA}, constraint_field=field,
    )  # fmt: skip
    model = CompletionRequest if api == "completions" else ChatCompletionRequest
    request = model.model_validate(body)
    assert not request.model_extra, f"vLLM would ignore {sorted(request.model_extra or {})}"
    assert request.extract_structured_outputs() == StructuredOutputsParams(json=SCHEMA)
    assert request.stream and request.stream_options is not None and request.stream_options.include_usage
    assert request.seed == 9 and request.stop == ["\ndef "]


def test_vllms_response_models_read_what_evalpipe_serve_sends(vllm: Any) -> None:
    from fastapi.testclient import TestClient
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionStreamResponse,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionStreamResponse

    class Two:
        structured_outputs_backend = "guidance"

        def chat_prompt(self, messages: Any) -> str:
            return "chat"

        def open(self, request: BackendRequest) -> Any:
            return iter([Chunk("a"), Chunk("b", finish_reason="stop", n_prompt_tokens=2, n_output_tokens=2)])

        def close(self) -> None:
            pass

    client = TestClient(create_app(Two(), served_model_name="m"))
    for path, body, stream_model, whole_model in (
        ("/v1/completions", {"prompt": "p"}, CompletionStreamResponse, CompletionResponse),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c"}]},
         ChatCompletionStreamResponse, ChatCompletionResponse),
    ):  # fmt: skip
        whole = whole_model.model_validate(client.post(path, json={**body, "model": "m"}).json())
        assert whole.usage.completion_tokens == 2
        streamed = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [stream_model.model_validate(json.loads(event)) for event in events[:-1]]
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 4


README = Path(__file__).resolve().parents[2] / "deploy" / "vllm" / "README.md"


def test_the_readme_vllm_serve_commands_parse(vllm: Any) -> None:
    from vllm.engine.arg_utils import EngineArgs

    try:  # 0.33
        from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:  # 0.32 (the CPU build)
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    commands = [
        shlex.split(line)[2:] for line in README.read_text().splitlines() if line.startswith("vllm serve ")
    ]
    assert len(commands) == 4
    try:
        parser = make_arg_parser(FlexibleArgumentParser())
    except RuntimeError as error:  # vLLM infers the device while building its parser
        pytest.skip(f"vLLM cannot build its parser here: {error}")
    backends = []
    for command in commands:
        args = parser.parse_args(command)
        validate_parsed_serve_args(args)
        engine_args = EngineArgs.from_cli_args(args)
        backends.append(engine_args.structured_outputs_config.backend)
        assert engine_args.generation_config == "vllm" and engine_args.seed == 0
        assert args.served_model_name == ["qwen-coder-1.5b"]
    assert backends == ["guidance", "xgrammar", "outlines", "auto"]
    with pytest.raises(SystemExit):  # the flag people look for does not exist in 0.33
        parser.parse_args([*commands[0], "--structured-outputs-config.disable_fallback", "true"])


# -- vLLM on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["guidance", "xgrammar", "auto"])
def test_vllm_engine_end_to_end_with_a_grammar(vllm: Any, tmp_path: Path, backend: str) -> None:
    from evalpipe.engines.builtin import build_random_model

    model = str(build_random_model(tmp_path / "model"))
    suite = tiny_suite(tmp_path / "suite")
    run_config = config(
        models=(model,), backends=(backend,), max_tokens=48,
        engine_args={"enforce_eager": "true", "gpu_memory_utilization": "0.3", "max_model_len": "1024"},
    )  # fmt: skip
    engine = VLLMEngine(run_config, suite, model, backend)
    try:
        tasks = [Task(id=f"T/{i}", prompt=f"x{i} = ", entry_point="f", test="") for i in range(3)]
        out = list(engine.generate(engine.plan(tasks)))
        described = engine.describe()
    finally:
        engine.close()
    assert len(out) == 3
    for generation in out:
        assert generation.finish_reason == "stop", generation
        assert TINY_REGEX.fullmatch(generation.raw_text), generation.raw_text
        assert (
            generation.ttft_s is not None and generation.tpot_s is not None and generation.e2e_s is not None
        )
        assert generation.effective_backend == backend or (
            backend == "auto" and generation.effective_backend in ("xgrammar", "guidance")
        )
    assert described["cold_start"]["first_ttft_s"] is not None
