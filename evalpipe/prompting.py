"""What every generating engine sends: the prompt (raw text or a chat conversation) and per-sample seeds.

Stdlib only, so that the HTTP engine (`openai`) and the vLLM engine can use it without importing torch. How a
completion ends and what of it is executed and checked is `evalpipe.completion`'s.
"""

from __future__ import annotations

import hashlib

from evalpipe.records import Task
from evalpipe.suites import Suite

CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, signature included, "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
"""The default user message for `prompt.format = "chat"`; the reply redefines the prompt's function."""


def instruction(suite: Suite) -> str:
    """The suite's chat instruction (`prompt.instruction`, where the suite has one), else the default."""
    custom = getattr(suite.prompt, "instruction", None)
    return custom if isinstance(custom, str) and custom else CHAT_INSTRUCTION


def chat_messages(suite: Suite, task: Task) -> list[dict[str, str]]:
    """The conversation for a chat prompt: one user message.

    `{prompt}` is replaced textually, not with `str.format`: instructions that show JSON have braces.
    """
    return [{"role": "user", "content": instruction(suite).replace("{prompt}", task.prompt)}]


def sample_seed(seed: int, task_id: str, index: int) -> int:
    """A per-sample seed: a sample draws the same tokens whatever batch or request order it lands in."""
    digest = hashlib.sha256(f"{seed}/{task_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
