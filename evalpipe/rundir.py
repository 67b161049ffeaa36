"""The run directory: everything about one run, written by the driver alone.

Layout and guarantees are documented in docs/run-directory.md:
- config.json is written once; manifest.json is rewritten atomically (temp file, fsync, os.replace);
- generations.jsonl and executions.jsonl are append-only, one record per line, flushed per record;
- a torn last line (the process was killed mid-write) is dropped on resume; a bad line elsewhere is an error;
- scores.json is derived and can always be recomputed (`evalpipe score RUN`).
- A new directory appears under its final name only once config, manifest and tasks are complete.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from evalpipe.errors import UserError
from evalpipe.records import SCHEMA_VERSION, Execution, Generation, Manifest, RunConfig, Score, Task

CONFIG, MANIFEST, TASKS = "config.json", "manifest.json", "tasks.jsonl"
GENERATIONS, EXECUTIONS, SCORES = "generations.jsonl", "executions.jsonl", "scores.json"
LOCK = ".lock"
"""Held (flock) by the one process that writes the run; a second writer is refused."""

RecordT = TypeVar("RecordT", bound=BaseModel)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _dump(record: BaseModel) -> str:
    return record.model_dump_json()


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while records are read.

    Reading 10^5 records creates 10^5 objects that hold no reference cycles; meanwhile the collector runs
    again and again over the growing heap, which doubles the time it takes to read a large run. Reference
    counting still frees everything as usual. Nested pauses leave the collector to the outermost one.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_records(path: Path, model: type[RecordT], *, repair: bool = False) -> list[RecordT]:
    """Read a JSONL file of records. A torn last line is ignored (and cut off when `repair`)."""
    if not path.exists():
        return []
    with paused_gc():
        return _read_records(path, model, repair)


def _read_records(path: Path, model: type[RecordT], repair: bool) -> list[RecordT]:
    data = path.read_bytes()
    if data.endswith(b"\n") or not data:
        # A complete file, the common case: validate line after line with no bookkeeping (compare reads
        # 10^5 records). A bad line falls through to the careful loop below, which names it.
        validate = model.__pydantic_validator__.validate_json
        try:
            return [validate(line) for line in data.split(b"\n") if line.strip()]
        except ValidationError:
            pass
    records: list[RecordT] = []
    good_end = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not line.strip():
            if not is_last:
                good_end += len(line) + 1
            continue
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as error:
            if is_last:  # no newline yet: the writer was killed mid-record
                break
            raise UserError(f"{path}:{number}: corrupt record ({error.errors()[0]['msg']})") from None
        if is_last:
            # A complete record without its newline: keep it, but finish the line before appending.
            good_end = len(data)
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
            return records
        good_end += len(line) + 1
    if repair and good_end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    return records


def ensure_runs_dir(runs_dir: Path) -> None:
    """Create the runs directory if needed; UserError if it cannot be created or written."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create runs directory {runs_dir}: {error.strerror}") from None
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise UserError(f"runs directory {runs_dir} is not writable")


class RunDirectory:
    """One run's directory. Create with `create`, reopen with `open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._appenders: dict[str, IO[str]] = {}
        self._writer_lock: int | None = None

    def lock(self) -> None:
        """Become the run's only writer, or raise UserError if another process is writing it.

        An advisory `flock` on `.lock` in the run directory, held until `close()` or this process ends (the
        kernel releases it even after a crash, so a stale lock cannot block a resume).
        """
        if self._writer_lock is not None:
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise UserError(f"cannot lock {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"{self.path} is being written by another evalpipe process (pid {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._writer_lock = fd

    # -- creating and opening -------------------------------------------------------------------------
    @classmethod
    def create(
        cls, runs_dir: Path, config: RunConfig, manifest: Manifest, tasks: Sequence[Task]
    ) -> RunDirectory:
        """Write config, manifest and tasks into a hidden folder, then rename it into place."""
        ensure_runs_dir(runs_dir)
        final = runs_dir / manifest.run_id
        staging = runs_dir / f".{manifest.run_id}.partial"
        staging.mkdir()
        run = cls(staging)
        atomic_write(staging / CONFIG, config.model_dump_json(indent=2) + "\n")
        run.write_manifest(manifest)
        atomic_write(staging / TASKS, "".join(_dump(task) + "\n" for task in tasks))
        for name in (GENERATIONS, EXECUTIONS):
            (staging / name).touch()
        staging.replace(final)
        return cls(final)

    @classmethod
    def open(cls, path: Path) -> RunDirectory:
        """Open an existing run; UserError if it is not one or its format is unknown."""
        if not path.is_dir():
            raise UserError(f"{path} is not a directory")
        manifest_path = path / MANIFEST
        if not manifest_path.exists() or not (path / CONFIG).exists():
            raise UserError(f"{path} is not an evalpipe run directory (no {MANIFEST} / {CONFIG})")
        try:
            raw = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{manifest_path} cannot be read: {error}") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{path} has run-directory schema_version {version!r}; this evalpipe reads {SCHEMA_VERSION}"
            )
        return cls(path)

    # -- reading --------------------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self._read_model(MANIFEST, Manifest)

    @property
    def config(self) -> RunConfig:
        return self._read_model(CONFIG, RunConfig)

    def _read_model(self, name: str, model: type[RecordT]) -> RecordT:
        try:
            return model.model_validate_json((self.path / name).read_text())
        except (OSError, ValidationError) as error:
            raise UserError(f"{self.path / name} cannot be read: {error}") from None

    def tasks(self) -> list[Task]:
        return read_records(self.path / TASKS, Task)

    def generations(self, *, repair: bool = False) -> list[Generation]:
        return read_records(self.path / GENERATIONS, Generation, repair=repair)

    def executions(self, *, repair: bool = False) -> list[Execution]:
        """One execution per sample: the last one recorded (a sample whose sandbox failed is run again by
        `resume`, and its new record supersedes the `sandbox_error` one)."""
        records = read_records(self.path / EXECUTIONS, Execution, repair=repair)
        latest = {record.key.as_tuple(): record for record in records}
        return records if len(latest) == len(records) else list(latest.values())

    def scores(self) -> list[Score]:
        path = self.path / SCORES
        if not path.exists():
            return []
        try:
            payload = json.loads(path.read_text())
            return [Score.model_validate(row) for row in payload["scores"]]
        except (OSError, ValueError, KeyError, ValidationError) as error:
            raise UserError(f"{path} cannot be read ({error}); run `evalpipe score {self.path}`") from None

    # -- writing (the driver is the only writer) -------------------------------------------------------
    def write_manifest(self, manifest: Manifest) -> None:
        with self._lock:
            atomic_write(self.path / MANIFEST, manifest.model_dump_json(indent=2) + "\n")

    def write_scores(self, scores: Iterable[Score]) -> None:
        payload: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "scores": [json.loads(score.model_dump_json()) for score in scores],
        }
        with self._lock:
            atomic_write(self.path / SCORES, json.dumps(payload, indent=2) + "\n")

    def append_generation(self, generation: Generation) -> None:
        self._append(GENERATIONS, generation)

    def append_execution(self, execution: Execution) -> None:
        self._append(EXECUTIONS, execution)

    def _append(self, name: str, record: BaseModel) -> None:
        line = _dump(record) + "\n"
        with self._lock:
            handle = self._appenders.get(name)
            if handle is None:
                handle = (self.path / name).open("a", encoding="utf-8")
                self._appenders[name] = handle
            handle.write(line)
            handle.flush()  # one record per flush: a killed run loses at most the record being written

    def close(self) -> None:
        with self._lock:
            for handle in self._appenders.values():
                handle.close()
            self._appenders.clear()
            if self._writer_lock is not None:
                os.close(self._writer_lock)  # releases the flock
                self._writer_lock = None


def list_runs(runs_dir: Path) -> list[RunDirectory]:
    """Run directories under `runs_dir`, oldest first; folders that are not runs are skipped."""
    if not runs_dir.is_dir():
        raise UserError(f"runs directory {runs_dir} does not exist")
    runs = []
    try:
        children = sorted(runs_dir.iterdir())
    except OSError as error:
        raise UserError(f"cannot read runs directory {runs_dir}: {error.strerror}") from None
    for child in children:
        if child.name.startswith(".") or not (child / MANIFEST).exists():
            continue
        runs.append(RunDirectory(child))
    return runs
