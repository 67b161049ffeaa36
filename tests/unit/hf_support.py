"""Helpers for the engine tests and benchmarks: a tiny grammar and suites that use it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from evalpipe.suites import ConstraintSpec, PromptSpec, Suite

TINY_LARK = 'start: stmt{1,3}\nstmt: NAME " = " NUM "\\n"\nNAME: /[a-z]{1,4}/\nNUM: /[0-9]{1,3}/\n'
"""One to three lines `name = number`: finite, so even a random model must reach EOS within ~36 tokens."""
TINY_GBNF = 'root ::= stmt stmt? stmt?\nstmt ::= [a-z]{1,4} " = " [0-9]{1,3} "\\n"\n'
TINY_REGEX = re.compile(r"(?:[a-z]{1,4} = [0-9]{1,3}\n){1,3}")
"""The same language as a Python regex: the tests' own check, independent of both backends."""


def tiny_suite(
    folder: Path, *, lark: str | None = TINY_LARK, gbnf: str | None = TINY_GBNF, **prompt: Any
) -> Suite:
    """A suite constrained by the tiny grammar (or the texts given); its files are written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, str] = {}
    if lark is not None:
        (folder / "g.lark").write_text(lark)
        spec["lark"] = "g.lark"
    if gbnf is not None:
        (folder / "g.gbnf").write_text(gbnf)
        spec["gbnf"] = "g.gbnf"
    return Suite(
        name="tiny",
        prompt=PromptSpec(**prompt),
        constraint=ConstraintSpec(kind="grammar", **spec),
        path=str(folder / "tiny.toml"),
    )
