"""Constraints: loading a suite's files, validating them per backend, and the backend-independent check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_support import TINY_GBNF, TINY_LARK, tiny_suite

from evalpipe.constraints import load_constraint, satisfies, validate, xgrammar_grammar
from evalpipe.errors import UserError
from evalpipe.suites import ConstraintSpec, Suite, load_suite


def _suite(folder: Path, **files: str) -> Suite:
    spec: dict[str, str] = {}
    for field, text in files.items():
        if field == "kind":
            continue
        (folder / f"c.{field}").write_text(text)
        spec[field] = f"c.{field}"
    return Suite(name="s", constraint=ConstraintSpec(kind=files["kind"], **spec), path=str(folder / "s.toml"))


def test_a_grammar_constraint_carries_both_texts_and_their_hashes(tmp_path: Path) -> None:
    constraint = load_constraint(tiny_suite(tmp_path))
    assert constraint is not None and constraint.kind == "grammar"
    assert constraint.lark == TINY_LARK and constraint.gbnf == TINY_GBNF
    assert set(constraint.sha256) == {"lark", "gbnf"} and len(constraint.sha256["lark"]) == 64


@pytest.mark.parametrize("only", ["lark", "gbnf"])
def test_both_dialects_define_the_same_tiny_language(tmp_path: Path, only: str) -> None:
    texts = {"lark": TINY_LARK, "gbnf": None} if only == "lark" else {"lark": None, "gbnf": TINY_GBNF}
    constraint = load_constraint(tiny_suite(tmp_path, **texts))
    assert constraint is not None
    for backend in ("guidance", "xgrammar"):
        validate(constraint, backend)
    assert satisfies(constraint, "ab = 12\nx = 3\n")
    assert not satisfies(constraint, "ab = 12\n\n")
    assert not satisfies(constraint, "ab = 12")  # incomplete: the grammar has not ended
    assert not satisfies(constraint, "a = 1\n" * 4)  # more lines than the grammar allows


def test_a_suite_without_a_constraint_has_none() -> None:
    assert load_constraint(Suite(name="plain")) is None


def test_the_shipped_suites_constraints_load_and_validate() -> None:
    for name in ("humaneval", "humaneval_json"):
        constraint = load_constraint(load_suite(name))
        assert constraint is not None
        for backend in ("guidance", "xgrammar"):
            validate(constraint, backend)


def test_json_schema_outputs_are_checked_with_jsonschema(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
    constraint = load_constraint(_suite(tmp_path, kind="json_schema", json_schema=json.dumps(schema)))
    assert constraint is not None
    assert satisfies(constraint, '{"code": "return 1"}')
    assert not satisfies(constraint, '{"code": 1}')
    assert not satisfies(constraint, '{"cod": "x"}')
    assert not satisfies(constraint, '{"code": "x"')  # cut short
    xgrammar_grammar(constraint)  # XGrammar takes the schema


def test_regex_outputs_must_match_whole(tmp_path: Path) -> None:
    constraint = load_constraint(_suite(tmp_path, kind="regex", regex="[0-9]+(\\.[0-9]+)?\n"))
    assert (
        constraint is not None and constraint.regex == "[0-9]+(\\.[0-9]+)?"
    )  # the file's newline is not in it
    assert satisfies(constraint, "3.14") and not satisfies(constraint, "3.14 ")
    validate(constraint, "guidance")
    validate(constraint, "xgrammar")


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_a_grammar_a_backend_rejects_is_one_line_naming_the_backend(tmp_path: Path, backend: str) -> None:
    broken = {"lark": "start: item+\nitem: UNDEFINED\n", "gbnf": None}
    if backend == "xgrammar":
        broken = {"lark": None, "gbnf": 'root ::= item+\nitem ::= "a" undefined_rule\n'}
    constraint = load_constraint(tiny_suite(tmp_path, **broken))
    assert constraint is not None
    with pytest.raises(UserError, match=f"^backend '{backend}' rejects the grammar: ") as raised:
        validate(constraint, backend)
    assert "\n" not in str(raised.value)


def test_bad_constraint_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot be read"):
        load_constraint(
            Suite(
                name="s",
                constraint=ConstraintSpec(kind="grammar", lark="missing.lark"),
                path=str(tmp_path / "s"),
            )
        )
    with pytest.raises(UserError, match="not valid JSON"):
        load_constraint(_suite(tmp_path, kind="json_schema", json_schema="{nope"))
    with pytest.raises(UserError, match="unknown constraint kind 'ebnf'"):
        load_constraint(_suite(tmp_path, kind="ebnf", gbnf=TINY_GBNF))
    with pytest.raises(UserError, match="needs a lark or gbnf file"):
        load_constraint(_suite(tmp_path, kind="grammar", regex="a"))
