"""What a run's identity covers besides its config: suite file, constraint files and models."""

from __future__ import annotations

from pathlib import Path

from evalpipe.engines.builtin import RECIPE, recipe_hash
from evalpipe.fingerprint import describe_changes, model_fingerprint, run_fingerprints
from evalpipe.records import RunConfig
from evalpipe.suites import load_suite


def test_models_are_fingerprinted_by_recipe_config_and_weights(tmp_path: Path) -> None:
    assert model_fingerprint("builtin") == f"builtin:{RECIPE['name']}-{recipe_hash()}"
    assert model_fingerprint("org/some-model") == "name:org/some-model"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"0" * 100)
    (folder / "README.md").write_text("not part of the model")
    first = model_fingerprint(str(folder))
    (folder / "README.md").write_text("edited")
    assert model_fingerprint(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"0" * 101)  # retrained weights of another size
    second = model_fingerprint(str(folder))
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert len({first, second, model_fingerprint(str(folder))}) == 3


def test_a_runs_fingerprints_cover_the_suite_its_grammar_and_generating_models() -> None:
    suite = load_suite("humaneval")
    found = run_fingerprints(suite, ("builtin",), generating=True)
    grammars = {"constraint:grammars/python_body.lark", "constraint:grammars/python_body.gbnf"}
    assert set(found) == {"suite", "model:builtin", *grammars}
    assert "model:reference" not in run_fingerprints(suite, ("reference",), generating=False)


def test_identity_leaves_out_what_does_not_change_samples() -> None:
    config = RunConfig(suite="humaneval", engine="hf", models=("builtin",), backends=("none",))
    same = config.model_copy(update={"ks": (1, 5), "base_url": "http://127.0.0.1:1/v1"})
    assert config.identity("d") == same.identity("d")
    assert config.identity("d", {"model:builtin": "a"}) != config.identity("d", {"model:builtin": "b"})
    assert config.identity("d") != config.model_copy(update={"max_tokens": 64}).identity("d")


def test_changes_are_named() -> None:
    old = {"suite": "1", "constraint:g.lark": "2", "model:m": "3"}
    new = {"suite": "1", "constraint:g.lark": "9", "model:n": "3"}
    assert describe_changes(old, new) == [
        "the constraint file g.lark changed", "the model m is gone", "the model n is new",
    ]  # fmt: skip
