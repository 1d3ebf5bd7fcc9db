"""Unit tests for orderlab.report: PNG figures, the self-contained HTML page, errors, the CLI command."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from orderlab import results
from orderlab.cli import main
from orderlab.errors import OrderlabError
from orderlab.report import (
    LEGEND_LABELS,
    _final_figure,
    _time_figure,
    completed_epochs,
    final_by_axis,
    legend_label,
    report,
    swept_axis,
)

CHROMIUM = "/usr/bin/chromium"
FIGURES = ("loss_vs_epoch", "loss_vs_seconds", "herding", "final_vs_batch_size", "time_breakdown")
WORKER_ORDERINGS = ("rr", "so", "grab", "pair-balance", "cd-grab")


def write_results(root: str, *, herding: bool = True, searched: bool = False) -> None:
    """Two batch sizes (facets) x rr, grab, cd-grab x 2 seeds x 5 epochs, plus one diverged trial;
    ``searched``: as a search sweep would record them (grid axes ordering and batch size, seed sampled)."""
    rng = np.random.default_rng(0)
    speed = {"rr": 0.3, "grab": 0.45, "cd-grab": 0.5}
    for batch_size in (16, 32):
        for ordering, rate in speed.items():
            for seed in (0, 1):
                trial_id = f"{ordering}-b{batch_size}-s{seed}"
                results.write_trial(
                    root,
                    {
                        "trial_id": trial_id,
                        "sweep": "s",
                        "task": "digits-logreg",
                        "ordering": ordering,
                        "num_workers": 2,
                        "batch_size": batch_size,
                        "lr": 0.1,
                        "lr_schedule": "constant",
                        "seed": seed,
                        "epochs": 5,
                        "status": "completed",
                        **(
                            {
                                "grid_point_json": json.dumps(
                                    {"ordering.name": ordering, "train.batch_size": batch_size}
                                ),
                                "searched_json": json.dumps({"seed": seed}),
                            }
                            if searched
                            else {}
                        ),
                    },
                )
                for epoch in range(5):
                    compute, allreduce, wait = 0.5 + 0.1 * rng.random(), 0.1, 0.05 if rate > 0.3 else 0.0
                    results.write_epoch(
                        root,
                        {
                            "trial_id": trial_id,
                            "sweep": "s",
                            "epoch": epoch,
                            "train_loss": 2.0 * np.exp(-rate * (epoch + 1)) + 0.05 * rng.random(),
                            "val_metric": 0.5 + 0.08 * epoch * rate + 0.02 * rng.random(),
                            "val_metric_name": "accuracy",
                            "epoch_seconds": compute + allreduce + wait + 0.02,
                            "compute_seconds": compute,
                            "allreduce_seconds": allreduce,
                            "order_wait_seconds": wait,
                            "herding": (3.0 - rate * epoch) if herding and ordering != "rr" else None,
                        },
                    )
    results.write_trial(
        root,
        {"trial_id": "rr-diverged", "sweep": "s", "ordering": "rr", "batch_size": 16, "status": "diverged"},
    )


def write_worker_sweep(
    root: str, *, num_workers: tuple[int, ...] = (4, 8, 16), lr_scaled: bool = False, sweep: str = "w"
) -> None:
    """num_workers x the five orderings x seeds 0, 1 x 3 epochs, batch 64; plus a diverged and an
    error trial with epoch rows (not plotted). ``lr_scaled``: a batch-size sweep (16, 64) at 4
    workers instead, with lr proportional to batch_size."""
    rng = np.random.default_rng(1)
    points = [(4, b, 0.1 * b / 16) for b in (16, 64)] if lr_scaled else [(w, 64, 0.1) for w in num_workers]
    trials = [
        (f"{o}-w{w}-b{b}-s{seed}", o, w, b, lr, seed, "completed")
        for w, b, lr in points
        for o in WORKER_ORDERINGS
        for seed in (0, 1)
    ]
    trials += [
        ("rr-bad", "rr", points[-1][0], 64, 0.1, 2, "diverged"),
        ("so-bad", "so", 4, 64, 0.1, 3, "error"),
    ]
    for trial_id, ordering, workers, batch_size, lr, seed, status in trials:
        trial = {"trial_id": trial_id, "sweep": sweep, "task": "digits-logreg", "ordering": ordering}
        trial |= {"num_workers": workers, "batch_size": batch_size, "microbatch_size": batch_size // workers}
        trial |= {"lr": lr, "seed": seed, "epochs": 3, "status": status}
        results.write_trial(root, trial)
        for epoch in range(3):
            loss = 1e6 if status != "completed" else 1.0 / (epoch + 1) + 0.01 * workers + 0.1 * rng.random()
            results.write_epoch(
                root,
                {
                    "trial_id": trial_id,
                    "sweep": sweep,
                    "epoch": epoch,
                    "train_loss": loss,
                    "epoch_seconds": 0.5,
                    # rr measures no herding; so's final epoch has none (it counts for nothing then)
                    "herding": None
                    if ordering == "rr" or (ordering == "so" and epoch == 2)
                    else workers * (3 - epoch) + rng.random(),
                },
            )


class _Page(HTMLParser):
    """The <title> text and the src of every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.title, self.images, self._in_title = "", [], False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def assert_sane_png(path: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[1] > 300 and pixels.shape[0] > 200, pixels.shape
    assert pixels.std() > 0  # not blank


def reported(tmp_path_factory: pytest.TempPathFactory, write: Callable[[str], None]) -> tuple[Path, Path]:
    """(results root, report.html) of the results that ``write`` puts under a fresh root."""
    root = tmp_path_factory.mktemp("res")
    write(str(root))
    return root, report(root, out=root / "out")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(results root, report.html) of the fixture results."""
    return reported(tmp_path_factory, write_results)


def test_report_writes_pngs_and_self_contained_html(made: tuple[Path, Path]) -> None:
    root, path = made
    assert path == root / "out" / "report.html"
    for name in FIGURES:
        assert_sane_png(root / "out" / f"{name}.png")
    page = parse(path.read_text())
    assert page.title == "orderlab report: s"
    assert len(page.images) == len(FIGURES)
    embedded = {base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images}
    assert embedded == {(root / "out" / f"{name}.png").read_bytes() for name in FIGURES}
    text = path.read_text()
    assert "min–max over seeds" in text
    assert "<script" not in text and not re.search(r'(src|href)="(?!data:)', text)  # nothing to fetch
    # The summary table: one row per facet and ordering, the varying group column first.
    assert text.count("<tr>") == 1 + 2 * 3
    assert "<th>batch_size</th>" in text and "speedup [95% CI]" in text


def test_a_search_sweeps_report_lists_each_grid_points_best_trial(
    made: tuple[Path, Path], tmp_path: Path
) -> None:
    assert "Best trial of each grid point" not in made[1].read_text()  # a grid: one trial per point
    write_results(str(tmp_path), searched=True)
    text = report(tmp_path, out=tmp_path / "out").read_text()
    section = text[text.index("<h2>Best trial of each grid point</h2>") :]
    section = section[: section.index("</table>")]
    finals = results.epochs(str(tmp_path), epoch=4).set_index("trial_id")["train_loss"]
    for ordering in ("rr", "grab", "cd-grab"):
        for batch_size in (16, 32):
            seeds = [finals[f"{ordering}-b{batch_size}-s{seed}"] for seed in (0, 1)]
            best = f"{ordering}-b{batch_size}-s{int(np.argmin(seeds))}"
            assert f"<td>{best}</td>" in section and f"<td>{min(seeds):.6g}</td>" in section
    assert section.count("<tr>") == 6  # one body row per grid point


def test_report_default_out_and_sweep(made: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = made
    assert report(str(root), sweep="s") == root / "reports" / "s" / "report.html"


def test_herding_figure_is_skipped_without_values(tmp_path: Path) -> None:
    write_results(str(tmp_path), herding=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "herding.png").write_bytes(b"stale")
    path = report(tmp_path, out=tmp_path / "out")
    assert not (tmp_path / "out" / "herding.png").exists()
    text = path.read_text()
    assert "Skipped: <code>epochs.herding</code> has no values" in text
    assert len(parse(text).images) == 4
    assert set(final_by_axis(completed_epochs(tmp_path), "batch_size")["metric"]) == {"train_loss"}


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(results root, report.html) of a num_workers sweep."""
    return reported(tmp_path_factory, write_worker_sweep)


def test_num_workers_sweep_gets_final_vs_num_workers(workers: tuple[Path, Path]) -> None:
    root, path = workers
    figure = root / "out" / "final_vs_num_workers.png"
    assert_sane_png(figure)
    # microbatch_size varies too (batch_size // num_workers), but num_workers comes first.
    assert sorted(p.name for p in (root / "out").glob("final_vs_*.png")) == ["final_vs_num_workers.png"]
    text = path.read_text()
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in parse(text).images]
    assert len(embedded) == 5 and figure.read_bytes() in embedded
    assert "<h2>Final values by num_workers</h2>" in text


def test_final_by_axis_matches_pandas(workers: tuple[Path, Path]) -> None:
    root, _ = workers
    rows = completed_epochs(root)
    assert swept_axis(rows) == "num_workers"
    got = final_by_axis(rows, "num_workers")
    # Independently: each completed trial's row with the largest epoch, then stats over seeds.
    trials = results.trials(str(root), status="completed")
    last = results.epochs(str(root)).sort_values("epoch").drop_duplicates("trial_id", keep="last")
    finals = last.merge(trials[["trial_id", "ordering", "num_workers"]], on="trial_id")
    assert len(finals) == 5 * 3 * 2
    for metric in ("train_loss", "herding"):
        expected = (
            finals.dropna(subset=[metric])
            .groupby(["ordering", "num_workers"])[metric]
            .agg(["mean", "min", "max", "count"])
            .reset_index()
        )
        mine = got[got["metric"] == metric].rename(columns={"num_seeds": "count"})
        merged = expected.merge(mine, on=["ordering", "num_workers"], how="outer", suffixes=("", "_got"))
        assert len(merged) == len(expected) == len(mine), metric
        for column in ("mean", "min", "max", "count"):
            np.testing.assert_allclose(merged[f"{column}_got"], merged[column], rtol=1e-12, err_msg=column)
    assert set(got["facet"]) == {"digits-logreg"}
    assert (got["num_seeds"] == 2).all()
    herding = got[got["metric"] == "herding"]
    assert set(herding["ordering"]) == {"grab", "pair-balance", "cd-grab"}  # rr: none; so: none at the end
    assert sorted(got["num_workers"].unique()) == [4, 8, 16]
    # The diverged and error trials' 1e6 losses are not plotted.
    assert got.loc[got["metric"] == "train_loss", "max"].max() < 10


def test_final_figure_legend_axis_and_labels(workers: tuple[Path, Path]) -> None:
    rows = completed_epochs(workers[0])
    colors = dict.fromkeys(["rr", "cd-grab", "grab", "pair-balance", "so"], "black")
    figure = _final_figure(rows, "num_workers", colors)
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "rr (D-RR)",
        "cd-grab (CD-GraB)",
        "grab (ID-GraB, Bal)",
        "pair-balance (ID-GraB)",
        "so",
    ]
    loss_panel, herding_panel = figure.axes
    assert loss_panel.get_title() == "digits-logreg: final train loss"
    assert herding_panel.get_title() == "digits-logreg: final parallel herding bound"
    for panel in (loss_panel, herding_panel):
        assert panel.get_xscale() == "log" and panel.get_xlabel() == "num_workers"
        assert [t.get_text() for t in panel.get_xticklabels()] == ["4", "8", "16"]
        assert panel.xaxis.get_minorticklocs().size == 0
    time_panel = _time_figure(rows, list(colors)).axes[0]
    assert [t.get_text() for t in time_panel.get_xticklabels()] == [legend_label(o) for o in colors]


def test_legend_labels() -> None:
    assert legend_label("rr") == "rr (D-RR)" and legend_label("pair-balance") == "pair-balance (ID-GraB)"
    assert legend_label("grab") == "grab (ID-GraB, Bal)" and legend_label("cd-grab") == "cd-grab (CD-GraB)"
    assert legend_label("so") == "so" and set(LEGEND_LABELS) == {"rr", "pair-balance", "grab", "cd-grab"}


def test_no_swept_axis_no_final_figure(tmp_path: Path) -> None:
    write_worker_sweep(str(tmp_path), num_workers=(8,))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "final_vs_num_workers.png").write_bytes(b"stale")
    rows = completed_epochs(tmp_path)
    assert swept_axis(rows) is None
    path = report(tmp_path, out=tmp_path / "out")
    assert not list((tmp_path / "out").glob("final_vs_*.png"))
    text = path.read_text()
    assert "Skipped: the completed trials have one value each of num_workers" in text
    assert len(parse(text).images) == 4


def test_lr_scaled_with_batch_size_follows_the_axis(tmp_path: Path) -> None:
    write_worker_sweep(str(tmp_path), lr_scaled=True)
    rows = completed_epochs(tmp_path)
    assert swept_axis(rows) == "batch_size"
    got = final_by_axis(rows, "batch_size")
    assert set(got["facet"]) == {"digits-logreg"}  # not one row of panels per lr
    assert sorted(got["batch_size"].unique()) == [16, 64]
    figure = _final_figure(rows, "batch_size", dict.fromkeys(WORKER_ORDERINGS, "black"))
    assert figure.axes[0].get_xlabel() == "batch_size (lr varies with it)"
    report(tmp_path, out=tmp_path / "out")
    assert (tmp_path / "out" / "final_vs_batch_size.png").is_file()


def test_matplotlib_stays_out_of_imports_and_backend_unchanged(made: tuple[Path, Path]) -> None:
    code = "import sys, orderlab.cli, orderlab.report, orderlab.results; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    code = (
        "import matplotlib; matplotlib.use('svg'); from orderlab.report import report; "
        f"report({str(made[0])!r}, out={str(made[0] / 'again')!r}); print(matplotlib.get_backend())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "svg"


def test_empty_root_and_unknown_sweep_are_named(made: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(OrderlabError, match=f"no trials under results root '{re.escape(str(tmp_path))}'"):
        report(tmp_path)
    with pytest.raises(OrderlabError, match=r"sweep 'nope' is not under results root .*; sweeps there: s$"):
        report(made[0], sweep="nope")
    with pytest.raises(
        OrderlabError, match=r"baseline 'rrr' has no completed trials .*; orderings there: cd-grab, grab, rr"
    ):
        report(made[0], baseline="rrr")
    only_diverged = tmp_path / "d"
    results.write_trial(str(only_diverged), {"trial_id": "a", "sweep": "x", "status": "diverged"})
    with pytest.raises(OrderlabError, match=r"no completed trial .*\(trials: 1 diverged\)"):
        report(only_diverged)


def test_cli_report(made: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--help"]) == 0
    assert "Example: orderlab report" in capsys.readouterr().out
    assert main(["report", str(made[0]), "--sweep", "s", "--baseline", "grab", "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert (tmp_path / "time_breakdown.png").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orderlab: error: no trials under results root") and "Traceback" not in err


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium); .ci/run does",
)
def test_report_renders_in_headless_chromium(made: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = made
    screenshot = tmp_path / "screenshot.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", path.as_uri(), profile=tmp_path / "p1")
    assert_sane_png(screenshot)
    from matplotlib.image import imread

    pixels = imread(screenshot)[:, :, :3]
    # Figures, not just text: a good share of the page is neither white nor near-black text.
    colored = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.2
    assert colored.mean() > 0.005, colored.mean()
    dom = chromium("--dump-dom", path.as_uri(), profile=tmp_path / "p2").stdout
    page = parse(dom)
    assert page.title == "orderlab report: s"
    assert len(page.images) == len(FIGURES)
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in page.images)
