"""The engine contract: registered engines, typed `--engine-arg` options validated before anything loads, and
only result-changing options in the run's identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hf_support import tiny_suite

from evalpipe.engines.builtin import build_random_model
from evalpipe.engines.hf import HFEngine
from evalpipe.engines.options import (
    HFOptions,
    NoOptions,
    OpenAIOptions,
    VLLMOptions,
    engine_options,
    identity_engine_args,
)
from evalpipe.errors import UserError
from evalpipe.records import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_users_see_the_five_engines_and_not_the_test_engine() -> None:
    """Without the tests' plugin folder on the path, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "evalpipe.cli", "ls", "engines"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True,
    )  # fmt: skip
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert sorted(listed) == ["hf", "openai", "reference", "samples", "vllm"]


def test_the_scripted_engine_registers_through_the_entry_point_group() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="evalpipe.engines") if e.name == "scripted"]
    assert entry.value == "evalpipe.engines.scripted:ScriptedEngine"
    assert entry.dist is not None and entry.dist.metadata["Name"] == "evalpipe-test-plugins"


@pytest.mark.parametrize(
    ("engine", "args", "message"),
    [
        ("hf", {"no_such": "1"}, "--engine-arg no_such: unknown option (engine 'hf' takes: device, dtype, "),
        ("hf", {"batch_size": "many"}, "--engine-arg batch_size: Input should be a valid integer"),
        ("hf", {"batch_size": "0"}, "--engine-arg batch_size: Input should be greater than or equal to 1"),
        ("hf", {"dtype": "int3"}, "--engine-arg dtype: Input should be 'auto', 'float32', 'bfloat16' or"),
        (
            "openai",
            {"base_url": "http://x"},
            "--engine-arg base_url: unknown option (engine 'openai' takes: api",
        ),
        ("openai", {"timeout_s": "-1"}, "--engine-arg timeout_s: Input should be greater than 0"),
        ("vllm", {"model": "x"}, "--engine-arg model: give the model with --model"),
        ("vllm", {"max_model_len": "big"}, "--engine-arg max_model_len: Input should be a valid integer"),
        (
            "reference",
            {"dtype": "float32"},
            "--engine-arg dtype: unknown option (engine 'reference' takes none)",
        ),
    ],
)
def test_bad_engine_args_are_one_line_naming_the_valid_keys(
    engine: str, args: dict[str, str], message: str
) -> None:
    with pytest.raises(UserError) as caught:
        engine_options(engine, args)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_typed_values_are_read_from_strings() -> None:
    options = engine_options("hf", {"batch-size": "3", "dtype": "bfloat16", "device": "cpu"})
    assert options == HFOptions(batch_size=3, dtype="bfloat16", device="cpu")
    openai = engine_options("openai", {"concurrency": "2", "timeout_s": "1.5", "api": "chat"})
    assert openai == OpenAIOptions(concurrency=2, timeout_s=1.5, api="chat")
    assert isinstance(engine_options("samples", {}), NoOptions)


def test_vllm_keys_beyond_the_typed_ones_must_be_vllm_engine_args_where_vllm_is_installed() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        options = VLLMOptions.parse("vllm", {"block_size": "32", "enforce-eager": "true"})
        assert options.vllm_engine_args()["block_size"] == 32  # passed on; the replica's vLLM checks it
        return
    options = VLLMOptions.parse("vllm", {"block_size": "32", "enforce-eager": "true"})
    assert options.vllm_engine_args()["block_size"] == 32 and options.enforce_eager is True
    with pytest.raises(UserError, match=r"^--engine-arg no_such: not an option of engine 'vllm' nor one of"):
        VLLMOptions.parse("vllm", {"no_such": "1"})


def test_only_result_changing_options_enter_the_identity() -> None:
    args = {"batch_size": "2", "dtype": "bfloat16", "device": "cpu"}
    assert identity_engine_args("hf", args) == {"dtype": "bfloat16", "device": "cpu"}
    base: dict[str, Any] = {
        "suite": "humaneval",
        "engine": "hf",
        "models": ("builtin",),
        "backends": ("none",),
    }
    plain = RunConfig(**base).identity("d")
    assert RunConfig(**base, engine_args={"batch_size": "2"}).identity("d") == plain
    assert RunConfig(**base, engine_args={"dtype": "bfloat16"}).identity("d") != plain
    openai = {**base, "engine": "openai"}
    timeout = {"timeout_s": "5", "concurrency": "1", "warmup": "0"}
    assert RunConfig(**openai, engine_args=timeout).identity("d") == RunConfig(**openai).identity("d")
    assert identity_engine_args("vllm", {"gpu_memory_utilization": "0.5", "dtype": "half"}) == {
        "dtype": "half"
    }


def test_hf_options_take_effect(tmp_path: Path) -> None:
    model = build_random_model(tmp_path / "model")
    suite = tiny_suite(tmp_path / "suite")
    args = {"dtype": "bfloat16", "batch_size": "3", "device": "cpu"}
    config = RunConfig(suite="tiny", engine="hf", models=("m",), backends=("none",), engine_args=args)
    engine = HFEngine(config, suite, str(model), "none")
    try:
        described = engine.describe()
    finally:
        engine.close()
    assert described["dtype"] == "bfloat16" and described["batch_size"] == 3 and described["device"] == "cpu"
    assert described["options"] == {"device": "cpu", "dtype": "bfloat16", "batch_size": 3, "num_gpus": None}
    json.dumps(described)  # goes into the manifest as it is
