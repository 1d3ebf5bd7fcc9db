"""The ``orderlab`` command: run, sweep, results.

Every error a user can cause is an ``OrderlabError``: printed as one message without a traceback,
exit status 2. Usage errors (bad flags) also exit 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer

from orderlab.errors import DamagedResultsWarning, OrderlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="orderlab: does a smarter example order (GraB, PairBalance, CD-GraB) beat random reshuffling?",
)

ConfigArg = Annotated[Path, typer.Argument(help="experiment YAML, e.g. configs/demo.yaml")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="dotted override KEY=VALUE (YAML value), repeatable")
]
AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="show Ray's and Tune's own output")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", help="one line per finished trial, no live progress table")
]


def _print_best(best) -> None:
    """``results.best_trials``, when some grid point ran several trials (a search)."""
    if len(best) and (best["num_trials"] > 1).any():
        print("\nbest completed trial of each grid point:")
        print((best.drop(columns="sweep") if best["sweep"].nunique() == 1 else best).to_string(index=False))


def _print_outcome(result) -> None:
    from orderlab import results

    stopped = f", {result.num_stopped} stopped early" if result.num_stopped else ""
    print(
        f"\nsweep {result.name}: {result.num_trials} trials, {result.num_errors} errors{stopped}; "
        f"results in {result.storage}"
    )
    print(results.format_summary(result.summary))
    _print_best(result.best)
    print(
        f'\nquery: orderlab results {result.storage} --sql "SELECT ordering, epoch, avg(train_loss) '
        'FROM epochs JOIN trials USING (trial_id) GROUP BY ALL ORDER BY ALL"'
    )


@app.command(
    epilog="Example: orderlab run configs/tiny.yaml --set ordering.name=cd-grab --set train.epochs=3"
)
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run one trial of CONFIG (its sweep axes are ignored) and print its summary."""
    from orderlab.sweep import run as run_one

    _print_outcome(run_one(config, set_ or [], address=address, verbose=verbose, quiet=quiet))


@app.command(
    epilog="Example: orderlab sweep configs/demo.yaml --set train.epochs=5 --set 'sweep.seed=[0,1,2]'"
)
def sweep(
    config: ConfigArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="finish an interrupted sweep (same storage): finished trials are kept"),
    ] = False,
) -> None:
    """Run every trial of CONFIG's sweep on Ray, showing live progress; print a line per finished trial,
    then a table per ordering (and each grid point's best trial after a search)."""
    from orderlab.sweep import sweep as run_sweep

    result = run_sweep(config, set_ or [], address=address, verbose=verbose, resume=resume, quiet=quiet)
    _print_outcome(result)
    if result.num_errors:
        raise typer.Exit(1)


@contextmanager
def _damaged_files_exit() -> Iterator[None]:
    """Print each DamagedResultsWarning as one line (no traceback) and exit 2 when there was one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DamagedResultsWarning)
        yield
    damaged = [w for w in caught if issubclass(w.category, DamagedResultsWarning)]
    for other in caught:
        if other not in damaged:
            warnings.showwarning(other.message, other.category, other.filename, other.lineno)
    for warning in damaged:
        print(f"orderlab: warning: {warning.message}", file=sys.stderr)
    if damaged:
        raise typer.Exit(2)


@app.command(
    epilog='Example: orderlab results results/ --sql "SELECT ordering, max(epoch) FROM epochs JOIN trials USING (trial_id) GROUP BY ALL"'
)
def results(
    root: Annotated[str, typer.Argument(help="results root (storage) of one or more sweeps")],
    sweep: Annotated[str | None, typer.Option(help="only this sweep")] = None,
    baseline: Annotated[str, typer.Option(help="ordering whose final train loss is the target")] = "rr",
    sql: Annotated[
        str | None, typer.Option(help="run this SQL over the views `trials` and `epochs` instead")
    ] = None,
    compact: Annotated[
        bool,
        typer.Option(
            "--compact",
            help="rewrite each sweep's rows as one Parquet part per table (not while its trials run)",
        ),
    ] = False,
) -> None:
    """Print the summary per ordering (final loss, epochs to the baseline's final loss) and a search's
    best trial of each grid point, run SQL, or --compact."""
    import duckdb

    from orderlab import results as tables

    with _damaged_files_exit():
        if compact:
            done = tables.compact(root, sweep=sweep)
            print(
                f"compacted {len(done.sweeps)} sweep(s) ({', '.join(done.sweeps) or 'nothing to merge'}): "
                f"{done.files_read} files read, {done.rows['trials']} trial rows and "
                f"{done.rows['epochs']} epoch rows in {len(done.parts)} part(s)"
            )
        elif sql is not None:
            try:
                print(tables.connect(root).sql(sql).df().to_string(index=False))
            except duckdb.Error as error:
                raise OrderlabError(f"--sql failed: {error}") from error
        else:
            with tables.connect(root) as con:  # one read of the root's files for both
                print(tables.format_summary(tables.summary(root, baseline=baseline, sweep=sweep, con=con)))
                _print_best(tables.best_trials(root, sweep=sweep, con=con))


@app.command(epilog="Example: orderlab report results/tiny --sweep tiny --baseline rr --out report/")
def report(
    root: Annotated[str, typer.Argument(help="results root (storage) of one or more sweeps")],
    sweep: Annotated[str | None, typer.Option(help="only this sweep")] = None,
    baseline: Annotated[str, typer.Option(help="ordering whose final train loss is the target")] = "rr",
    out: Annotated[
        Path | None, typer.Option(help="output directory (default: ROOT/reports/SWEEP, or 'all')")
    ] = None,
) -> None:
    """Write report.html (figures embedded) and the figures as PNG: loss curves, herding, time per epoch."""
    from orderlab.report import report as write_report

    with _damaged_files_exit():
        path = write_report(root, sweep=sweep, baseline=baseline, out=out)
        print(f"wrote {path} and its figures (*.png) in {path.parent}")


@app.command(
    epilog="Example: orderlab submit configs/tiny.yaml --address http://127.0.0.1:8265 --set train.epochs=3"
)
def submit(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML to run as a Ray Job")] = None,
    address: Annotated[
        str | None,
        typer.Option(help="the head's Jobs API, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS)"),
    ] = None,
    set_: SetOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="stream the job's logs until it ends")
    ] = True,
    status: Annotated[str | None, typer.Option(metavar="JOB", help="print JOB's state")] = None,
    logs: Annotated[str | None, typer.Option(metavar="JOB", help="print JOB's logs so far")] = None,
    stop: Annotated[str | None, typer.Option(metavar="JOB", help="stop JOB")] = None,
) -> None:
    """Run CONFIG's sweep on a Ray cluster as a Ray Job (exit 0 iff it SUCCEEDED), or --status/--logs/--stop JOB."""
    from orderlab import submit as jobs

    given = [job for job in (status, logs, stop) if job is not None]
    if len(given) + (config is not None) != 1:
        raise OrderlabError("give CONFIG to submit a sweep, or exactly one of --status/--logs/--stop JOB")
    if status is not None:
        print(jobs.job_status(address, status))
    elif logs is not None:
        print(jobs.job_logs(address, logs), end="")
    elif stop is not None:
        stopped = jobs.stop_job(address, stop)
        print(f"job {stop}: {'stop requested' if stopped else 'had already ended'}")
    else:
        assert config is not None  # the check above: CONFIG, or one of the job options
        outcome = jobs.submit(config, set_ or [], address=address, wait=wait)
        if outcome.status not in (None, "SUCCEEDED"):
            raise typer.Exit(1)


data_app = typer.Typer(
    no_args_is_help=True, help="Download and check the tasks' data files (sha256-checked)."
)
app.add_typer(data_app, name="data")
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="data directory (default: ORDERLAB_DATA, else ~/.cache/orderlab/data)"),
]


@data_app.command("fetch", epilog="Example: orderlab data fetch wikitext2-lstm --data-dir ~/data/orderlab")
def data_fetch(
    task: Annotated[str, typer.Argument(help="task name, e.g. mnist-logreg")], data_dir: DataDirOpt = None
) -> None:
    """Download TASK's missing or corrupt data files from their canonical URLs (resumable, checksum-verified)."""
    from orderlab.data import fetch_files
    from orderlab.tasks import resolve_data_dir
    from orderlab.tasks.files import files_of

    directory = resolve_data_dir(str(data_dir) if data_dir else None)
    paths = fetch_files(files_of(task), directory)
    print(f"{task}: {len(paths)} file(s) verified in {directory}")


@data_app.command("check", epilog="Example: orderlab data check mnist-logreg --data-dir ../shared/data")
def data_check(
    task: Annotated[str | None, typer.Argument(help="only this task's files")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Print every data file's status (ok, unverified, missing, corrupt). A corrupt file is an error, and
    so, with TASK, is a file TASK needs that is missing (exit status 2, as a script can test)."""
    from orderlab.data import check_files, format_status_table, missing_requirements
    from orderlab.tasks import resolve_data_dir
    from orderlab.tasks.files import FILES, files_of, tasks_by_file

    directory = resolve_data_dir(str(data_dir) if data_dir else None)
    rows = check_files(files_of(task) if task else FILES.values(), directory)
    print(f"data directory {directory}\n{format_status_table(rows, tasks_by_file())}")
    problems = []
    corrupt = [str(directory / file.relative) for file, status in rows if status == "corrupt"]
    if corrupt:
        problems.append(
            f"corrupt data files (delete them and run `orderlab data fetch TASK`): {', '.join(corrupt)}"
        )
    missing = missing_requirements(rows) if task else []  # without TASK, absent files may be unneeded
    if missing:
        names = "; ".join(" or ".join(str(directory / f.relative) for f in group) for group in missing)
        problems.append(
            f"task {task} needs data files that are missing: {names}; run `orderlab data fetch {task} "
            f"--data-dir {directory}` (it downloads what can be downloaded and says where to get the rest)"
        )
    if problems:
        raise OrderlabError("\n".join(problems))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    try:
        outcome = app(args=argv, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except OrderlabError as error:
        print(f"orderlab: error: {error}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return 2
    except click.exceptions.Abort:
        return 130
    return outcome if isinstance(outcome, int) else 0


if __name__ == "__main__":
    sys.exit(main())
