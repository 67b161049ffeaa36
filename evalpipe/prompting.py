"""What every generating engine does the same way: the prompt it sends and the completion it keeps.

Stdlib only, so that the HTTP engine (`openai`) and the vLLM engine can use it without importing torch. The
`hf` engine has its own copies of `CHAT_INSTRUCTION`, `code_block`, `cut_at_stop` and `sample_seed`
(tests/unit/test_openai_engine.py checks that they agree); they can move here.

Extraction (`extract_completion`) decides `Generation.text`, the code that is executed, from
`Generation.raw_text`, what the model returned:

- `prompt.extract = "json:FIELD"` (structured-output suites such as `humaneval_json`): the raw text is a JSON
  object and its string field FIELD is the code (the contents of a code fence inside it, where it has one).
  Where the raw text is not such an object the raw text itself is kept, so that the sample fails as the
  invalid output it is (it does not parse as Python either), and the reason is the Generation's `error`.
- `prompt.format = "chat"`: the first fenced code block of the reply.
- raw prompts without a constraint: the text up to the first stop sequence.
- raw prompts under a constraint: the text as is; the grammar decided where it ends.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from evalpipe.errors import UserError
from evalpipe.records import Task
from evalpipe.suites import Suite

CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, signature included, "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
"""The default user message for `prompt.format = "chat"`; the reply redefines the prompt's function."""

_CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def instruction(suite: Suite) -> str:
    """The suite's chat instruction (`prompt.instruction`, where the suite has one), else the default."""
    custom = getattr(suite.prompt, "instruction", None)
    return custom if isinstance(custom, str) and custom else CHAT_INSTRUCTION


def chat_messages(suite: Suite, task: Task) -> list[dict[str, str]]:
    """The conversation for a chat prompt: one user message.

    `{prompt}` is replaced textually, not with `str.format`: instructions that show JSON have braces.
    """
    return [{"role": "user", "content": instruction(suite).replace("{prompt}", task.prompt)}]


def extract_rule(suite: Suite) -> str | None:
    """The suite's `prompt.extract` rule, where the suite has one."""
    rule = getattr(suite.prompt, "extract", None)
    return rule if isinstance(rule, str) and rule else None


def code_block(text: str) -> str:
    """The contents of the first fenced code block (an unclosed fence runs to the end); else the text."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else text


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop sequence (not included)."""
    cut = len(text)
    for stop in stops:
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


def json_field(text: str, field: str) -> str | None:
    """The string value of `field` in the JSON object `text`, or None where there is no such value."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get(field), str):
        return str(value[field])
    return None


def extract_completion(suite: Suite, raw: str, *, constrained: bool) -> tuple[str, str | None]:
    """(the completion to execute, why extraction failed or None); see the module docstring."""
    rule = extract_rule(suite)
    if rule is not None:
        kind, _, field = rule.partition(":")
        if kind != "json" or not field:
            return raw, f"unknown extraction rule {rule!r} (known: json:FIELD)"
        found = json_field(raw, field)
        if found is None:
            return raw, f"the output is not a JSON object with a string field {field!r}"
        return code_block(found), None
    if suite.prompt.format == "chat":
        return code_block(raw), None
    if not constrained:
        return cut_at_stop(raw, suite.prompt.stop), None
    return raw, None


def check_suite(suite: Suite) -> None:
    """Refuse a suite whose output could never be executed as it is: JSON-constrained output needs a
    `prompt.extract` rule that takes the code out of it."""
    if (
        suite.constraint is not None
        and suite.constraint.kind == "json_schema"
        and extract_rule(suite) is None
    ):
        raise UserError(
            f"suite {suite.name!r} constrains the output to JSON but has no prompt.extract rule "
            '(e.g. extract = "json:code"): its completions would be executed as JSON'
        )


def sample_seed(seed: int, task_id: str, index: int) -> int:
    """A per-sample seed: a sample draws the same tokens whatever batch or request order it lands in."""
    digest = hashlib.sha256(f"{seed}/{task_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
