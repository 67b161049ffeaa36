"""How a completion ends and what of it counts (`evalpipe.completion`): one rule for every engine and arm."""

from __future__ import annotations

import pytest

from evalpipe.completion import (
    code_block,
    complete,
    constraint_satisfied,
    find_stop,
    reasoning_length,
    split_reasoning,
    stop_sequences,
)
from evalpipe.constraints import load_constraint
from evalpipe.records import Task
from evalpipe.sources import load_humaneval
from evalpipe.suites import PromptSpec, Suite, load_suite

HUMANEVAL = load_suite("humaneval")
TASK = Task(id="T/0", prompt='def f(x):\n    """Double."""\n', entry_point="f", test="")


def test_the_suite_stop_sequences_go_to_every_arm() -> None:
    assert stop_sequences(HUMANEVAL) == HUMANEVAL.prompt.stop
    assert "\ndef " in stop_sequences(HUMANEVAL)
    assert stop_sequences(load_suite("humaneval_json")) == ()


@pytest.mark.parametrize(
    ("raw", "code", "checked", "stop"),
    [
        # a top-level def ends it: the code keeps the body's last newline, the check sees the stop sequence
        ("    return 2 * x\ndef g():\n    pass\n", "    return 2 * x\n", "    return 2 * x\ndef ", "\ndef "),
        ("    return 2 * x\n\n\nif __name__ == 1:\n", "    return 2 * x\n\n\n", None, "\nif __name__"),
        ("    return 2 * x\n# tests\n", "    return 2 * x\n", "    return 2 * x\n#", "\n#"),
        # EOS or max tokens: nothing is cut
        ("    return 2 * x\n", "    return 2 * x\n", "    return 2 * x\n", None),
        ("    return 2 *", "    return 2 *", "    return 2 *", None),
        # a stop sequence at the very start counts: the prompt ends with a newline
        ("def g():\n    pass\n", "", "def ", "\ndef "),
        ("#!\n    return x\n", "", "#", "\n#"),
        # the earliest stop sequence wins
        ("    y = 1\nprint(y)\ndef h(): pass\n", "    y = 1\n", "    y = 1\nprint(", "\nprint("),
    ],
)
def test_raw_prompts_end_at_the_first_stop_sequence(
    raw: str, code: str, checked: str | None, stop: str | None
) -> None:
    ending = complete(HUMANEVAL, TASK, raw)
    assert (ending.code, ending.stop, ending.error) == (code, stop, None)
    if checked is not None:
        assert ending.checked == checked


def test_a_stop_sequence_at_the_start_needs_the_prompts_newline() -> None:
    no_newline = TASK.model_copy(update={"prompt": "def f(x): return"})
    assert complete(HUMANEVAL, no_newline, "def g(): pass").stop is None
    assert find_stop("def g", ["\ndef "], lead="\n") is not None
    assert find_stop("def g", ["\ndef "]) is None


def test_find_stop_prefers_the_earliest_then_the_longest() -> None:
    match = find_stop("ab\nxyz", ["\nx", "\nxy", "z"])
    assert match is not None and (match.stop, match.code_end, match.end) == ("\nxy", 3, 5)


def test_chat_and_json_suites_extract_their_code() -> None:
    chat = Suite(name="c", prompt=PromptSpec(format="chat"), path="/x/c.toml")
    ending = complete(chat, TASK, "Sure:\n```python\ndef f():\n    pass\n```\nbye")
    assert ending.code == "def f():\n    pass\n" and ending.checked.endswith("bye")
    json_suite = load_suite("humaneval_json")
    good = complete(json_suite, TASK, '{"code": "def f(x):\\n    return 2 * x\\n"}')
    assert good.code == "def f(x):\n    return 2 * x\n" and good.error is None
    bad = complete(json_suite, TASK, '{"code": "de')
    assert bad.code == '{"code": "de' and bad.error is not None and "not a JSON object" in bad.error
    for text in ("a\n```py\nb\n```\nc", "no fence", "```\nopen"):
        assert code_block(text) in text


def test_both_arms_are_checked_on_the_same_text() -> None:
    """An unconstrained completion that writes a valid body and then a new top-level def satisfies the grammar
    exactly as a constrained one that ended there does; the code executed is the same."""
    constraint = load_constraint(HUMANEVAL)
    tasks, _ = load_humaneval()
    task = tasks[0]
    body = task.canonical_solution or ""
    free = complete(HUMANEVAL, task, body + "\n\ndef check(candidate):\n    pass\n")
    constrained = complete(HUMANEVAL, task, body + "\n\ndef ")
    assert free.code == constrained.code == body + "\n\n"
    assert constraint_satisfied(constraint, free) is True
    assert constraint_satisfied(constraint, constrained) is True
    cut = complete(HUMANEVAL, task, body[: len(body) // 2])  # max tokens mid-statement
    assert constraint_satisfied(constraint, cut) is False
    assert constraint_satisfied(None, cut) is None


CHAT = load_suite("humaneval_chat")
BLOCK = "```python\ndef f(x):\n    return 2 * x\n```"


@pytest.mark.parametrize(
    ("raw", "checked", "stop"),
    [
        # the closing fence ends the reply; what follows it is cut, in every arm
        (BLOCK + "\nThis doubles x.\n", BLOCK + "\n", "\n```\n"),
        (BLOCK, BLOCK, None),  # EOS right after the fence
        # an opening fence after prose names its language: only the closing fence matches
        ("Here:\n" + BLOCK + "\n", "Here:\n" + BLOCK + "\n", "\n```\n"),
    ],
)
def test_chat_replies_end_at_the_closing_fence(raw: str, checked: str, stop: str | None) -> None:
    ending = complete(CHAT, TASK, raw)
    assert (ending.code, ending.checked, ending.stop, ending.error) == (
        "def f(x):\n    return 2 * x\n",
        checked,
        stop,
        None,
    )


def test_both_chat_arms_are_checked_on_the_same_text() -> None:
    constraint = load_constraint(CHAT)
    free = complete(CHAT, TASK, BLOCK + "\n\nExplanation: it doubles.")
    constrained = complete(CHAT, TASK, BLOCK + "\n")
    assert free.checked == constrained.checked and free.code == constrained.code
    assert constraint_satisfied(constraint, free) is constraint_satisfied(constraint, constrained) is True
    prose = complete(CHAT, TASK, "Sure!\n" + BLOCK)
    assert prose.code == free.code and constraint_satisfied(constraint, prose) is False


def test_a_closing_fence_starts_a_line() -> None:
    assert code_block('```python\ns = "```"\nt = 1\n```\n') == 's = "```"\nt = 1\n'
    assert code_block("```python\nx = 1\n```") == "x = 1\n"
    assert code_block("```python\n```") == ""


def test_a_reasoning_block_is_kept_out_of_the_answer() -> None:
    constraint = load_constraint(CHAT)
    thought = "<think>Maybe:\n```\nreturn x\n```\n</think>"
    ending = complete(CHAT, TASK, thought + "\n\n" + BLOCK + "\nbye")
    assert ending.reasoning == thought
    assert ending.code == "def f(x):\n    return 2 * x\n"  # not the code in the reasoning
    assert ending.checked == "\n\n" + BLOCK + "\n" and ending.stop == "\n```\n"
    assert constraint_satisfied(constraint, ending) is True
    unended = complete(CHAT, TASK, "<think>still thinking")
    assert unended.code == "" and unended.error is not None and "</think>" in unended.error
    assert constraint_satisfied(constraint, unended) is False
    assert split_reasoning(" <think>x</think>y") == (None, " <think>x</think>y")  # only at the very start
    assert complete(HUMANEVAL, TASK, "<think>x</think>    return 1\n").reasoning is None  # raw prompts


def test_reasoning_length_counts_the_leading_block_in_tokens() -> None:
    ids = (7, 8)  # <think>, </think>
    assert reasoning_length([7, 1, 2, 8, 3, 4], ids) == 4
    assert reasoning_length([7, 1, 2], ids) == 3  # never closed: all of it
    assert reasoning_length([1, 7, 8], ids) is None  # a block only counts at the start
    assert reasoning_length([7, 8], None) is None and reasoning_length([], ids) is None
