"""Where evalpipe's own files are: suites (`tasks/`) and the sandbox runner (`sandboxes/`).

An editable install reads them from the checkout; a wheel carries them under `evalpipe/_data/`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_root() -> Path:
    """The folder that holds `tasks/` and `sandboxes/`."""
    bundled = _PACKAGE / "_data"
    if (bundled / "tasks").is_dir():
        return bundled
    return _PACKAGE.parent


def tasks_dir() -> Path:
    return data_root() / "tasks"


def sandboxes_dir() -> Path:
    return data_root() / "sandboxes"


def runner_script() -> Path:
    """The stdlib-only in-sandbox runner shared by every sandbox."""
    return sandboxes_dir() / "runner.py"
