"""Helpers of the Ray tests: scraping a node's metrics endpoint and checking a run directory."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from evalpipe.records import Execution, Generation
from evalpipe.rundir import RunDirectory


@dataclass(frozen=True)
class RayNode:
    metrics_port: int

    def scrape(self) -> list[tuple[str, dict[str, str], float]]:
        """(series name, labels, value) for every sample on the node's metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            text = response.read().decode()
        samples = []
        for line in text.splitlines():
            match = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if match is None or line.startswith("#"):
                continue
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
        return samples

    def total(self, series: str, **labels: str) -> float:
        """Sum of a series over every sample whose labels include `labels`."""
        return sum(
            value
            for name, found, value in self.scrape()
            if name == series and all(found.get(k) == v for k, v in labels.items())
        )


def only_run(runs: Path) -> RunDirectory:
    (path,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return RunDirectory.open(path)


def assert_each_sample_once(run: RunDirectory, expected: int) -> tuple[list[Generation], list[Execution]]:
    """Every sample generated once and executed once, and nothing else."""
    generations, executions = run.generations(), run.executions()
    generated = [g.key.as_tuple() for g in generations]
    executed = [e.key.as_tuple() for e in executions]
    assert len(generated) == len(set(generated)) == expected
    assert len(executed) == len(set(executed)) == expected
    assert set(generated) == set(executed)
    return generations, executions
