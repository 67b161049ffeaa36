"""Names → implementations, imported lazily so that heavy dependencies load only when used.

Third-party plugins register under the entry-point groups `evalpipe.engines`, `evalpipe.sandboxes` and
`evalpipe.sources` with a `module:attribute` value, exactly like the built-ins below.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Literal

from evalpipe.errors import UserError

Kind = Literal["engine", "sandbox", "source"]

_BUILTIN: dict[Kind, dict[str, str]] = {
    "engine": {
        "reference": "evalpipe.engines.replay:ReferenceEngine",
        "samples": "evalpipe.engines.replay:SamplesEngine",
        "hf": "evalpipe.engines.hf:HFEngine",
        "vllm": "evalpipe.engines.vllm:VLLMEngine",
        "openai": "evalpipe.engines.openai:OpenAIEngine",
        # The test-only `scripted` engine is not here: the tests and benchmarks register it as a plugin
        # (tests/plugins/, an entry point in group `evalpipe.engines`), the way users' engines register.
    },
    "sandbox": {
        "process": "evalpipe.sandbox.process:ProcessSandbox",
        "docker": "evalpipe.sandbox.docker:DockerSandbox",
    },
    "source": {
        "humaneval": "evalpipe.sources:load_humaneval",
        "jsonl": "evalpipe.sources:load_jsonl",
    },
}

BACKENDS: tuple[str, ...] = ("none", "guidance", "xgrammar", "outlines", "auto")
"""Structured-output backends, named as vLLM names them."""


def names(kind: Kind) -> dict[str, str]:
    """All registered names of a kind, built-ins first, then plugins."""
    found = dict(_BUILTIN[kind])
    for entry in entry_points(group=f"evalpipe.{kind}s"):
        found.setdefault(entry.name, entry.value)
    return found


def unknown(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UserError:
    """The error for an unknown name, with a suggestion when one is close."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known))}")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise unknown("backend", name, BACKENDS)
    return name


def check_name(kind: Kind, name: str) -> str:
    known = names(kind)
    if name not in known:
        raise unknown(kind, name, list(known))
    return name


def load(kind: Kind, name: str) -> object:
    """Import and return the implementation registered under `name`."""
    target = names(kind).get(name)
    if target is None:
        raise unknown(kind, name, list(names(kind)))
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{kind} {name!r} cannot be used here: {error}") from None
    return getattr(module, attribute)
