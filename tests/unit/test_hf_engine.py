"""The `hf` engine on a tiny random Llama built in the test (about a second; nothing is downloaded).

A random model writes noise, so whatever is well formed in the output was put there by the token masks.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hf_support import TINY_REGEX, tiny_suite

from evalpipe.completion import code_block
from evalpipe.engines import builtin, hf
from evalpipe.engines.builtin import build_random_model
from evalpipe.engines.hf import HFEngine
from evalpipe.errors import UserError
from evalpipe.records import Generation, RunConfig, Task
from evalpipe.suites import PromptSpec, Suite

PROMPTS = [
    "def f(x):\n",
    "import os\n\nclass Point:\n    def norm(self):\n        return",
    "x = 1\n",
    "# a longer prompt, so that the batch has to pad the others on the left\nvalues = [1, 2, 3]\n",
    "print('hi')\n",
]
TASKS = [Task(id=f"T/{i}", prompt=p, entry_point="f", test="") for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh evalpipe cache per test: the XGrammar disk cache never leaks between tests or into ~/.cache."""
    monkeypatch.setenv("EVALPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def suite(tmp_path: Path) -> Suite:
    return tiny_suite(tmp_path / "suite")


def config(backend: str, **changes: Any) -> RunConfig:
    values: dict[str, Any] = {"suite": "tiny", "engine": "hf", "models": ("m",), "backends": (backend,)}
    values.setdefault("max_tokens", 48)
    return RunConfig(**{**values, **changes})


def run(
    suite: Suite, model: Path, backend: str, tasks: list[Task] = TASKS, **options: Any
) -> list[Generation]:
    batch_size = options.pop("batch_size", 4)
    engine = HFEngine(config(backend, **options), suite, str(model), backend, batch_size=batch_size)
    try:
        generations = list(engine.generate(engine.plan(tasks)))
    finally:
        engine.close()
    return sorted(generations, key=lambda g: g.key.as_tuple())


def texts(generations: list[Generation]) -> list[str]:
    return [g.raw_text for g in generations]


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_grammar_backends_only_produce_grammar_text(suite: Suite, model_dir: Path, backend: str) -> None:
    generations = run(suite, model_dir, backend, n_samples=2, temperature=1.0)
    assert len(generations) == 2 * len(TASKS)
    for g in generations:
        assert g.finish_reason == "stop", g
        assert TINY_REGEX.fullmatch(g.text), g.text  # our own check, independent of both backends
        assert g.text == g.raw_text
        assert g.constraint_satisfied is True
        assert g.effective_backend == backend and g.key.backend == backend
        assert g.error is None


def test_measurements_are_filled_in(suite: Suite, model_dir: Path) -> None:
    for g in run(suite, model_dir, "guidance", max_tokens=48):
        assert g.n_prompt_tokens and g.n_prompt_tokens > 0
        assert g.n_output_tokens and g.n_output_tokens >= 4  # "a = 1\n" + EOS is at least four tokens
        assert g.ttft_s is not None and g.e2e_s is not None and 0 < g.ttft_s <= g.e2e_s
        assert g.tpot_s is not None and g.tpot_s > 0
        assert g.grammar_compile_s is not None and g.grammar_compile_s > 0
        assert g.grammar_cache_hit is False
        assert g.mask_s_per_token is not None and g.mask_s_per_token > 0
    for g in run(suite, model_dir, "none", max_tokens=8):
        assert g.mask_s_per_token is None and g.grammar_compile_s is None and g.grammar_cache_hit is None
        assert g.n_output_tokens and g.e2e_s is not None


def test_none_backend_stops_at_stop_sequences(tmp_path: Path, model_dir: Path) -> None:
    plain = Suite(name="plain", path=str(tmp_path / "plain.toml"))
    free = run(plain, model_dir, "none", max_tokens=12)
    for g in free:
        assert g.finish_reason in {"length", "stop"}
        assert g.constraint_satisfied is None and g.effective_backend == "none"
    # A stop sequence taken from what the model wrote: it must stop there and cut the text before it.
    first = free[0]
    stop = first.raw_text[4:7]
    assert len(stop) == 3
    stopping = Suite(name="stopping", prompt=PromptSpec(stop=(stop,)), path=str(tmp_path / "s.toml"))
    again = run(stopping, model_dir, "none", tasks=[TASKS[0]], max_tokens=12)[0]
    assert again.finish_reason == "stop"
    # The code ends where the stop sequence starts, keeping the newline a stop sequence may begin with.
    code_end = first.raw_text.index(stop) + stop.startswith("\n")
    assert again.text == first.raw_text[:code_end]
    assert stop in again.raw_text and again.raw_text.startswith(again.text)


def test_unconstrained_run_reports_constraint_satisfaction(suite: Suite, model_dir: Path) -> None:
    # With a constraint in the suite, backend `none` still says whether its text happens to satisfy it.
    for g in run(suite, model_dir, "none", max_tokens=6):
        assert g.constraint_satisfied is bool(TINY_REGEX.fullmatch(g.text))


@pytest.mark.parametrize("backend", ["none", "guidance"])
def test_batching_does_not_change_greedy_output(suite: Suite, model_dir: Path, backend: str) -> None:
    alone = run(suite, model_dir, backend, batch_size=1)
    batched = run(suite, model_dir, backend, batch_size=5)
    assert texts(alone) == texts(batched)
    assert len(set(texts(alone))) > 1  # prompts change the output: the comparison means something


def test_seeds_make_sampling_reproducible(suite: Suite, model_dir: Path) -> None:
    options = {"n_samples": 3, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    first = run(suite, model_dir, "xgrammar", **options)
    assert texts(first) == texts(run(suite, model_dir, "xgrammar", batch_size=2, **options))
    assert len(set(texts(first))) > len(TASKS)  # samples of one task differ
    assert texts(first) != texts(run(suite, model_dir, "xgrammar", **{**options, "seed": 8}))


@pytest.mark.parametrize("backend", ["none", "guidance", "xgrammar"])
def test_max_tokens_ends_with_length(suite: Suite, model_dir: Path, backend: str) -> None:
    # The grammar needs at least four tokens ("a = 1\n" and EOS): three are never enough.
    for g in run(suite, model_dir, backend, max_tokens=3):
        assert g.finish_reason == "length"
        assert g.n_output_tokens == 3


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_bad_grammar_is_a_user_error_naming_the_backend(
    tmp_path: Path, model_dir: Path, backend: str
) -> None:
    bad = tiny_suite(tmp_path / "bad", lark="start: foo(\n", gbnf="root ::= (\n")
    with pytest.raises(UserError, match=backend):
        HFEngine(config(backend), bad, str(model_dir), backend)


def test_grammar_backend_without_constraint_is_a_user_error(tmp_path: Path, model_dir: Path) -> None:
    plain = Suite(name="plain", path=str(tmp_path / "plain.toml"))
    with pytest.raises(UserError, match="needs a constraint"):
        HFEngine(config("guidance"), plain, str(model_dir), "guidance")


@pytest.mark.parametrize("model", ["no-such-org/no-such-model-xyz", "/no/such/folder"])
def test_unknown_model_is_a_one_line_user_error(suite: Suite, model: str) -> None:
    with pytest.raises(UserError) as raised:
        HFEngine(config("none"), suite, model, "none")
    assert "\n" not in str(raised.value) and model in str(raised.value)


def test_xgrammar_compiled_grammar_is_cached_on_disk(
    suite: Suite, model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        HFEngine(config("xgrammar"), suite, str(model_dir), "xgrammar").describe()["grammar_cache_path"]
        is None
    )
    monkeypatch.setattr(hf, "XGRAMMAR_DISK_CACHE_MIN_S", 0.0)  # the tiny grammar compiles in milliseconds
    first = HFEngine(config("xgrammar"), suite, str(model_dir), "xgrammar")
    second = HFEngine(config("xgrammar"), suite, str(model_dir), "xgrammar")
    try:
        assert first.describe()["grammar_cache_hit"] is False
        assert second.describe()["grammar_cache_hit"] is True
        assert list((cache / "xgrammar").glob("*.json"))
        [g] = list(second.generate(second.plan(TASKS[:1])))
        assert g.grammar_cache_hit is True and g.finish_reason == "stop"
    finally:
        first.close()
        second.close()


def test_auto_picks_a_backend_and_records_it(suite: Suite, model_dir: Path) -> None:
    [g] = run(suite, model_dir, "auto", tasks=TASKS[:1])
    assert g.key.backend == "auto" and g.effective_backend in {"xgrammar", "guidance"}
    assert g.finish_reason == "stop"


def test_chat_prompts_use_the_template_and_extract_the_code_block(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat-model"
    shutil.copytree(model_dir, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    tokenizer.save_pretrained(chat_dir)
    chat = Suite(name="chat", prompt=PromptSpec(format="chat"), path=str(tmp_path / "chat.toml"))
    for g in run(chat, chat_dir, "none", max_tokens=10):
        assert g.text == code_block(g.raw_text)
        assert g.n_prompt_tokens and g.n_prompt_tokens > 30  # the instruction was added
    with pytest.raises(UserError, match="chat template"):
        HFEngine(config("none"), chat, str(model_dir), "none")


# The built-in model's cache logic, with the expensive build replaced by a stub.


@pytest.fixture
def stub_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    calls: list[Path] = []

    def fake(out: Path, progress: bool) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(builtin, "_build_builtin", fake)
    yield calls


def test_builtin_model_is_built_once_into_the_cache(cache: Path, stub_build: list[Path]) -> None:
    folder = builtin.builtin_model_dir(progress=False)
    assert folder.parent == cache / "models" and folder.name.startswith(f"{builtin.RECIPE['name']}-")
    assert builtin.builtin_model_dir(progress=False) == folder
    assert len(stub_build) == 1
    assert not list(folder.parent.glob(".*tmp-*"))


def test_a_failed_builtin_build_leaves_nothing_behind(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Path, progress: bool) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way

    monkeypatch.setattr(builtin, "_build_builtin", broken)
    with pytest.raises(KeyboardInterrupt):
        builtin.builtin_model_dir(progress=False)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


# Greedy equivalence with the masks overlapped: the real HumanEval body grammar, batch sizes 1, 3 and 8, and a
# plain serial loop over the backends' own API (mask after the forward pass, one sequence at a time).

GRAMMARS = Path(__file__).resolve().parents[2] / "tasks" / "grammars"
FUNCTION_PROMPTS = [
    'def f(x):\n    """Return x."""\n',
    'def add(a, b):\n    """Add two numbers."""\n',
    "def g():\n",
    'def longest(strings: list[str]) -> str | None:\n    """The longest of the strings, or None."""\n',
    'def h(n):\n    """Count down from n, printing each number on its own line."""\n',
    "def k(values, key=None):\n",
    'def parse(text):\n    """Split text into words and numbers."""\n',
    "def m(a, b, c):\n    # the middle value\n",
]
FUNCTION_TASKS = [
    Task(id=f"F/{i}", prompt=p, entry_point="f", test="") for i, p in enumerate(FUNCTION_PROMPTS)
]


def greedy_ids(suite: Suite, model: Path, backend: str, batch_size: int) -> list[list[int]]:
    engine = HFEngine(config(backend, max_tokens=40), suite, str(model), backend, batch_size=batch_size)
    try:
        produced = list(engine.generate_with_ids(engine.plan(FUNCTION_TASKS)))
    finally:
        engine.close()
    for generation, _ in produced:
        assert generation.error is None, generation
        assert generation.finish_reason in {"stop", "length"}, generation
        assert generation.mask_s_per_token is not None and generation.mask_s_per_token > 0
        assert generation.mask_unhidden_s_per_token is not None and generation.mask_unhidden_s_per_token >= 0
    return [ids for _, ids in sorted(produced, key=lambda item: item[0].key.as_tuple())]


def serial_greedy_ids(suite: Suite, model: Path, backend: str) -> list[list[int]]:
    """Greedy decoding with the backend's own API, not the engine's: per prompt, forward pass, then fill the
    mask, apply it, take the best token, accept it."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch
    import xgrammar
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from evalpipe import constraints

    constraint = constraints.load_constraint(suite)
    assert constraint is not None
    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModelForCausalLM.from_pretrained(model).eval()
    width = int(network.get_output_embeddings().weight.shape[0])
    mask_width = max(width, len(tokenizer))
    eos = tokenizer.eos_token_id
    if backend == "guidance":
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=mask_width, eos_token=[eos])
        template = llguidance.LLMatcher(lltok, constraints.llguidance_grammar(constraint), log_level=0)
    else:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=mask_width, stop_token_ids=[eos])
        compiled = constraints.xgrammar_compiled(constraint, xgrammar.GrammarCompiler(info))
    outputs = []
    for task in FUNCTION_TASKS:
        ids = list(tokenizer(task.prompt)["input_ids"])
        matcher: Any = template.deep_copy() if backend == "guidance" else xgrammar.GrammarMatcher(compiled)
        bitmask = torch.full((1, (mask_width + 31) // 32), -1, dtype=torch.int32)
        cache, out = DynamicCache(), []
        step_ids = torch.tensor([ids])
        with torch.inference_mode():
            while len(out) < 40:
                seen = len(ids) + len(out)
                logits = (
                    network(
                        input_ids=step_ids,
                        attention_mask=torch.ones(1, seen, dtype=torch.long),
                        position_ids=torch.arange(seen - step_ids.shape[1], seen).unsqueeze(0),
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    .logits[:, -1, :width]
                    .float()
                )
                if backend == "guidance":
                    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
                    accept = matcher.consume_token
                else:
                    matcher.fill_next_token_bitmask(bitmask, 0)
                    accept = matcher.accept_token
                xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, backend="cpu")
                token = int(logits.argmax(dim=-1).item())
                assert accept(token)
                out.append(token)
                if token == eos:
                    break
                step_ids = torch.tensor([[token]])
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_overlapped_masks_keep_greedy_output_at_every_batch_size(
    tmp_path: Path, model_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two mask threads and the decoding thread race for the rows (the default on a 2-core host is none).
    monkeypatch.setenv("EVALPIPE_MASK_THREADS", "2")
    suite = tiny_suite(
        tmp_path / "python",
        lark=(GRAMMARS / "python_body.lark").read_text(),
        gbnf=(GRAMMARS / "python_body.gbnf").read_text(),
    )
    by_batch = {size: greedy_ids(suite, model_dir, backend, size) for size in (1, 3, 8)}
    assert by_batch[1] == by_batch[3] == by_batch[8]
    assert by_batch[1] == serial_greedy_ids(suite, model_dir, backend)
    assert len({tuple(ids) for ids in by_batch[1]}) > 1  # prompts change the output: the test means something
    assert any(len(ids) > 10 for ids in by_batch[1])  # masks at many steps, not just the first


def test_close_stops_the_mask_threads(suite: Suite, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv("EVALPIPE_MASK_THREADS", "1")

    def mask_threads() -> int:
        return sum(thread.name == "evalpipe-masks" for thread in threading.enumerate())

    before = mask_threads()
    engine = HFEngine(config("guidance"), suite, str(model_dir), "guidance", batch_size=2)
    list(engine.generate(engine.plan(TASKS)))
    assert mask_threads() > before  # kept from batch to batch
    engine.close()
    assert mask_threads() == before
