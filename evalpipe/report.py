"""`report.html`: the comparison of runs as one self-contained page, written into the first run's directory.

Everything is inline (CSS, plots as base64 PNG made with matplotlib, no script, no web font), so the file
opens anywhere, offline, and can be attached or archived as it is. Every piece of text that comes from a run
(model names, completions, error output) is HTML-escaped. The numbers are those of `evalpipe compare`
(evalpipe.compare): the page adds plots, the per-task outcome grid and examples of failures.
"""

from __future__ import annotations

import base64
import io
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console

from evalpipe import __version__
from evalpipe.compare import (
    Aligned,
    Arm,
    CompareResult,
    MetricRow,
    align,
    check_options,
    format_delta,
    format_value,
    summarize_aligned,
)
from evalpipe.errors import UserError
from evalpipe.rundir import atomic_write, paused_gc, utc_now

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_NAME = "report.html"
EXAMPLES_PER_STATUS = 3
"""Failures shown per status and arm; the counts cover all of them."""
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
DPI = 110

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a;
  margin: 0 auto; max-width: 1320px; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 8px; border-bottom: 1px solid #dde; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: #667; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e6ea; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f6f8; font-weight: 600; }
td .delta { display: block; font-size: 12px; color: #555; }
td .better { color: #137333; font-weight: 600; }
td .worse { color: #b3261e; font-weight: 600; }
.warnings { background: #fff8e1; border: 1px solid #f0d58c; border-radius: 6px; padding: 8px 14px 8px 30px; }
.warnings li { margin: 3px 0; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #556; font-size: 12px; }
.grid { display: grid; gap: 1px; align-items: center; margin: 8px 0; }
.grid .label { font-size: 12px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  padding-right: 6px; }
.grid .cell { height: 16px; border-radius: 1px; }
.legend span { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
  margin: 0 4px 0 12px; }
details { margin: 6px 0; border: 1px solid #e4e6ea; border-radius: 6px; padding: 6px 10px; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 8px 10px; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
.tag { display: inline-block; background: #eef; border-radius: 3px; padding: 0 5px; font-size: 12px; }
"""


# -- plots --------------------------------------------------------------------------------------------------
def _png(figure: Figure) -> str:
    """The figure as an inline <img>: PNG, base64, no metadata (nothing in the file names a URL)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="" src="data:image/png;base64,{data}">'


def _color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def _bars(axes: Axes, rows: list[MetricRow], arms: list[str], title: str) -> None:
    """Grouped bars, one group per metric, one bar per arm, with the bootstrap CI as error bars."""
    width = 0.8 / max(len(arms), 1)
    for a, arm in enumerate(arms):
        heights, lows, highs, positions = [], [], [], []
        for r, row in enumerate(rows):
            value = row.values[a]
            if value.value is None:
                continue
            positions.append(r + (a - (len(arms) - 1) / 2) * width)
            heights.append(100 * value.value)
            lows.append(100 * (value.value - (value.ci_low if value.ci_low is not None else value.value)))
            highs.append(100 * ((value.ci_high if value.ci_high is not None else value.value) - value.value))
        bars = axes.bar(
            positions, heights, width * 0.92, yerr=[lows, highs], capsize=3, color=_color(a), label=arm
        )
        axes.bar_label(bars, labels=[f"{h:.1f}" for h in heights], padding=2, fontsize=8)
    axes.set_xticks(range(len(rows)), [row.label for row in rows])
    axes.set_ylim(0, 109)
    axes.set_ylabel("%")
    axes.set_title(title, fontsize=11, loc="left")
    axes.grid(axis="y", alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)


def _rate_plots(result: CompareResult) -> list[tuple[str, str]]:
    """pass@k, then syntax validity and constraint satisfaction, as (img, caption)."""
    # matplotlib is imported where plots are drawn: it takes seconds, and the CLI imports this module.
    from matplotlib.figure import Figure

    arms = [arm.label for arm in result.arms]
    legend_columns = min(len(arms), 4)
    plots = []
    pass_rows = [row for row in result.metrics if row.name.startswith("pass@")]
    figure = Figure(figsize=(max(6.0, 2.2 + 1.6 * len(pass_rows) * max(1, len(arms) / 2)), 3.6))
    axes = figure.add_subplot()
    _bars(axes, pass_rows, arms, "pass@k")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=legend_columns, frameon=False)
    plots.append(
        (_png(figure), "pass@k per model and backend; error bars: 95% paired bootstrap CI over tasks.")
    )
    shown: tuple[str, ...] = ("max_tokens", "syntax_valid", "syntax_valid_ended")
    shown += ("constraint_satisfied", "constraint_satisfied_ended")
    rate_rows = sorted(
        (row for row in result.metrics if row.name in shown), key=lambda row: shown.index(row.name)
    )
    figure = Figure(figsize=(max(6.0, 2.2 + 1.6 * len(rate_rows) * max(1, len(arms) / 2)), 3.6))
    axes = figure.add_subplot()
    _bars(axes, rate_rows, arms, "ending, syntax validity and constraint satisfaction")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=legend_columns, frameon=False)
    missing = [
        value.arm for row in rate_rows if row.name == "constraint_satisfied" for value in row.values
        if value.value is None
    ]  # fmt: skip
    caption = "Share of samples whose program parses (prompt + completion)"
    if any(row.name == "constraint_satisfied" for row in rate_rows):
        caption += " and whose text satisfies the suite's constraint"
        if missing:
            caption += f" (no constraint for {', '.join(missing)})"
    else:
        caption += "; no arm has a constraint verdict"
    if any(row.name == "max_tokens" for row in rate_rows):
        caption += (
            "; first the share cut at max tokens, and each rate also over the samples that ended on their "
            "own (ended)"
        )
    plots.append((_png(figure), caption + "; error bars: 95% CI."))
    return plots


def _latency_plot(aligned: Aligned) -> tuple[str, str] | None:
    """Box plots of TTFT, TPOT and e2e per arm (only arms that measured latency); None if none did."""
    timed = ("ttft_s", "tpot_s", "e2e_s")
    measured = [(i, arm) for i, arm in enumerate(aligned.arms) if any(arm.series[n][0].size for n in timed)]
    if not measured:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(12.0, 3.8))
    figure.subplots_adjust(wspace=0.28)
    panels = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end to end"))
    for p, (name, title) in enumerate(panels):
        axes = figure.add_subplot(1, 3, p + 1)
        data = [(i, arm.label, arm.series[name][0]) for i, arm in measured if arm.series[name][0].size]
        if not data:
            axes.set_axis_off()
            axes.set_title(f"{title}: not measured", fontsize=11, loc="left")
            continue
        seconds = np.concatenate([values for _, _, values in data])
        scale, unit = (1000.0, "ms") if float(np.percentile(seconds, 90)) < 1.0 else (1.0, "s")
        boxes = axes.boxplot(
            [values * scale for _, _, values in data], whis=(5, 95), showfliers=False, patch_artist=True,
            medianprops={"color": "black"},
        )  # fmt: skip
        for box, (i, _, _) in zip(boxes["boxes"], data, strict=True):
            box.set_facecolor(_color(i))
            box.set_alpha(0.75)
        axes.set_xticks(range(1, len(data) + 1), [label for _, label, _ in data], rotation=15, fontsize=8)
        low, high = (float(v) * scale for v in np.percentile(seconds, [5, 95]))
        if low > 0 and high / low > 30:  # long tails: a log axis keeps the boxes readable
            axes.set_yscale("log")
            # Plain numbers (1, 2, 5, 10, ...) rather than powers of ten: easier to read, faster to draw.
            axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_ylabel(unit)
        axes.set_title(title, fontsize=11, loc="left")
        axes.grid(axis="y", alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
    skipped = [arm.label for arm in aligned.arms if all(arm is not other for _, other in measured)]
    caption = "Latency per sample: box p25–p75, line p50, whiskers p5–p95."
    if skipped:
        caption += f" No latency for {', '.join(skipped)} (replayed completions are not timed)."
    return _png(figure), caption


# -- HTML pieces ------------------------------------------------------------------------------------------
def _runs_table(aligned: Aligned) -> str:
    rows = []
    for run in aligned.runs:
        manifest, config = run.manifest, run.config
        rows.append(
            "<tr>" + "".join(
                f"<td>{escape(str(cell))}</td>"
                for cell in (
                    manifest.run_id, manifest.status, config.engine, ", ".join(config.models),
                    ", ".join(config.backends), manifest.suite, manifest.created_at,
                    f"{manifest.evalpipe_version} ({(manifest.git_sha or 'no git')[:10]})",
                )
            ) + "</tr>"
        )  # fmt: skip
    head = "".join(
        f"<th>{name}</th>"
        for name in ("run", "status", "engine", "models", "backends", "suite", "created", "evalpipe")
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _metrics_table(result: CompareResult) -> str:
    head = "<th>metric</th>" + "".join(f"<th>{escape(arm.label)}</th>" for arm in result.arms)
    body = []
    for row in result.metrics:
        cells = []
        for value in row.values:
            text = escape(format_value(row, value))
            delta = format_delta(row, value)
            if delta:
                kind = ""
                if value.significant and value.delta is not None:
                    kind = " better" if (value.delta > 0) == row.higher_is_better else " worse"
                text += f'<span class="delta{kind}">{escape(delta)}</span>'
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><td>{escape(row.label)}</td>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _mcnemar_table(result: CompareResult) -> str:
    if not result.mcnemar:
        return ""
    head = "".join(
        f"<th>{name}</th>"
        for name in ("arm", "vs", "tasks", "both pass", "vs only", "arm only", "neither", "p")
    )
    rows = "".join(
        "<tr>" + "".join(
            f"<td>{escape(str(cell))}</td>"
            for cell in (
                test.arm, test.reference, test.n_tasks, test.both_pass, test.reference_only, test.arm_only,
                test.neither, f"{test.p_value:.4g}" + (" *" if test.significant else ""),
            )
        ) + "</tr>"
        for test in result.mcnemar
    )  # fmt: skip
    return (
        "<h3>McNemar's exact test on the first sample of each task</h3>"
        '<p class="muted">The greedy pass@1 when the runs sampled at temperature 0; * p &lt; 0.05.</p>'
        f"<table><tr>{head}</tr>{rows}</table>"
    )


def _cell_color(share: float) -> str:
    """Red (none passed) through amber to green (all passed)."""
    low, mid, high = np.array([214, 69, 65]), np.array([240, 190, 60]), np.array([46, 160, 67])
    rgb = low + (mid - low) * share * 2 if share < 0.5 else mid + (high - mid) * (share - 0.5) * 2
    return "#{:02x}{:02x}{:02x}".format(*(round(float(c)) for c in rgb))


def _outcome_grid(aligned: Aligned) -> str:
    """One row per arm, one cell per task, colored by the share of its samples that passed."""
    tasks = aligned.tasks
    parts = [
        f'<div class="grid" style="grid-template-columns: 190px repeat({len(tasks)}, minmax(3px, 1fr))">'
    ]
    for arm in aligned.arms:
        parts.append(f'<div class="label" title="{escape(arm.label)}">{escape(arm.label)}</div>')
        for task_id, n, c in zip(tasks, arm.n, arm.c, strict=True):
            share = float(c) / float(n) if n else 0.0
            tip = escape(f"{task_id} · {arm.label}: {c}/{n} passed")
            parts.append(f'<div class="cell" title="{tip}" style="background:{_cell_color(share)}"></div>')
    parts.append("</div>")
    legend = (
        '<p class="legend muted">share of samples passed:'
        f'<span style="background:{_cell_color(0)}"></span>none'
        f'<span style="background:{_cell_color(0.5)}"></span>half'
        f'<span style="background:{_cell_color(1)}"></span>all; hover a cell for the task and counts. '
        "Tasks in the first run's order.</p>"
    )
    return "".join(parts) + legend + _disagreements(aligned)


def _disagreements(aligned: Aligned) -> str:
    """Tasks that some arm always passes and another always fails: where the arms differ most."""
    rows = []
    for t, task_id in enumerate(aligned.tasks):
        shares = [float(arm.c[t]) / float(arm.n[t]) for arm in aligned.arms]
        if max(shares) == 1.0 and min(shares) == 0.0:
            winners = [arm.label for arm, share in zip(aligned.arms, shares, strict=True) if share == 1.0]
            losers = [arm.label for arm, share in zip(aligned.arms, shares, strict=True) if share == 0.0]
            rows.append(
                f"<tr><td>{escape(task_id)}</td><td>{escape(', '.join(winners))}</td>"
                f"<td>{escape(', '.join(losers))}</td></tr>"
            )
    if not rows:
        return '<p class="muted">No task is always passed by one arm and always failed by another.</p>'
    return (
        f"<details><summary>{len(rows)} task(s) always passed by one arm and always failed by another"
        "</summary><table><tr><th>task</th><th>all samples pass</th><th>all samples fail</th></tr>"
        + "".join(rows)
        + "</table></details>"
    )


def _examples(arm: Arm, indices: list[int], position: dict[str, int]) -> list[int]:
    """A few failures of one arm, in task order, from different tasks and different programs where there are
    enough: three copies of the same wrong completion teach less than three different mistakes."""
    ordered = sorted(
        indices, key=lambda i: (position[arm.executions[i].key.task_id], arm.executions[i].key.index)
    )
    chosen: list[int] = []
    tasks: set[str] = set()
    programs: set[str] = set()
    for i in ordered:
        execution = arm.executions[i]
        if execution.key.task_id in tasks or execution.program_sha256 in programs:
            continue
        chosen.append(i)
        tasks.add(execution.key.task_id)
        programs.add(execution.program_sha256)
        if len(chosen) == EXAMPLES_PER_STATUS:
            return chosen
    return chosen + [i for i in ordered if i not in chosen][: EXAMPLES_PER_STATUS - len(chosen)]


def _failures(aligned: Aligned) -> str:
    """Non-passing samples grouped by status, with counts per arm and a few escaped examples."""
    by_status: dict[str, dict[str, tuple[Arm, list[int]]]] = defaultdict(dict)
    position = {task_id: t for t, task_id in enumerate(aligned.tasks)}
    for arm in aligned.arms:
        for i, execution in enumerate(arm.executions):
            if execution.status != "passed":
                by_status[execution.status].setdefault(arm.label, (arm, []))[1].append(i)
    if not by_status:
        return '<p class="muted">Every compared sample passed.</p>'
    shown: dict[tuple[str, str], list[int]] = {}
    needed: set[tuple[str, str, str, int]] = set()
    for status, per_arm in by_status.items():
        for label, (arm, indices) in per_arm.items():
            shown[(status, label)] = _examples(arm, indices, position)
            needed |= {arm.executions[i].key.as_tuple() for i in shown[(status, label)]}
    texts = {
        generation.key.as_tuple(): generation.text
        for run in aligned.runs
        for generation in run.generations
        if generation.key.as_tuple() in needed
    }
    parts: list[str] = []
    totals = Counter({status: sum(len(v[1]) for v in arms.values()) for status, arms in by_status.items()})
    for status, total in totals.most_common():
        per_arm = by_status[status]
        counts = ", ".join(f"{escape(label)} {len(indices)}" for label, (_, indices) in per_arm.items())
        # The most common status is open: its examples are what a reader looks for first.
        parts.append(
            f'<details{" open" if not parts else ""}><summary><span class="tag">{escape(status)}</span> '
            f"{total} sample(s): {counts}</summary>"
        )
        for label, (arm, _) in per_arm.items():
            for i in shown[(status, label)]:
                execution = arm.executions[i]
                completion = texts.get(execution.key.as_tuple(), "(no generation record)")
                detail = execution.stderr_tail or execution.stdout_tail or execution.note or "(no output)"
                how = execution.note or f"exit code {execution.exit_code}"
                parts.append(
                    f"<h3>{escape(label)} · {escape(execution.key.task_id)} sample {execution.key.index}</h3>"
                    f"<pre><code>{escape(completion)}</code></pre>"
                    f'<p class="muted">output ({escape(how)}):</p>'
                    f"<pre><code>{escape(detail)}</code></pre>"
                )
        parts.append("</details>")
    return "".join(parts)


def render_report(aligned: Aligned, result: CompareResult) -> str:
    """The whole page as one HTML string."""
    latency = _latency_plot(aligned)
    figures = [*_rate_plots(result)]
    if latency is not None:
        figures.append(latency)
    plots = "".join(
        f"<figure>{img}<figcaption>{escape(caption)}</figcaption></figure>" for img, caption in figures
    )
    if latency is None:
        plots += (
            '<p class="muted">No latency plot: no compared arm has timings (reference and samples runs '
            "replay completions and are not timed).</p>"
        )
    warnings = (
        '<ul class="warnings">' + "".join(f"<li>{escape(w.message)}</li>" for w in result.warnings) + "</ul>"
        if result.warnings
        else '<p class="muted">The runs were made under the same recorded conditions.</p>'
    )
    title = f"evalpipe report: {aligned.runs[0].manifest.run_id}"
    intro = (
        f"{len(result.tasks)} tasks compared across {len(result.arms)} arm(s); 95% paired bootstrap CIs over "
        f"tasks ({result.bootstrap.resamples} resamples, seed {result.bootstrap.seed}); Δ vs "
        f"{result.reference}. Made {utc_now()} by evalpipe {__version__}."
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="muted">{escape(intro)}</p>'
        f"<h2>Runs</h2>{_runs_table(aligned)}<h2>Comparability</h2>{warnings}"
        f"<h2>Summary</h2>{_metrics_table(result)}{_mcnemar_table(result)}"
        f"<h2>Plots</h2>{plots}"
        f"<h2>Per-task outcomes</h2>{_outcome_grid(aligned)}"
        f"<h2>Failures by status</h2>{_failures(aligned)}"
        "</body></html>\n"
    )


def _write(paths: Sequence[Path], bootstrap: int, seed: int) -> tuple[Path, CompareResult]:
    check_options("table", bootstrap)
    with paused_gc():  # as in compare_runs: the records are freed before the collector runs again
        aligned = align(list(paths))
        result = summarize_aligned(aligned, bootstrap=bootstrap, seed=seed)
        target = aligned.runs[0].path / REPORT_NAME
        try:
            atomic_write(target, render_report(aligned, result))
        except OSError as error:
            raise UserError(f"cannot write {target}: {error.strerror}") from None
        del aligned
    return target, result


def write_report(paths: Sequence[Path], *, bootstrap: int = 10_000, seed: int = 0) -> Path:
    """Compare the runs and write `report.html` into the first run's directory; returns its path.

    UserError as for `compare_runs` (runs that cannot be paired), or when the directory is not writable.
    """
    return _write(paths, bootstrap, seed)[0]


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories; the report goes into the first")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (over tasks)")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap draws")] = 0,
) -> None:
    """Write report.html (self-contained: plots, per-task grid, failures) into the first run's directory."""
    path, result = _write(runs, bootstrap, seed)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    for warning in result.warnings:  # also in the page; said here so that they are not missed
        err.print(f"[bold yellow]warning:[/] {warning.message}", soft_wrap=True, highlight=False)
    sys.stdout.write(f"{path}\n")  # the path alone on stdout, for scripts
