"""HumanEval loading: through `datasets` once per data file, then from evalpipe's task cache."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evalpipe.records import Task
from evalpipe.sources import humaneval_data_file, load_humaneval


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EVALPIPE_CACHE", str(root))
    return root


def _cached_files(cache: Path) -> list[Path]:
    return sorted((cache / "tasks").glob("*.jsonl"))


def test_the_cached_tasks_equal_what_datasets_loaded(cache: Path, humaneval_tasks: list[Task]) -> None:
    first, sha_first = load_humaneval()
    (written,) = _cached_files(cache)
    second, sha_second = load_humaneval()
    assert len(first) == 164
    assert first == second == humaneval_tasks
    assert sha_first == sha_second
    assert len(written.read_text().splitlines()) == 164


def test_a_cache_hit_does_not_import_datasets(cache: Path) -> None:
    load_humaneval()  # fills the cache
    probe = (
        "import sys\n"
        "from evalpipe.sources import load_humaneval\n"
        "tasks, _ = load_humaneval()\n"
        "print(len(tasks), 'datasets' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["164", "False"]


def test_a_damaged_cache_is_loaded_again_and_replaced(cache: Path, humaneval_tasks: list[Task]) -> None:
    load_humaneval()
    (written,) = _cached_files(cache)
    written.write_text('{"id": "HumanEval/0", "prompt": 1}\nnot json\n')
    tasks, _ = load_humaneval()
    assert tasks == humaneval_tasks
    assert len(written.read_text().splitlines()) == 164


def test_another_data_file_gets_its_own_cache_entry(cache: Path, tmp_path: Path) -> None:
    with gzip.open(humaneval_data_file(), "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()][:3]
    rows[0]["prompt"] += "# changed\n"
    small = tmp_path / "three.jsonl"
    small.write_text("".join(json.dumps(row) + "\n" for row in rows))
    full, full_sha = load_humaneval()
    three, three_sha = load_humaneval(small)
    assert len(full) == 164 and len(three) == 3
    assert three_sha != full_sha
    assert three[0].prompt.endswith("# changed\n") and not full[0].prompt.endswith("# changed\n")
    assert len(_cached_files(cache)) == 2
