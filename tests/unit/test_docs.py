"""docs/run-directory.md lists exactly the fields of the records written to the run directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from evalpipe.records import Execution, Generation, Manifest, RunConfig, Score, Task

DOC = Path(__file__).resolve().parents[2] / "docs" / "run-directory.md"


def _documented_fields(heading: str) -> list[str]:
    text = DOC.read_text()
    section = text.split(f"### {heading}", 1)[1].strip().split("\n\n", 1)[0]
    return re.findall(r"`(\w+)`", section)


@pytest.mark.parametrize(
    ("heading", "record"),
    [
        ("config.json — RunConfig", RunConfig),
        ("manifest.json — Manifest", Manifest),
        ("tasks.jsonl — Task", Task),
        ("generations.jsonl — Generation", Generation),
        ("executions.jsonl — Execution", Execution),
        ("scores.json — Score", Score),
    ],
)
def test_documented_fields_match_the_records(heading: str, record: type[BaseModel]) -> None:
    assert _documented_fields(heading) == list(record.model_fields)
