"""Constraints: what a structured-output backend enforces for a suite, loaded from the suite's files.

A suite names its constraint files (`[constraint]` in `tasks/NAME.toml`): a grammar in llguidance's Lark
dialect with its GBNF twin for XGrammar, a JSON schema, or a regex. This module is the one place that turns
them into what each backend takes, validates them before a run starts, and checks generated text against them
apart from the backend that produced it (`satisfies`).

llguidance and XGrammar are imported inside the functions that need them: loading a constraint and hashing
its files costs nothing, so replay engines and `evalpipe show` never pay for the grammar stack.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, Literal

from evalpipe.errors import UserError
from evalpipe.records import Record

if TYPE_CHECKING:
    import llguidance
    import xgrammar

    from evalpipe.suites import Suite

ConstraintKind = Literal["grammar", "json_schema", "regex"]
KINDS: tuple[str, ...] = ("grammar", "json_schema", "regex")
FILE_FIELDS: tuple[str, ...] = ("lark", "gbnf", "json_schema", "regex")
"""The constraint spec's fields that name files, in the order they are read."""


class Constraint(Record):
    """A suite's constraint, with the texts of its files and their sha256 (recorded in the manifest)."""

    kind: ConstraintKind
    lark: str | None = None
    """Grammar in llguidance's Lark dialect (backend `guidance`; XGrammar takes it too)."""
    gbnf: str | None = None
    """The same grammar as GBNF/EBNF, root rule `root` (backend `xgrammar`)."""
    json_schema: str | None = None
    """A JSON schema, as text."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    sha256: dict[str, str]
    """File field (`lark`, `gbnf`, ...) → sha256 of its text."""


def load_constraint(suite: Suite) -> Constraint | None:
    """The suite's constraint with its files read, or None when the suite has none."""
    spec = suite.constraint
    if spec is None:
        return None
    if spec.kind not in KINDS:
        known = ", ".join(KINDS)
        raise UserError(f"suite {suite.name!r}: unknown constraint kind {spec.kind!r}; known: {known}")
    texts: dict[str, str] = {}
    for field in FILE_FIELDS:
        relative = getattr(spec, field)
        if relative is None:
            continue
        path = suite.resolve(relative)
        try:
            texts[field] = path.read_text(encoding="utf-8")
        except OSError as error:
            raise UserError(f"suite {suite.name!r}: constraint file {path} cannot be read: {error}") from None
    needed = {"grammar": ("lark", "gbnf"), "json_schema": ("json_schema",), "regex": ("regex",)}[spec.kind]
    if not any(field in texts for field in needed):
        raise UserError(f"suite {suite.name!r}: a {spec.kind} constraint needs a {' or '.join(needed)} file")
    if spec.kind == "regex":
        # A regex file holds one pattern; the newline an editor adds at its end is not part of it.
        texts["regex"] = texts["regex"].rstrip("\n")
    if "json_schema" in texts:
        _schema_object(texts["json_schema"], suite.name)
    sha = {field: hashlib.sha256(text.encode()).hexdigest() for field, text in texts.items()}
    return Constraint(kind=spec.kind, sha256=sha, **texts)


def _schema_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: the JSON schema is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: the JSON schema is not a JSON object")
    return value


# -- what each backend takes ---------------------------------------------------------------------------------
def llguidance_grammar(constraint: Constraint) -> str:
    """The constraint as llguidance's serialised grammar (what `LLMatcher` takes). Not validated here."""
    import llguidance

    if constraint.kind == "grammar":
        if constraint.lark is not None:
            return str(llguidance.grammar_from("lark", constraint.lark))
        return str(llguidance.grammar_from("grammar", constraint.gbnf or ""))
    if constraint.kind == "json_schema":
        return str(llguidance.LLMatcher.grammar_from_json_schema(constraint.json_schema or "{}"))
    return str(llguidance.LLMatcher.grammar_from_regex(constraint.regex or ""))


def xgrammar_grammar(constraint: Constraint) -> xgrammar.Grammar:
    """The constraint as an XGrammar `Grammar` (raises RuntimeError where XGrammar rejects it)."""
    import xgrammar

    if constraint.kind == "grammar":
        if constraint.gbnf is not None:
            return xgrammar.Grammar.from_ebnf(constraint.gbnf)
        return xgrammar.Grammar.from_lark(constraint.lark or "")
    if constraint.kind == "json_schema":
        return xgrammar.Grammar.from_json_schema(constraint.json_schema or "{}")
    return xgrammar.Grammar.from_regex(constraint.regex or "")


def xgrammar_compiled(constraint: Constraint, compiler: xgrammar.GrammarCompiler) -> xgrammar.CompiledGrammar:
    """The constraint compiled against `compiler`'s tokenizer: the expensive step, done once per replica."""
    if constraint.kind == "json_schema":
        return compiler.compile_json_schema(constraint.json_schema or "{}")
    if constraint.kind == "regex":
        return compiler.compile_regex(constraint.regex or "")
    return compiler.compile_grammar(xgrammar_grammar(constraint))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no details given"


def validate(constraint: Constraint, backend: str) -> None:
    """Raise a one-line `UserError` naming the backend when it would reject the constraint.

    Called before a run starts, so that a bad grammar never costs a model load. The message keeps the
    backend's own words, which name the line and column.
    """
    if backend == "guidance":
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(llguidance_grammar(constraint))
        if error:
            raise UserError(f"backend 'guidance' rejects the {constraint.kind}: {_first_line(error)}")
    elif backend == "xgrammar":
        try:
            xgrammar_grammar(constraint)
        except (RuntimeError, ValueError) as error:
            reason = _first_line(str(error))
            raise UserError(f"backend 'xgrammar' rejects the {constraint.kind}: {reason}") from None


# -- the independent check -----------------------------------------------------------------------------------
def satisfies(constraint: Constraint, text: str) -> bool:
    """Whether `text` (the whole raw output) satisfies the constraint, checked apart from the backend.

    JSON schemas are checked with `jsonschema` on the parsed value and regexes with Python's `re`: neither
    shares code with a backend. Grammars are checked byte by byte by llguidance's matcher on the finished text
    (no model tokenizer involved), so a tokenizer-boundary bug or an XGrammar mask bug shows up here, and so
    does an unconstrained (`none`) output that strays from the grammar.
    """
    if constraint.kind == "json_schema":
        return _satisfies_schema(constraint.json_schema or "{}", text)
    if constraint.kind == "regex":
        return re.fullmatch(constraint.regex or "", text, flags=re.DOTALL) is not None
    matcher = _byte_matcher(llguidance_grammar(constraint)).deep_copy()
    tokenizer = _byte_tokenizer()
    if not matcher.consume_tokens(tokenizer.tokenize_bytes(text.encode("utf-8"))):
        return False
    return not matcher.is_error() and bool(matcher.is_accepting())


def _satisfies_schema(schema_text: str, text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    validator = _schema_validator(schema_text)
    return bool(validator.is_valid(value))


@functools.cache
def _schema_validator(schema_text: str) -> Any:
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


@functools.cache
def _byte_tokenizer() -> llguidance.LLTokenizer:
    import llguidance

    return llguidance.LLTokenizer("byte")


@functools.cache
def _byte_matcher(grammar: str) -> llguidance.LLMatcher:
    """A matcher in its start state, compiled once per grammar; callers take deep copies."""
    import llguidance

    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    if matcher.is_error():
        raise UserError(f"backend 'guidance' rejects the grammar: {_first_line(matcher.get_error())}")
    return matcher
