"""Where evalpipe's own files are: suites (`tasks/`) and the sandbox runner (`sandboxes/`), and its cache.

An editable install reads them from the checkout; a wheel carries them under `evalpipe/_data/`.
"""

from __future__ import annotations

import os
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


def cache_root() -> Path:
    """evalpipe's cache: `$EVALPIPE_CACHE`, else `~/.cache/evalpipe`. Models go in `models/`, loaded task
    lists in `tasks/`, compiled XGrammar grammars in `xgrammar/`."""
    configured = os.environ.get("EVALPIPE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "evalpipe"
