"""The `humaneval_chat` suite on the `hf` engine, with tiny random models given a chat template in the test:
the reply is constrained to one fenced block (python_module_fenced), and a model that reasons first
(`<think>`...`</think>`) reasons unconstrained and is constrained after it."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import llguidance
import pytest
import torch

from evalpipe.completion import REASONING, code_block, complete, split_reasoning
from evalpipe.constraints import load_constraint
from evalpipe.engines.builtin import build_random_model
from evalpipe.engines.hf import HFEngine, reasoning_token_ids
from evalpipe.records import Generation, RunConfig
from evalpipe.sources import load_humaneval
from evalpipe.suites import load_suite

SUITE = load_suite("humaneval_chat")
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALPIPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with a plain chat template (no reasoning markers in its vocabulary)."""
    from transformers import AutoTokenizer

    folder = build_random_model(tmp_path_factory.mktemp("chat-model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE + "<assistant>"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reasoning_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model that reasons first: `<think>`, `</think>` and `<|assistant|>` are single tokens, and its
    weights are set so that it answers `<|assistant|>` with `<think>` and `<think>` with `</think>` (a large
    input embedding steers the tiny model's next token towards the output row that points the same way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_random_model(tmp_path_factory.mktemp("reasoning-model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [*REASONING, "<|assistant|>"]})
    tokenizer.chat_template = TEMPLATE + "<|assistant|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    think, end, assistant = tokenizer.convert_tokens_to_ids([*REASONING, "<|assistant|>"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for source, target in ((assistant, think), (think, end)):
            direction = torch.randn(model.config.hidden_size, generator=generator) * 50
            model.get_input_embeddings().weight[source] = direction
            model.lm_head.weight[target] = direction
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def generate(model: Path, backend: str, n_tasks: int = 3, **options: Any) -> list[Generation]:
    tasks, _ = load_humaneval()
    values: dict[str, Any] = {"suite": SUITE.name, "engine": "hf", "models": ("m",), "backends": (backend,)}
    config = RunConfig(**{**values, "max_tokens": 40, **options})
    engine = HFEngine(config, SUITE, str(model), backend, batch_size=4)
    try:
        return list(engine.generate(engine.plan(tasks[:n_tasks])))
    finally:
        engine.close()


def viable(answer: str) -> bool:
    """Whether the module grammar can still accept a reply that starts with `answer` (llguidance by bytes)."""
    constraint = load_constraint(SUITE)
    assert constraint is not None and constraint.lark is not None
    tok = llguidance.LLTokenizer("byte")
    matcher = llguidance.LLMatcher(tok, llguidance.grammar_from("lark", constraint.lark), log_level=0)
    return bool(matcher.consume_tokens(tok.tokenize_bytes(answer.encode()))) and not matcher.is_error()


def test_the_plain_model_has_no_reasoning_markers(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    assert reasoning_token_ids(AutoTokenizer.from_pretrained(chat_model)) is None


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_constrained_replies_are_fenced_modules(chat_model: Path, backend: str) -> None:
    for g in generate(chat_model, backend):
        assert g.error is None and g.finish_reason in ("stop", "length"), g
        assert g.n_reasoning_tokens is None
        assert g.raw_text.lstrip("\n").startswith("```") and viable(g.raw_text), g.raw_text
        assert g.constraint_satisfied is (g.finish_reason == "stop")
        assert g.text == code_block(g.raw_text)


@pytest.mark.parametrize("backend", ["none", "guidance", "xgrammar"])
def test_a_model_that_reasons_first_is_constrained_after_its_reasoning(
    reasoning_model: Path, backend: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reasoning_model)
    assert reasoning_token_ids(tokenizer) == tuple(tokenizer.convert_tokens_to_ids(list(REASONING)))
    tasks = {task.id: task for task in load_humaneval()[0]}
    for g in generate(reasoning_model, backend):
        assert g.error is None, g.error
        assert g.raw_text.startswith("<think></think>"), g.raw_text
        assert g.n_reasoning_tokens == 2
        reasoning, answer = split_reasoning(g.raw_text)
        assert reasoning == "<think></think>" and answer is not None
        ending = complete(SUITE, tasks[g.key.task_id], g.raw_text)
        assert ending.reasoning == reasoning and ending.code == code_block(ending.checked)
        if backend != "none":
            # the grammar started after `</think>`: the answer is a prefix of a fenced module
            assert answer.lstrip("\n").startswith("```") and viable(answer), answer


class _ReasoningServer(http.server.BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible server like vLLM with a reasoning parser: chat deltas carry the reasoning
    in `reasoning`, apart from the content; usage counts the reasoning tokens."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "thinker", "object": "model"}]})
        else:
            self._json(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        deltas = [
            {"role": "assistant", "reasoning": "Double it.\n```\nx * 2\n```\n"},
            {"reasoning": "Done."},
            {"content": "```python\ndef f(x):\n    return 2 * x\n"},
            {"content": "```\n"},
        ]
        usage = {
            "prompt_tokens": 9,
            "completion_tokens": 30,
            "completion_tokens_details": {"reasoning_tokens": 12},
        }
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for number, delta in enumerate(deltas, 1):
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if number == len(deltas) else None}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


def test_the_openai_engine_keeps_a_servers_separate_reasoning_in_the_raw_text() -> None:
    from evalpipe.engines.openai import OpenAIEngine

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReasoningServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config = RunConfig(
            suite=SUITE.name, engine="openai", models=("thinker",), backends=("guidance",), max_tokens=64,
            base_url=url, engine_args={"warmup": "0"},
        )  # fmt: skip
        engine = OpenAIEngine(config, SUITE, "thinker", "guidance")
        tasks, _ = load_humaneval()
        [generation] = list(engine.generate(engine.plan(tasks[:1])))
    finally:
        server.shutdown()
        thread.join()
    body = _ReasoningServer.bodies[-1]
    assert body["messages"][0]["content"].startswith("Complete the following Python function")
    assert body["stop"] == ["\n```\n"] and body["structured_outputs"]["grammar"].startswith("//")
    assert generation.raw_text.startswith("<think>Double it.\n```\nx * 2\n```\nDone.</think>```python\n")
    assert generation.text == "def f(x):\n    return 2 * x\n"  # the answer's block, not the reasoning's
    assert generation.n_reasoning_tokens == 12 and generation.constraint_satisfied is True
