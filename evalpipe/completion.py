"""How a completion ends and what of it counts: the one rule every engine and every arm follows.

A fair comparison of decoding methods needs two arms that differ only in the constraint. So the constrained
and the unconstrained arm of a suite end the same way, and the same part of their output is executed and
checked:

- **Ending.** Every engine sends the suite's stop sequences (`prompt.stop`, from `stop_sequences`) in every
  arm, constrained ones too, and asks for them to be kept in the output (vLLM's `include_stop_str_in_output`)
  so that the output shows where it ended. A completion ends at the first stop sequence, at EOS, or at max
  tokens. The constraint lets a constrained completion end at the same place: the `humaneval` grammar accepts
  the function body followed by the start of a top-level line (a stop sequence without its newline) and
  then only EOS.
- **A stop sequence at the very start counts.** A raw prompt ends with a newline, so a completion that starts
  with `def f` has met `"\\ndef "` at its first character (`find_stop` looks at the prompt's last character).
- **What is executed** (`Completion.code`): for raw prompts, the text up to the first stop sequence, keeping
  the newline the stop sequence starts with (the body's last line ends with it, as the grammar requires); for
  chat prompts, the first fenced code block (its closing fence starts a line, as in Markdown); for
  `prompt.extract = "json:FIELD"`, that JSON field.
- **Chat replies end at the block's closing fence** (`humaneval_chat`: stop sequence `"\n```\n"`). A reply
  that opens with its fence has no newline before it, so only a closing fence matches; the grammar keeps the
  stop sequence out of the block, and lets a constrained reply write it and then only end.
- **Reasoning first** (chat prompts): a reply that opens with a reasoning block, `<think>` ... `</think>`
  (`REASONING`), is judged on the answer after it, as vLLM's structured outputs do with a reasoning parser:
  stop sequences are looked for, the code is taken and the constraint is checked in the answer only. The
  reasoning stays in the raw text and is never executed (`Completion.reasoning`); a block that never closes
  leaves no answer. Engines keep stop sequences and the grammar out of the reasoning (the hf engine starts
  its matcher after `</think>`).
- **What the constraint is checked on** (`Completion.checked`): the text up to the end of the first stop
  sequence (the stop sequence included), i.e. exactly what a constrained arm produces when it ends there, so
  an unconstrained output is judged by the same standard as a constrained one.
- **Finish reasons** are one vocabulary (`records.FinishReason`): `stop` (the completion ended on its own: EOS
  or a stop sequence, whatever the backend), `length` (max tokens), `timeout`, `error`, `replayed`.

Stdlib only (the constraint check is imported when used), so HTTP engines need no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evalpipe.errors import UserError
from evalpipe.records import Task
from evalpipe.suites import Suite

if TYPE_CHECKING:
    from evalpipe.constraints import Constraint

_CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:(?<=\n)```|\Z)", re.DOTALL)

REASONING = ("<think>", "</think>")
"""How a reasoning block opens and closes (DeepSeek-R1, QwQ, Qwen3 and the vLLM parsers for them)."""


@dataclass(frozen=True)
class StopMatch:
    """Where the first stop sequence is in a completion (offsets in the completion's text)."""

    stop: str
    code_end: int
    """Where the executed code ends: the stop sequence's start, after the newline it begins with."""
    end: int
    """Where the stop sequence ends: the completion ends here."""


@dataclass(frozen=True)
class Completion:
    """What a model's output becomes: the code to execute and the text the constraint is checked on."""

    code: str
    checked: str
    stop: str | None
    """The stop sequence that ended the output, if one did."""
    error: str | None = None
    """Why the code could not be extracted, if it could not."""
    reasoning: str | None = None
    """The reasoning block the reply opened with (`<think>` and `</think>` included), if it had one."""


def stop_sequences(suite: Suite) -> tuple[str, ...]:
    """The stop sequences every arm's requests carry (chat and JSON suites have none)."""
    return tuple(suite.prompt.stop)


def lead_of(suite: Suite, task: Task) -> str:
    """The prompt's last character where a stop sequence may begin with it (raw prompts end with a newline),
    so that a stop sequence at the completion's very start is found."""
    if suite.prompt.format == "raw" and task.prompt.endswith("\n"):
        return "\n"
    return ""


def find_stop(text: str, stops: Sequence[str], lead: str = "") -> StopMatch | None:
    """The earliest stop sequence in `lead + text` (a tie goes to the longest), in `text`'s offsets."""
    if not stops:
        return None
    haystack = lead + text
    best: tuple[int, int, str] | None = None
    for stop in stops:
        found = haystack.find(stop)
        if found != -1 and (best is None or (found, -len(stop)) < (best[0], -best[1])):
            best = (found, len(stop), stop)
    if best is None:
        return None
    found, length, stop = best
    start = found - len(lead)
    # The newline a stop sequence begins with ends the body's last line: it belongs to the code.
    code_end = max(0, start + 1 if stop.startswith("\n") else start)
    return StopMatch(stop=stop, code_end=code_end, end=start + length)


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(the reasoning block, the answer after it) of a chat reply. A reply that does not open with `<think>`
    has no reasoning: (None, text). One whose block never closes has no answer: (text,
    None)."""
    start, end = REASONING
    if not text.startswith(start):
        return None, text
    closed = text.find(end)
    if closed == -1:
        return text, None
    return text[: closed + len(end)], text[closed + len(end) :]


def reasoning_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of `<think>` and `</think>` in a Hugging Face tokenizer where its vocabulary has each as one
    token (as vLLM's reasoning parsers require), else None: only such a model is taken to reason first."""
    ids = []
    for marker in REASONING:
        token = tokenizer.convert_tokens_to_ids(marker)
        one_token = list(tokenizer.encode(marker, add_special_tokens=False)) == [token]
        if not isinstance(token, int) or token == tokenizer.unk_token_id or not one_token:
            return None
        ids.append(token)
    return ids[0], ids[1]


def reasoning_length(token_ids: Sequence[int], ids: tuple[int, int] | None) -> int | None:
    """How many of an output's tokens are the reasoning block it opens with (both markers included; an
    unclosed block is all of it), or None where it opens with none."""
    if ids is None or not token_ids or token_ids[0] != ids[0]:
        return None
    end = ids[1]
    for index, token in enumerate(token_ids):
        if token == end:
            return index + 1
    return len(token_ids)


def code_block(text: str) -> str:
    """The contents of the first fenced code block, up to a closing fence at the start of a line (an unclosed
    fence runs to the end); else the text."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else text


def json_field(text: str, field: str) -> str | None:
    """The string value of `field` in the JSON object `text`, or None where there is no such value."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get(field), str):
        return str(value[field])
    return None


def extract_rule(suite: Suite) -> str | None:
    """The suite's `prompt.extract` rule, where the suite has one."""
    rule = suite.prompt.extract
    return rule if rule else None


def complete(suite: Suite, task: Task, raw: str) -> Completion:
    """What `raw` (the engine's output, untouched) becomes under the suite's rule: the same in every arm."""
    reasoning: str | None = None
    answer = raw
    if suite.prompt.format == "chat":
        reasoning, after = split_reasoning(raw)
        if after is None:
            return Completion("", "", None, f"the reasoning block never ended (no {REASONING[1]})", reasoning)
        answer = after
    match = find_stop(answer, stop_sequences(suite), lead_of(suite, task))
    ended = answer if match is None else answer[: match.end]
    stop = None if match is None else match.stop
    rule = extract_rule(suite)
    if rule is not None:
        kind, _, field = rule.partition(":")
        if kind != "json" or not field:
            error = f"unknown extraction rule {rule!r} (known: json:FIELD)"
            return Completion(ended, ended, stop, error, reasoning)
        found = json_field(ended, field)
        if found is None:
            error = f"the output is not a JSON object with a string field {field!r}"
            return Completion(ended, ended, stop, error, reasoning)
        return Completion(code_block(found), ended, stop, None, reasoning)
    if suite.prompt.format == "chat":
        return Completion(code_block(ended), ended, stop, None, reasoning)
    return Completion(answer if match is None else answer[: match.code_end], ended, stop)


def constraint_satisfied(constraint: Constraint | None, completion: Completion) -> bool | None:
    """Whether the completion satisfies the constraint, checked apart from any backend (None: none)."""
    if constraint is None:
        return None
    from evalpipe.constraints import satisfies

    return satisfies(constraint, completion.checked)


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
