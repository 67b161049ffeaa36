"""Fingerprints of what changes a run's samples besides its config: the suite file, the constraint files and
the models. They enter the run's identity (`RunConfig.identity`), so that a resume never mixes setups: editing
the grammar, the suite or a model's weights makes a different run, and `evalpipe resume` names what changed.

Cheap by design (a resume computes them again): files are hashed whole except model weights, which are
fingerprinted by their names and sizes (hashing gigabytes on every start would cost minutes; a retrained model
saved over the old one changes its config or its files' sizes in practice, and `config.json` is hashed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from evalpipe.suites import Suite

HASHED_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
)  # fmt: skip
"""Small files of a model folder whose whole content is hashed."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
"""Weight files: fingerprinted by name and size."""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def suite_fingerprints(suite: Suite) -> dict[str, str]:
    """`suite` → the suite file's sha256 (none for a suite read from a tasks file: the dataset's hash covers
    it), and `constraint:<file>` → each constraint file's sha256."""
    found: dict[str, str] = {}
    path = Path(suite.path)
    if path.suffix == ".toml" and path.is_file():
        found["suite"] = file_sha256(path)
    if suite.constraint is not None:
        for field in ("lark", "gbnf", "json_schema", "regex"):
            relative = getattr(suite.constraint, field)
            if relative is not None and suite.resolve(relative).is_file():
                found[f"constraint:{relative}"] = file_sha256(suite.resolve(relative))
    return found


def model_fingerprint(model: str) -> str:
    """What identifies a model's weights: the built-in model's recipe, a local folder's config and weight
    files, else its name (a hub id or a server's model name, which is all that can be known offline)."""
    if model == "builtin":
        from evalpipe.engines.builtin import RECIPE, recipe_hash

        return f"builtin:{RECIPE['name']}-{recipe_hash()}"
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return f"name:{model}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name in HASHED_MODEL_FILES and path.is_file():
            digest.update(json.dumps([path.name, file_sha256(path)]).encode())
        elif path.suffix in WEIGHT_SUFFIXES and path.is_file():
            digest.update(json.dumps([path.name, path.stat().st_size]).encode())
    return f"folder:{digest.hexdigest()}"


def run_fingerprints(suite: Suite, models: tuple[str, ...], generating: bool) -> dict[str, str]:
    """Every fingerprint of a run: the suite's and, for engines that generate, each model's."""
    found = suite_fingerprints(suite)
    if generating:
        for model in models:
            found[f"model:{model}"] = model_fingerprint(model)
    return found


def describe_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two fingerprint sets, in words (`the constraint file X changed`)."""
    words = {"suite": "the suite file", "constraint": "the constraint file", "model": "the model"}
    changes = []
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) == new.get(name):
            continue
        kind, _, what = name.partition(":")
        thing = f"{words.get(kind, kind)} {what}".strip()
        if name not in old:
            changes.append(f"{thing} is new")
        elif name not in new:
            changes.append(f"{thing} is gone")
        else:
            changes.append(f"{thing} changed")
    return changes
