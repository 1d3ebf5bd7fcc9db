"""``orderlab report``: a self-contained HTML page and PNG figures comparing the orderings of a results root.

Figures (completed trials only; lines are means over seeds, bands span min–max over seeds), one
row of panels per combination of the group columns that vary in the data; legends name the
orderings by ``LEGEND_LABELS``:

- ``loss_vs_epoch.png``: train loss and validation metric by epoch;
- ``loss_vs_seconds.png``: the same against cumulative epoch seconds (wall clock of training);
- ``herding.png``: the parallel herding bound by epoch, only when ``epochs.herding`` has values;
- ``final_vs_<axis>.png``: each trial's final train loss (and final herding bound, when measured)
  against the swept numeric axis (``swept_axis``), only when the trials vary one;
- ``time_breakdown.png``: mean seconds per epoch, stacked: compute, all-reduce, order wait, send wait, other.

matplotlib draws through its Agg canvas directly (no pyplot), so a report never changes the
caller's matplotlib backend or global state.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from orderlab import results
from orderlab.errors import OrderlabError

if TYPE_CHECKING:
    import duckdb
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_WIDTH_INCHES = 11.0
PANEL_HEIGHT_INCHES = 3.2
DPI = 100
BAND = "band: min–max over seeds"
# Stacked time segments: (epochs column or "other", label, color).
TIME_PARTS = (
    ("compute_seconds", "compute", "#4c72b0"),
    ("allreduce_seconds", "all-reduce", "#dd8452"),
    ("order_wait_seconds", "order wait", "#c44e52"),
    ("send_wait_seconds", "send wait", "#8172b3"),
    ("other", "other (epoch s − the rest)", "#bbbbbb"),
)
# Legend names: the ordering and the name its paper gives it; others show the ordering name.
LEGEND_LABELS = {
    "rr": "rr (D-RR)",
    "pair-balance": "pair-balance (ID-GraB)",
    "grab": "grab (ID-GraB, Bal)",
    "cd-grab": "cd-grab (CD-GraB)",
}
# Numeric trial columns a sweep can vary, in the order swept_axis picks them, with the log base of
# their x axis.
SWEPT_AXES = {"num_workers": 2, "batch_size": 2, "lr": 10, "microbatch_size": 2}
# final_by_axis(): epochs columns taken at each trial's last epoch, and their panel titles.
FINAL_METRICS = {"train_loss": "final train loss", "herding": "final parallel herding bound"}


def legend_label(ordering: str) -> str:
    """The legend name of ``ordering``: ``LEGEND_LABELS[ordering]``, else the ordering name itself."""
    return LEGEND_LABELS.get(ordering, ordering)


def _load(
    con: duckdb.DuckDBPyConnection, root: str, sweep: str | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Epoch rows of completed trials (with their group columns) and trial counts by status, from
    ``con``, a ``results.connect(root)``.

    Raises:
        OrderlabError: the root has no trials, ``sweep`` is not one of its sweeps, or no trial
            completed with epoch rows.
    """
    sweeps = [row[0] for row in con.execute("SELECT DISTINCT sweep FROM trials ORDER BY 1").fetchall()]
    if not sweeps:
        raise OrderlabError(
            f"no trials under results root {root!r}; pass the storage root a sweep wrote to "
            "(orderlab sweep CONFIG --set storage=ROOT)"
        )
    if sweep is not None and sweep not in sweeps:
        raise OrderlabError(
            f"sweep {sweep!r} is not under results root {root!r}; sweeps there: {', '.join(sweeps)}"
        )
    where = "($sweep::VARCHAR IS NULL OR t.sweep = $sweep)"
    statuses = dict(
        con.execute(
            f"SELECT status, count(*) FROM trials t WHERE {where} GROUP BY ALL", {"sweep": sweep}
        ).fetchall()
    )
    rows = con.execute(
        f"""
        SELECT {", ".join(f"t.{c}" for c in dict.fromkeys([*results.GROUP_COLUMNS, *SWEPT_AXES]))},
               t.ordering, t.seed, e.* EXCLUDE (sweep, bytes_to_server, lr)
        FROM epochs e JOIN ({results.counted_trials_sql()}) t ON e.trial_id = t.trial_id AND e.sweep = t.sweep
        ORDER BY t.sweep, e.trial_id, e.epoch
        """,
        {"sweep": sweep},
    ).df()
    if rows.empty:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items(), key=str)) or "none"
        raise OrderlabError(
            f"no completed trial with epoch rows under {root!r}"
            f"{'' if sweep is None else f' in sweep {sweep!r}'} (trials: {counts}); nothing to plot"
        )
    rows["cumulative_seconds"] = rows.groupby(["sweep", "trial_id"])["epoch_seconds"].cumsum()
    return rows, {str(k): int(v) for k, v in statuses.items()}


def completed_epochs(root: str | Path, sweep: str | None = None) -> pd.DataFrame:
    """The epoch rows ``report`` plots: those of completed trials, with the trials' columns.

    Args:
        root: results root, a local path or a URI.
        sweep: only this sweep (default: every sweep under ``root``).

    Returns:
        One row per (trial, epoch): results.GROUP_COLUMNS, the SWEPT_AXES columns, ordering, seed,
        the epochs columns but sweep, lr and bytes_to_server, and cumulative_seconds (running sum
        of epoch_seconds within the trial); sorted by sweep, trial_id, epoch.

    Raises:
        OrderlabError: the root has no trials, ``sweep`` is not one of its sweeps, or no trial
            completed with epoch rows.
    """
    with results.connect(str(root)) as con:
        return _load(con, str(root), sweep)[0]


def _facets(rows: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per combination of the group columns that vary (but ``exclude``), in sorted order."""
    varying = [
        c
        for c in results.GROUP_COLUMNS
        if c != "task" and c not in exclude and rows[c].nunique(dropna=False) > 1
    ]
    keys = ["task", *varying]
    facets = []
    for key, part in rows.groupby(keys, dropna=False, sort=True):
        title = ", ".join(
            [str(key[0]), *(f"{c}={'-' if pd.isna(v) else v}" for c, v in zip(varying, key[1:], strict=True))]
        )
        facets.append((title, part))
    return facets


def _colors(orderings: list[str], baseline: str) -> dict[str, Any]:
    """One fixed color per ordering across all figures, the baseline first and black."""
    from matplotlib.colors import TABLEAU_COLORS

    palette = list(TABLEAU_COLORS.values())  # tab10's colors
    others = [o for o in sorted(orderings) if o != baseline]
    colors: dict[str, Any] = {baseline: "black"} if baseline in orderings else {}
    colors.update({o: palette[i % len(palette)] for i, o in enumerate(others)})
    return colors


def _new_figure(num_rows: int, num_cols: int) -> tuple[Figure, np.ndarray]:
    """An Agg-backed figure with a [num_rows, num_cols] grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(
        figsize=(FIGURE_WIDTH_INCHES, 0.8 + PANEL_HEIGHT_INCHES * num_rows), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, num_cols, squeeze=False)
    return figure, axes


def _plot_mean_band(axes: Axes, part: pd.DataFrame, x: str, y: str, colors: dict[str, Any]) -> bool:
    """Per ordering: the mean of ``y`` over seeds by epoch at the mean ``x``, with a min–max band.

    Returns:
        Whether anything was drawn (``y`` has values).
    """
    drawn = False
    for ordering in colors:  # the baseline first, then the others sorted
        rows = part[part["ordering"] == ordering]
        by_epoch = rows.dropna(subset=[x, y]).groupby("epoch")
        if by_epoch.ngroups == 0:
            continue
        at = by_epoch[x].mean()
        values = by_epoch[y].agg(["mean", "min", "max"])
        axes.plot(at, values["mean"], color=colors[ordering], label=legend_label(ordering), linewidth=1.8)
        axes.fill_between(at, values["min"], values["max"], color=colors[ordering], alpha=0.18, linewidth=0)
        drawn = True
    return drawn


def _legend(
    figure: Figure, colors: dict[str, Any], orderings: list[str], title: str, marker: str | None = None
) -> None:
    """One legend above the panels: a line (with ``marker``) per ordering, named by ``legend_label``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[o], linewidth=2, marker=marker) for o in orderings]
    labels = [legend_label(o) for o in orderings]
    figure.legend(handles, labels, loc="outside upper center", ncols=min(len(orderings), 5), title=title)


def _curves_figure(rows: pd.DataFrame, x: str, x_label: str, colors: dict[str, Any]) -> Figure:
    """Train loss (left) and validation metric (right) against ``x``, one row per facet."""
    from matplotlib.ticker import MaxNLocator

    facets = _facets(rows)
    figure, axes = _new_figure(len(facets), 2)
    for (title, part), (loss_axes, metric_axes) in zip(facets, axes, strict=True):
        _plot_mean_band(loss_axes, part, x, "train_loss", colors)
        loss_axes.set(title=f"{title}: train loss", xlabel=x_label, ylabel="train loss (full pass)")
        metric_name = part["val_metric_name"].dropna()
        name = str(metric_name.iloc[0]) if len(metric_name) else "validation metric"
        if not _plot_mean_band(metric_axes, part, x, "val_metric", colors):
            metric_axes.text(0.5, 0.5, "no validation metric", ha="center", transform=metric_axes.transAxes)
        metric_axes.set(title=f"{title}: validation {name}", xlabel=x_label, ylabel=name)
        for each in (loss_axes, metric_axes):
            each.grid(alpha=0.3)
            if x == "epoch_count":
                each.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(figure, colors, list(colors), f"line: mean over seeds; {BAND}")
    return figure


def _herding_figure(rows: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Parallel herding bound by epoch, one panel per facet, orderings with values only."""
    from matplotlib.ticker import MaxNLocator

    measured = rows.dropna(subset=["herding"])
    facets = _facets(measured)
    figure, axes = _new_figure(len(facets), 1)
    for (title, part), (panel,) in zip(facets, axes, strict=True):
        _plot_mean_band(panel, part, "epoch_count", "herding", colors)
        panel.set(title=f"{title}: parallel herding bound", xlabel="epoch", ylabel="herding bound")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
    present = set(measured["ordering"])
    _legend(figure, colors, [o for o in colors if o in present], f"line: mean over seeds; {BAND}")
    return figure


def _time_figure(rows: pd.DataFrame, order: list[str]) -> Figure:
    """Mean seconds per epoch by ordering (in ``order``), stacked by part, one panel per facet."""
    facets = _facets(rows)
    figure, axes = _new_figure(len(facets), 1)
    for (title, part), (panel,) in zip(facets, axes, strict=True):
        means = part.groupby("ordering")[
            ["epoch_seconds", *(column for column, _, _ in TIME_PARTS[:-1])]
        ].mean()
        means = means.loc[[o for o in order if o in means.index]]
        parts = means[[c for c, _, _ in TIME_PARTS[:-1]]].fillna(0.0)
        means["other"] = (means["epoch_seconds"] - parts.sum(axis=1)).clip(lower=0.0).fillna(0.0)
        bottom = np.zeros(len(means))
        names = [legend_label(o) for o in means.index]
        for column, label, color in TIME_PARTS:
            values = means[column].fillna(0.0).to_numpy()
            panel.bar(names, values, bottom=bottom, color=color, label=label, width=0.6)
            bottom += values
        panel.set(title=f"{title}: seconds per epoch (mean over epochs and seeds)", ylabel="seconds")
        panel.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(TIME_PARTS))
    return figure


def swept_axis(rows: pd.DataFrame) -> str | None:
    """The numeric axis the trials of ``rows`` sweep: the first SWEPT_AXES column with 2+ values.

    Args:
        rows: trial or epoch rows with the SWEPT_AXES columns, e.g. ``completed_epochs(root)``.

    Returns:
        The column name (num_workers before batch_size, lr, microbatch_size), or None when each
        column has at most one value (nulls aside).
    """
    return next((c for c in SWEPT_AXES if rows[c].nunique(dropna=True) > 1), None)


def _covarying(rows: pd.DataFrame, axis: str) -> tuple[str, ...]:
    """Group columns that vary but are a function of ``axis`` (e.g. lr scaled with batch_size).

    Faceting by them would leave one axis value per row of panels, so they follow the axis instead.
    """
    with_axis = rows.dropna(subset=[axis])
    return tuple(
        c
        for c in results.GROUP_COLUMNS
        if c != axis
        and with_axis[c].nunique(dropna=False) > 1
        and (with_axis.groupby(axis)[c].nunique(dropna=False) == 1).all()
    )


def final_by_axis(rows: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Per facet, ordering and ``axis`` value: the mean, min and max over seeds of final values.

    A trial's final value of a FINAL_METRICS column is the one in its last epoch row (largest
    ``epoch``); trials whose final value or ``axis`` is null count for nothing. Facets are the
    combinations of the varying group columns other than ``axis`` and the columns that are a
    function of it (those vary along the axis instead).

    Args:
        rows: epoch rows with the trials' columns, e.g. ``completed_epochs(root, sweep)``.
        axis: a numeric trials column, e.g. ``swept_axis(rows)``.

    Returns:
        Columns facet (the row title, e.g. "digits-logreg, batch_size=16"), ordering, ``axis``,
        metric (a FINAL_METRICS key), mean, min, max, num_seeds (trials with a value); one row per
        combination with values, sorted by facet order, ordering, ``axis``, metric.
    """
    finals = rows.loc[rows.groupby(["sweep", "trial_id"])["epoch"].idxmax()]
    frames = []
    for index, (title, part) in enumerate(_facets(finals, exclude=(axis, *_covarying(finals, axis)))):
        values = part.melt(id_vars=["ordering", axis], value_vars=list(FINAL_METRICS), var_name="metric")
        values = values.astype({"value": float}).dropna(subset=[axis, "value"])
        stats = values.groupby(["ordering", axis, "metric"])["value"].agg(["mean", "min", "max", "count"])
        frames.append(stats.reset_index().assign(facet=title, facet_index=index))
    columns = ["facet", "ordering", axis, "metric", "mean", "min", "max", "num_seeds"]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True).rename(columns={"count": "num_seeds"})
    return out.sort_values(["facet_index", "ordering", axis, "metric"], kind="stable")[columns].reset_index(
        drop=True
    )


def _final_figure(rows: pd.DataFrame, axis: str, colors: dict[str, Any]) -> Figure:
    """Final train loss (and final herding bound, when measured) against ``axis``, one row per facet."""
    from matplotlib.ticker import NullLocator

    values = final_by_axis(rows, axis)
    metrics = [m for m in FINAL_METRICS if (values["metric"] == m).any()]
    facets = list(dict.fromkeys(values["facet"]))
    figure, axes = _new_figure(len(facets), len(metrics))
    covarying = _covarying(rows, axis)
    x_label = axis + (f" ({', '.join(covarying)} varies with it)" if covarying else "")
    for facet, row_axes in zip(facets, axes, strict=True):
        part = values[values["facet"] == facet]
        at = sorted(part[axis].unique())  # a missing point leaves a gap in its ordering's line
        for metric, panel in zip(metrics, row_axes, strict=True):
            drawn = False
            for ordering in colors:
                line = part[(part["ordering"] == ordering) & (part["metric"] == metric)]
                if line.empty:
                    continue
                line = line.set_index(axis).reindex(at)
                color = colors[ordering]
                panel.plot(at, line["mean"], color=color, marker="o", linewidth=1.8, markersize=5)
                panel.fill_between(at, line["min"], line["max"], color=color, alpha=0.18, linewidth=0)
                drawn = True
            if not drawn:
                panel.text(0.5, 0.5, f"no {FINAL_METRICS[metric]}", ha="center", transform=panel.transAxes)
            panel.set_xscale("log", base=SWEPT_AXES[axis])
            panel.set_xticks(at, labels=[format(v, "g") for v in at])  # the swept values, not 2^k
            panel.xaxis.set_minor_locator(NullLocator())
            panel.set(title=f"{facet}: {FINAL_METRICS[metric]}", xlabel=x_label, ylabel=FINAL_METRICS[metric])
            panel.grid(alpha=0.3)
    present = set(values["ordering"])
    title = f"final epoch; marker: mean over seeds; {BAND}"
    _legend(figure, colors, [o for o in colors if o in present], title, marker="o")
    return figure


def _png(figure: Figure, path: Path) -> bytes:
    """Save ``figure`` as PNG at ``path`` and return the bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    path.write_bytes(data)
    return data


def _summary_html(df: pd.DataFrame) -> str:
    """The summary table as HTML: the varying group columns, then ``results.summary_cells``."""
    varying = [c for c in results.GROUP_COLUMNS if df[c].nunique(dropna=False) > 1]
    cells = results.summary_cells(df)
    for i, column in enumerate(varying):
        cells.insert(i, column, ["-" if pd.isna(v) else str(v) for v in df[column]])
    return cells.to_html(index=False, border=0, classes="summary")


def _best_html(best: pd.DataFrame) -> str:
    """``results.best_trials`` as HTML, with what "best" means."""
    table = best.to_html(
        index=False, border=0, classes="summary", float_format=lambda v: f"{v:.6g}", na_rep="-"
    )
    return (
        f'{table}\n<p class="note">The completed trial with the lowest train loss at its last epoch among '
        "the grid point's num_trials (a search samples several per grid point: each ordering at its own "
        "best setting). Stopped, diverged and failed trials are counted in num_trials, never best.</p>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table.summary { border-collapse: collapse; font-size: 0.85em; }
table.summary th, table.summary td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }
table.summary td { white-space: nowrap; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def _html(title: str, meta: str, summary_table: str, sections: list[tuple[str, str]]) -> str:
    """The report page; ``sections`` are (heading, inner HTML)."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{inner}" for h, inner in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">{meta}</p>
<h2>Summary</h2>
{summary_table}
<p class="note">Final train loss: mean ± sample std over seeds; 95% CI: t interval of that mean.
Target: the baseline's final mean train loss. Epochs and s to baseline: first epoch (and cumulative
mean epoch seconds) at which the ordering's mean curve is at or below the target; speedup: the
baseline's epochs to its own final loss divided by the ordering's (time speedup: the same in
seconds), with a bootstrap 95% CI over seeds; "-": undefined. Diverged trials are counted, not
averaged.</p>
{body}
</body>
</html>
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}">'


def report(
    root: str | Path, sweep: str | None = None, baseline: str = "rr", out: str | Path | None = None
) -> Path:
    """Write ``report.html`` (figures embedded as base64 PNG) and the figures as PNG files.

    Args:
        root: results root (storage) of one or more sweeps, a local path or a URI.
        sweep: only this sweep (default: every sweep under ``root``).
        baseline: the ordering whose final train loss is the target, e.g. "rr".
        out: output directory (created); default ``{root}/reports/{sweep or "all"}`` for a local
            root, ``./reports/{sweep or "all"}`` for a URI.

    Returns:
        The path of ``report.html``.

    Raises:
        OrderlabError: the root has no trials, the sweep is not in it, nothing completed, the
            baseline has no completed trials, or the output directory cannot be written.
    """
    root = str(root)
    with results.connect(root) as con:  # one read of the root's files for every query
        rows, statuses = _load(con, root, sweep)
        orderings = sorted(rows["ordering"].unique())
        if baseline not in orderings:
            raise OrderlabError(
                f"baseline {baseline!r} has no completed trials under {root!r}; orderings there: "
                f"{', '.join(orderings)}"
            )
        summary = results.summary(root, baseline=baseline, sweep=sweep, con=con)
        best = results.best_trials(root, sweep=sweep, con=con)
    default_parent = Path("." if "://" in root else root) / "reports"
    out_dir = Path(out) if out is not None else default_parent / (sweep or "all")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OrderlabError(
            f"cannot create report directory {str(out_dir)!r} ({exc}); pass a writable --out"
        ) from exc

    rows["epoch_count"] = rows["epoch"] + 1  # epoch index e is the state after e + 1 epochs
    colors = _colors(orderings, baseline)
    axis = swept_axis(rows)
    final_name = f"final_vs_{axis}"
    figures: dict[str, Figure | None] = {
        "loss_vs_epoch": _curves_figure(rows, "epoch_count", "epoch", colors),
        "loss_vs_seconds": _curves_figure(rows, "cumulative_seconds", "cumulative epoch seconds", colors),
        "herding": _herding_figure(rows, colors) if rows["herding"].notna().any() else None,
        final_name: _final_figure(rows, axis, colors) if axis is not None else None,
        "time_breakdown": _time_figure(rows, list(colors)),
    }
    images = {name: _png(fig, out_dir / f"{name}.png") for name, fig in figures.items() if fig is not None}
    for stale in ["herding", *(f"final_vs_{a}" for a in SWEPT_AXES)]:  # figures of an earlier report
        if stale not in images:
            (out_dir / f"{stale}.png").unlink(missing_ok=True)

    sweeps = sorted(rows["sweep"].unique())
    title = f"orderlab report: {', '.join(sweeps)}"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    meta = html.escape(
        f"root {root}; sweep(s) {', '.join(sweeps)}; baseline {baseline}; trials: {counts}; "
        f"generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Figures show completed trials only; "
        f"lines are means over seeds, {BAND}."
    )
    herding = (
        _img(images["herding"], "parallel herding bound by epoch")
        if "herding" in images
        else '<p class="note">Skipped: <code>epochs.herding</code> has no values for these trials '
        "(the parallel herding bound is stored only when the sweep measures it).</p>"
    )
    final = (
        _img(images[final_name], f"final train loss by {axis}")
        if final_name in images
        else '<p class="note">Skipped: the completed trials have one value each of '
        f"{', '.join(SWEPT_AXES)}; there is no swept numeric axis to plot against.</p>"
    )
    searched = (
        [("Best trial of each grid point", _best_html(best))]
        if len(best) and (best["num_trials"] > 1).any()
        else []
    )
    sections = [
        *searched,
        ("Train loss and validation metric by epoch", _img(images["loss_vs_epoch"], "loss by epoch")),
        ("By wall-clock (cumulative epoch seconds)", _img(images["loss_vs_seconds"], "loss by seconds")),
        ("Parallel herding bound", herding),
        (f"Final values by {axis or 'swept axis'}", final),
        ("Time per epoch", _img(images["time_breakdown"], "seconds per epoch by part")),
    ]
    path = out_dir / "report.html"
    path.write_text(_html(title, meta, _summary_html(summary), sections), encoding="utf-8")
    return path
