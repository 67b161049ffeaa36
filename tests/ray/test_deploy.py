"""deploy/: the files parse, carry what Ray and KubeRay require, and agree with the code.

Not marked `ray`: these tests start no Ray instance (and need only PyYAML), so they run in every test pass.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
import typer

from evalpipe.cli import app
from evalpipe.registry import names
from evalpipe.telemetry import METRICS, prometheus_series

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SANDBOX_RESOURCE = "evalpipe_sandbox"  # evalpipe.cluster.SANDBOX_RESOURCE (that module needs Ray to import)
RAY_PIN = "2.60.0"


def _yaml(relative: str) -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / relative).read_text())
    assert isinstance(loaded, dict)
    return loaded


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_the_ray_pin_is_the_installed_ray() -> None:
    try:
        assert version("ray") == RAY_PIN
    except PackageNotFoundError:
        pytest.skip("ray is not installed")


def test_the_grafana_dashboard_uses_only_metrics_that_exist_and_shows_them_all() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "evalpipe.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    exprs = _exprs(dashboard)
    used = {name for expr in exprs for name in re.findall(r"\bray_[A-Za-z0-9_]+", expr)}
    assert used, "no metric in the dashboard"
    assert used <= prometheus_series(), (
        f"not exported by evalpipe.telemetry: {sorted(used - prometheus_series())}"
    )
    shown = {spec.name for spec in METRICS if any(f"ray_{spec.name}" in name for name in used)}
    assert shown == {spec.name for spec in METRICS}, (
        f"not on the dashboard: {sorted(set(m.name for m in METRICS) - shown)}"
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_are_unique_and_prometheus_safe() -> None:
    names_ = [spec.name for spec in METRICS]
    assert len(names_) == len(set(names_))
    assert all(re.fullmatch(r"evalpipe_[a-z0-9_]+", name) for name in names_)
    assert all(spec.boundaries == tuple(sorted(spec.boundaries)) for spec in METRICS)
    assert all(bool(spec.boundaries) == (spec.kind == "histogram") for spec in METRICS)


def _gpu_limits(group: dict[str, Any]) -> list[str]:
    containers = group["template"]["spec"]["containers"]
    return [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers if "resources" in c]


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_PIN
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert "rayStartParams" in head
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if any(_gpu_limits(g))]
    assert gpu, "no worker group requests nvidia.com/gpu"
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "rayStartParams" in group
    sandbox = [g for g in groups.values() if SANDBOX_RESOURCE in g["rayStartParams"].get("resources", "")]
    assert sandbox and not any(_gpu_limits(sandbox[0])), "sandbox workers need a CPU group of their own"
    # KubeRay passes `resources` to `ray start --resources` as a quoted JSON string.
    json.loads(json.loads(sandbox[0]["rayStartParams"]["resources"]))


def test_kuberay_raycluster() -> None:
    cluster = _yaml("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])


def _run_options() -> set[str]:
    command = typer.main.get_command(app)
    run = command.commands["run"]  # type: ignore[attr-defined]
    return {opt for param in run.params for opt in param.opts}


def test_kuberay_rayjob_runs_evalpipe_on_the_same_cluster_spec() -> None:
    job = _yaml("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["evalpipe", "run"]
    assert words[words.index("--executor") + 1] == "ray"
    assert words[words.index("--engine") + 1] in names("engine")
    unknown = {w for w in words if w.startswith("-") and w not in _run_options()}
    assert not unknown, f"options `evalpipe run` does not have: {unknown}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == _yaml("kuberay/raycluster.yaml")["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])


def test_ray_cluster_launcher_config() -> None:
    config = _yaml("ray/cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert any(t.get("resources", {}).get(SANDBOX_RESOURCE, 0) >= 1 for t in types.values())
    assert any(f"ray[default]=={RAY_PIN}" in command for command in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert any("ray start --address" in command for command in config["worker_start_ray_commands"])


def test_the_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in (
        "grafana/evalpipe.json",
        "ray/cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
    ):
        assert path in readme


def test_the_sandbox_resource_is_the_one_the_executor_looks_for() -> None:
    cluster = pytest.importorskip("evalpipe.cluster")  # needs Ray
    assert cluster.SANDBOX_RESOURCE == SANDBOX_RESOURCE
