"""report.html: self-contained, plots present, escaped, and rendered by a real browser (headless Chromium).

One run is made through the CLI (a samples file, process sandbox); the other is written with the RunDirectory
API with latency and constraint data, as an engine run would have.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from evalpipe.pipeline import rescore
from evalpipe.records import (
    ClusterConfig,
    Execution,
    Generation,
    Manifest,
    Progress,
    RunConfig,
    SampleKey,
    Task,
)
from evalpipe.report import REPORT_NAME, report_command, write_report
from evalpipe.rundir import RunDirectory

CliResult = tuple[int, str, str]
TASKS = 12
HOSTILE = '    return "</code></pre><script>alert(1)</script><img src=https://example.com/x.png>"\n'
"""A completion that would break out of the page, fetch a URL or run a script if it were not escaped."""
PLOT_COLORS = {"blue": (0x1F, 0x77, 0xB4), "orange": (0xFF, 0x7F, 0x0E)}
"""The first two arms' colors in the plots."""


def _samples_run(cli: Callable[..., CliResult], tasks: list[Task], runs: Path) -> Path:
    rows = []
    for i, task in enumerate(tasks[:TASKS]):
        rows.append(
            {"task_id": task.id, "completion": task.canonical_solution if i % 3 else "    return None\n"}
        )
        rows.append({"task_id": task.id, "completion": HOSTILE if i == 1 else "    return (\n"})
    samples = runs.parent / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, _, err = cli("run", "humaneval", "--samples", samples, "--allow-partial", "-m", "model-a",
                       "--sandbox", "process", "--workers", "1", "--runs-dir", runs)  # fmt: skip
    assert code == 0, err
    (path,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return path


def _timed_run(tasks: list[Task], runs: Path) -> Path:
    """A guidance run on the same tasks with latency, compile times and constraint verdicts."""
    tasks = tasks[:TASKS]
    config = RunConfig(suite="humaneval", engine="hf", models=("model-a",), backends=("guidance",),
                       n_samples=2, sandbox="process")  # fmt: skip
    manifest = Manifest(
        run_id="humaneval-timed-0000aaaa", identity="0" * 64, status="completed", evalpipe_version="0.1.0",
        git_sha=None, created_at="2026-01-01T00:00:00+00:00", updated_at="2026-01-01T00:00:00+00:00",
        suite="humaneval", dataset_sha256="d" * 64, grammar_sha256={"lark": "a" * 64}, package_versions={},
        hardware={}, sandbox={"kind": "process"}, progress=Progress(expected=24, generated=24, executed=24),
        cluster=ClusterConfig(),
    )  # fmt: skip
    run = RunDirectory.create(runs, config, manifest, tasks)
    rng = np.random.default_rng(0)
    for t, task in enumerate(tasks):
        for index in range(2):
            key = SampleKey(model="model-a", backend="guidance", task_id=task.id, index=index)
            passed = t % 4 != 0
            run.append_generation(
                Generation(
                    key=key, raw_text="x", text=task.canonical_solution or "", finish_reason="stop",
                    n_output_tokens=int(rng.integers(20, 200)), ttft_s=float(rng.lognormal(-3, 0.3)),
                    tpot_s=float(rng.lognormal(-4, 0.2)), e2e_s=float(rng.lognormal(0, 0.3)),
                    grammar_compile_s=0.02, constraint_satisfied=True, effective_backend="guidance",
                )
            )  # fmt: skip
            run.append_execution(
                Execution(
                    key=key, program_sha256="0" * 64, syntax_valid=True,
                    status="passed" if passed else "timeout", passed=passed,
                    note="" if passed else "cpu limit",
                )
            )  # fmt: skip
    run.close()
    rescore(run)
    return run.path


@pytest.fixture
def runs(cli: Callable[..., CliResult], humaneval_tasks: list[Task], tmp_path: Path) -> list[Path]:
    return [_samples_run(cli, humaneval_tasks, tmp_path / "a"), _timed_run(humaneval_tasks, tmp_path / "b")]


class _Tags(HTMLParser):
    """Every real tag of a page with its attributes, and the text of its <style> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def _external_references(html: str) -> list[str]:
    """URLs a browser would fetch: src/href/srcset/poster/data attributes, CSS url() and @import."""
    parser = _Tags()
    parser.feed(html)
    found = [
        f"<{tag} {name}={value!r}>"
        for tag, attrs in parser.tags
        for name, value in attrs.items()
        if name in {"src", "href", "srcset", "poster", "data", "action", "background"}
        and not value.startswith("data:")
    ]
    css = " ".join(parser.styles) + " ".join(attrs.get("style", "") for _, attrs in parser.tags)
    found += re.findall(r"url\([^)]*\)|@import[^;]*", css)
    found += [f"<{tag}>" for tag, _ in parser.tags if tag in {"script", "link", "iframe", "object", "embed"}]
    return found


def _plots(html: str) -> list[bytes]:
    """The inline plot images, decoded."""
    return [
        base64.b64decode(data)
        for data in re.findall(r'<img class="plot" alt="" src="data:image/png;base64,([^"]+)"', html)
    ]


def test_report_is_self_contained_and_escaped(runs: list[Path]) -> None:
    path = write_report(runs, bootstrap=300)
    assert path == runs[0] / REPORT_NAME
    html = path.read_text()
    plots = _plots(html)
    assert len(plots) == 3  # pass@k, syntax/constraint, latency
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000 for png in plots)
    assert html.count("<img") == 3
    assert _external_references(html) == []
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the hostile completion, shown as text
    assert "timeout" in html and "syntax_error" in html and "failed" in html
    assert "model-a/none" in html and "model-a/guidance" in html
    assert html.count('class="cell"') == 2 * TASKS


def test_the_reference_check_finds_external_references() -> None:
    page = (
        '<html><head><link rel="stylesheet" href="x.css">'
        "<style>b { background: url(https://a/b.png) }</style></head><body>"
        '<img src="https://a/b.png"><a href="//cdn/x">x</a><img src="data:image/png;base64,AA">'
        "&lt;img src=https://only/text&gt;</body></html>"
    )
    # The link's href and the link itself, the CSS url(), the img src and the a href; not the escaped text.
    assert len(_external_references(page)) == 5


def test_report_without_latency_says_so(
    cli: Callable[..., CliResult], humaneval_tasks: list[Task], tmp_path: Path
) -> None:
    first = _samples_run(cli, humaneval_tasks, tmp_path / "a")
    code, _, err = cli("run", "humaneval", "--engine", "reference", "--sandbox", "process", "--limit", "20",
                       "--runs-dir", tmp_path / "b")  # fmt: skip
    assert code == 0, err
    (second,) = [p for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")]
    html = write_report([first, second], bootstrap=200).read_text()
    assert len(_plots(html)) == 2
    assert "No latency plot" in html


def test_report_command_registers_in_one_line(runs: list[Path]) -> None:
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("other")(lambda: None)
    done = CliRunner().invoke(app, ["report", *map(str, runs), "--bootstrap", "100"])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == str(runs[0] / REPORT_NAME)
    assert "differs" in done.stderr  # the comparability warnings are also said on stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(runs: list[Path], tmp_path: Path) -> None:
    from PIL import Image  # comes with matplotlib

    path = write_report(runs, bootstrap=300)
    screenshot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [_chromium() or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--window-size=1400,3000",
             "--hide-scrollbars", path.as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert screenshot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (3000, 1400)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.03, f"the page looks blank ({not_white:.1%} of pixels not white)"
    # The plots were decoded and drawn: their bar and box colors cover a good area of the page.
    for name, color in PLOT_COLORS.items():
        close = (np.abs(pixels - np.array(color)).max(axis=2) <= 12).sum()
        assert close > 5_000, f"few {name} plot pixels ({close}): the plots did not render"
