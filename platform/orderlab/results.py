"""Result tables of docs/architecture.md: Parquet schemas, the atomic writer, DuckDB views, summaries.

Layout under a storage root (a local path or an s3://, gs://, file:// URI), one file per row:

    {root}/trials/{sweep}/{trial_id}.parquet
    {root}/epochs/{sweep}/{trial_id}/epoch-{epoch:05d}.parquet

Names are deterministic, so a retried trial or epoch overwrites its file instead of adding a row.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orderlab import stats
from orderlab.errors import OrderlabError

if TYPE_CHECKING:
    import duckdb

_STR, _I32, _I64, _F64, _UTC_US = (
    pa.string(),
    pa.int32(),
    pa.int64(),
    pa.float64(),
    pa.timestamp("us", tz="UTC"),
)
_KEYS = [pa.field("trial_id", _STR, nullable=False), pa.field("sweep", _STR, nullable=False)]

# fmt: off
TRIALS_SCHEMA = pa.schema([
    *_KEYS,
    ("task", _STR), ("ordering", _STR), ("unit", _STR),
    ("num_workers", _I32), ("batch_size", _I32), ("microbatch_size", _I32),
    ("optimizer", _STR), ("lr", _F64), ("lr_schedule", _STR), ("momentum", _F64), ("weight_decay", _F64),
    ("seed", _I32), ("epochs", _I32), ("shard_size", _I32),
    ("backend", _STR),  # train.backend: ray-train or simulated
    ("num_dropped", _I64),  # examples dropped from the tail to make equal shards
    ("status", _STR), ("error", _STR),  # status: one of STATUSES; error: the reason for error/diverged/stopped
    ("diverged_epoch", _I32),  # the epoch in which a non-finite loss or gradient appeared
    ("stopped_epoch", _I32),  # the last epoch of a trial the sweep's scheduler stopped early
    ("started_at", _UTC_US), ("finished_at", _UTC_US), ("wall_seconds", _F64),
    ("orderlab_version", _STR), ("ray_version", _STR), ("torch_version", _STR), ("python_version", _STR),
    ("git_commit", _STR),
    ("config_json", _STR),  # the whole trial config as JSON
    ("worker_node_ids", pa.list_(_STR)),  # Ray node id of each rank, in rank order
    ("server_node_id", _STR),  # Ray node id of the trial's order server
    ("test_metrics", _STR),  # JSON object: the task's held-out test metrics after the last epoch, if it has any
])

EPOCHS_SCHEMA = pa.schema([
    *_KEYS,
    pa.field("epoch", _I32, nullable=False),  # 0-based; the state after training epoch `epoch`
    ("train_loss", _F64),  # full pass at fixed weights
    ("val_loss", _F64), ("val_metric", _F64), ("val_metric_name", _STR), ("lr", _F64),
    ("epoch_seconds", _F64), ("compute_seconds", _F64), ("allreduce_seconds", _F64),
    ("order_wait_seconds", _F64),
    ("send_wait_seconds", _F64),  # waiting for room to send to the order server, and the epoch's flush
    ("bytes_to_server", _I64),
    ("herding", _F64),  # parallel herding bound of the epoch, when measured
    ("order_digest", _STR),  # sha256 of the epoch's orders of all workers: equal digests, equal orders
])
# fmt: on

TABLES: dict[str, pa.Schema] = {"trials": TRIALS_SCHEMA, "epochs": EPOCHS_SCHEMA}
#: DuckDB's name of each Arrow type the schemas use (for columns missing from older files)
_DUCKDB_TYPES = {
    "string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "double": "DOUBLE",
    "timestamp[us, tz=UTC]": "TIMESTAMPTZ", "list<item: string>": "VARCHAR[]",
}  # fmt: skip
STATUSES = ("running", "completed", "error", "diverged", "stopped")

# summary(): the columns that define one comparison; orderings are compared within a group.
GROUP_COLUMNS = (
    "sweep", "task", "backend", "unit", "num_workers", "batch_size", "optimizer",
    "lr", "lr_schedule", "momentum", "weight_decay",
)  # fmt: skip
# summary(): the columns computed in Python (orderlab.stats), in the order they are added.
_STAT_COLUMNS = (
    "epochs_to_baseline", "final_train_loss_ci95", "seconds_to_baseline",
    "speedup", "speedup_ci_low", "speedup_ci_high",
    "time_speedup", "time_speedup_ci_low", "time_speedup_ci_high",
)  # fmt: skip


def _storage(root: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and base path of a storage root: a URI via pyarrow, else an absolute local path."""
    if not root:
        raise OrderlabError("results root is empty; pass a directory or an s3://, gs://, file:// URI")
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(root)
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, OSError) as exc:
        raise OrderlabError(
            f"results root {root!r} is not a usable URI ({exc}); use s3://, gs://, file://"
        ) from exc
    return fs, path.rstrip("/")


def _row_table(table: str, row: dict[str, Any]) -> pa.Table:
    """Validate ``row`` against ``TABLES[table]`` and return it as a one-row Arrow table.

    Raises:
        OrderlabError: a required key is missing or null, a key is unknown, a value does not fit
            its column's type, ``status`` is not one of STATUSES, or a path key is not a plain name.
    """
    schema = TABLES[table]
    unknown = sorted(set(row) - set(schema.names))
    if unknown:
        raise OrderlabError(
            f"{table} row has unknown column(s) {', '.join(unknown)}; known: {', '.join(schema.names)}"
        )
    for field in schema:
        if not field.nullable and row.get(field.name) is None:
            raise OrderlabError(f"{table} row is missing required key {field.name!r}; give it a value")
    arrays = []
    for field in schema:
        value = row.get(field.name)
        try:
            arrays.append(pa.array([value], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise OrderlabError(f"{table}.{field.name}={value!r} does not fit {field.type}: {exc}") from exc
    for key in ("sweep", "trial_id"):  # they become file and directory names
        name = row[key]
        if not isinstance(name, str) or not name or name[0] == "." or "/" in name or "\\" in name:
            raise OrderlabError(f"{table}.{key}={name!r} must be a name without '/', '\\' or a leading '.'")
    status = row.get("status")
    if status is not None and status not in STATUSES:
        raise OrderlabError(f"{table}.status={status!r} is unknown; known: {', '.join(STATUSES)}")
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_atomic(root: str, parts: list[str], table: pa.Table) -> str:
    """Write ``table`` to ``{root}/{parts...}`` via a temp file and a move; return the final path."""
    fs, base = _storage(root)
    directory = "/".join([base, *parts[:-1]])
    final = f"{directory}/{parts[-1]}"
    # The temp name does not end in .parquet, so readers globbing *.parquet never see a partial file.
    tmp = f"{directory}/.{parts[-1]}.{uuid.uuid4().hex}.tmp"
    try:
        fs.create_dir(directory, recursive=True)
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(table, sink)
        fs.move(tmp, final)
    except OSError as exc:
        raise OrderlabError(
            f"cannot write results under {root!r} ({exc}); choose a writable storage root"
        ) from exc
    # Hand back what a user would pass: a local path, or a URI with the root's scheme.
    return final if isinstance(fs, pafs.LocalFileSystem) else f"{root.split('://', 1)[0]}://{final}"


def write_trial(root: str, row: dict[str, Any]) -> str:
    """Write (or overwrite) one trial's row as ``{root}/trials/{sweep}/{trial_id}.parquet``.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        row: column -> value for TRIALS_SCHEMA; ``trial_id`` and ``sweep`` are required, absent
            columns are stored as null, timestamps are datetimes (naive ones are taken as UTC).

    Returns:
        The final file's path (a URI for remote roots).

    Raises:
        OrderlabError: a required key is missing, a key is unknown, a value has the wrong type, or
            the root is not writable.
    """
    table = _row_table("trials", row)
    return _write_atomic(root, ["trials", row["sweep"], f"{row['trial_id']}.parquet"], table)


def write_epoch(root: str, row: dict[str, Any]) -> str:
    """Write (or overwrite) one epoch's row as ``{root}/epochs/{sweep}/{trial_id}/epoch-{epoch:05d}.parquet``.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        row: column -> value for EPOCHS_SCHEMA; ``trial_id``, ``sweep`` and ``epoch`` (0-based) are
            required, absent columns are stored as null.

    Returns:
        The final file's path (a URI for remote roots).

    Raises:
        OrderlabError: a required key is missing, a key is unknown, a value has the wrong type, or
            the root is not writable.
    """
    table = _row_table("epochs", row)
    parts = ["epochs", row["sweep"], row["trial_id"], f"epoch-{int(row['epoch']):05d}.parquet"]
    return _write_atomic(root, parts, table)


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Sorted paths of the finished ``*.parquet`` files under ``directory`` (none if it is absent)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def connect(root: str) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views ``trials`` and ``epochs`` over a storage root.

    Local roots get views over ``read_parquet`` globs, so rows written later show up in later
    queries; remote roots are read once through pyarrow. A table with no files yet is an empty
    view with the schema's columns (reconnect to see rows written after that).

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI; a missing root is empty.

    Returns:
        The connection; ``con.sql("SELECT ... FROM epochs").df()`` gives pandas.

    Raises:
        OrderlabError: the root is a file or cannot be listed.
    """
    import duckdb  # here, not above: writing rows needs pyarrow alone (the GPU machine has no duckdb)

    fs, base = _storage(root)
    try:
        root_is_file = fs.get_file_info(base).type == pafs.FileType.File
        files_by_table = {name: _parquet_files(fs, f"{base}/{name}") for name in TABLES}
    except OSError as exc:
        raise OrderlabError(
            f"cannot read results under {root!r} ({exc}); pass the sweep's storage root"
        ) from exc
    if root_is_file:
        raise OrderlabError(f"results root {root!r} is a file; pass the directory the sweep wrote to")
    con = duckdb.connect()
    for name, schema in TABLES.items():
        directory, files = f"{base}/{name}", files_by_table[name]
        if not files:
            con.register(name, schema.empty_table())
        elif isinstance(fs, pafs.LocalFileSystem):
            pattern = f"{directory}/**/*.parquet".replace("'", "''")  # a path, not a user value
            source = f"read_parquet('{pattern}', union_by_name=true)"
            present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
            # columns added to the schema after these files were written read as null
            added = [
                f'CAST(NULL AS {_DUCKDB_TYPES[str(f.type)]}) AS "{f.name}"'
                for f in schema
                if f.name not in present
            ]
            con.execute(f"CREATE VIEW {name} AS SELECT {', '.join(['*', *added])} FROM {source}")
        else:
            con.register(name, ds.dataset(files, schema=schema, format="parquet", filesystem=fs).to_table())
    return con


def _select(root: str, table: str, filters: dict[str, Any], order_by: str) -> pd.DataFrame:
    """``SELECT * FROM table WHERE <filters> ORDER BY order_by`` with bound parameters."""
    columns = TABLES[table].names
    unknown = sorted(set(filters) - set(columns))
    if unknown:
        raise OrderlabError(
            f"unknown {table} filter column(s) {', '.join(unknown)}; known: {', '.join(columns)}"
        )
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in filters.items():
        if isinstance(value, list | tuple | set | frozenset):
            values = sorted(value) if isinstance(value, set | frozenset) else list(value)
            clauses.append(f'"{column}" IN ({", ".join("?" * len(values))})' if values else "FALSE")
            params.extend(values)
        elif value is None:
            clauses.append(f'"{column}" IS NULL')
        else:
            clauses.append(f'"{column}" = ?')
            params.append(value)
    import duckdb

    sql = f"SELECT * FROM {table} WHERE {' AND '.join(clauses) or 'TRUE'} ORDER BY {order_by}"
    with connect(root) as con:
        try:
            return con.execute(sql, params).df()
        except duckdb.ConversionException as exc:
            raise OrderlabError(f"{table} filters {filters!r} do not match the column types: {exc}") from exc


def trials(root: str, **filters: Any) -> pd.DataFrame:
    """Trial rows as pandas, filtered by column equality, sorted by sweep and trial_id.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        **filters: column=value (a list, tuple or set means IN, None means IS NULL),
            e.g. ``trials(root, ordering=["rr", "cd-grab"], status="completed")``.

    Returns:
        One row per trial, with the columns of TRIALS_SCHEMA.

    Raises:
        OrderlabError: a filter names an unknown column or its value does not fit the column.
    """
    return _select(root, "trials", filters, "sweep, trial_id")


def epochs(root: str, **filters: Any) -> pd.DataFrame:
    """Epoch rows as pandas, filtered by column equality, sorted by trial_id and epoch.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        **filters: column=value over EPOCHS_SCHEMA (a list, tuple or set means IN, None means IS NULL).

    Returns:
        One row per (trial, epoch), with the columns of EPOCHS_SCHEMA.

    Raises:
        OrderlabError: a filter names an unknown column or its value does not fit the column.
    """
    return _select(root, "epochs", filters, "trial_id, epoch, sweep")


def _same_group(left: str, right: str) -> str:
    """SQL join condition: equal group columns, with NULL matching NULL (e.g. momentum for Adam)."""
    return " AND ".join(f"{left}.{c} IS NOT DISTINCT FROM {right}.{c}" for c in GROUP_COLUMNS)


def _group_key(values: Any) -> tuple[Any, ...]:
    """A hashable group key with every missing value (None, NaN, NA) as None."""
    return tuple(None if pd.isna(v) else v for v in values)


def _runs_by_ordering(curves: pd.DataFrame) -> dict[tuple[tuple[Any, ...], str], stats.Runs]:
    """Per (group key, ordering): the completed trials' loss and seconds matrices and final losses."""
    out: dict[tuple[tuple[Any, ...], str], stats.Runs] = {}
    keys = [*GROUP_COLUMNS, "ordering"]
    for key, rows in curves.groupby(keys, dropna=False, sort=False):
        num_epochs = int(rows["epoch"].max()) + 1
        seeds = {trial: i for i, trial in enumerate(rows["trial_id"].unique())}
        losses = np.full((len(seeds), num_epochs), np.nan)
        seconds = np.full((len(seeds), num_epochs), np.nan)
        seed_index, epoch = rows["trial_id"].map(seeds).to_numpy(), rows["epoch"].to_numpy()
        losses[seed_index, epoch] = rows["train_loss"].to_numpy(dtype=float, na_value=np.nan)
        seconds[seed_index, epoch] = rows["epoch_seconds"].to_numpy(dtype=float, na_value=np.nan)
        last = rows.loc[rows.groupby("trial_id", sort=False)["epoch"].idxmax()]
        finals = last["train_loss"].to_numpy(dtype=float, na_value=np.nan)[
            np.argsort(last["trial_id"].map(seeds).to_numpy())
        ]
        out[(_group_key(key[:-1]), key[-1])] = stats.Runs(losses, seconds, finals)
    return out


def _completed_epochs_sql() -> str:
    """SQL of the epoch rows of completed trials, with the trial's group columns and ordering."""
    return f"""
        SELECT {", ".join(f"t.{c}" for c in GROUP_COLUMNS)}, t.ordering, e.trial_id, e.epoch, e.train_loss,
               e.val_metric, e.val_metric_name, e.epoch_seconds, e.order_wait_seconds
        FROM epochs e JOIN trials t ON e.trial_id = t.trial_id AND e.sweep = t.sweep
        WHERE t.status = 'completed' AND ($sweep::VARCHAR IS NULL OR t.sweep = $sweep)"""


def summary(root: str, baseline: str = "rr", sweep: str | None = None) -> pd.DataFrame:
    """Compare orderings over seeds: one row per group (GROUP_COLUMNS) and ordering.

    Means are over completed trials; diverged trials and trials a scheduler stopped early (status
    'diverged', 'stopped') are only counted, and an ordering whose trials all diverged or stopped
    still gets a row (num_seeds 0). "Final" is each trial's row
    with the largest epoch. The target is the baseline ordering's ``final_train_loss_mean`` in the
    same group; an ordering's mean-over-seeds train-loss curve reaches it at the first epoch where
    it is <= the target (a tie reaches). Everything measured against the target is NaN when the
    group has no baseline or the curve never reaches it.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        baseline: the ordering whose final loss is the target, e.g. "rr".
        sweep: only this sweep (default: all sweeps).

    Returns:
        GROUP_COLUMNS, ordering, num_seeds (completed trials with epoch rows), final_train_loss_mean,
        final_train_loss_std (ddof=1, NaN with one seed), val_metric_mean, val_metric_name,
        epochs_to_baseline (float: epoch index + 1 at which the target is reached),
        epoch_seconds_mean and order_wait_seconds_mean (over all epochs and seeds); then
        final_train_loss_ci95 (half-width of the t 95% CI of the final mean; NaN with one seed),
        seconds_to_baseline (cumulative mean epoch_seconds up to and including that epoch),
        speedup (the baseline's epochs to its own final mean / epochs_to_baseline),
        speedup_ci_low, speedup_ci_high, time_speedup (the same with seconds), time_speedup_ci_low,
        time_speedup_ci_high (bootstrap 95% CIs over seeds, see
        ``orderlab.stats.speedup_vs_baseline``), num_diverged and num_stopped; sorted by group, then
        final_train_loss_mean (orderings without completed trials last).

    Raises:
        OrderlabError: the root cannot be read, or holds no sweep named ``sweep`` (the message
            lists the sweeps it holds).
    """
    group = ", ".join(GROUP_COLUMNS)
    sql = f"""
    WITH ep AS ({_completed_epochs_sql()}
    ), final AS (
        SELECT * FROM ep QUALIFY row_number() OVER (PARTITION BY sweep, trial_id ORDER BY epoch DESC) = 1
    ), per_ordering AS (
        SELECT {group}, ordering, count(*) AS num_seeds, avg(train_loss) AS final_train_loss_mean,
               stddev_samp(train_loss) AS final_train_loss_std, avg(val_metric) AS val_metric_mean,
               min(val_metric_name) AS val_metric_name
        FROM final GROUP BY ALL
    ), timing AS (
        SELECT {group}, ordering, avg(epoch_seconds) AS epoch_seconds_mean,
               avg(order_wait_seconds) AS order_wait_seconds_mean
        FROM ep GROUP BY ALL
    ), diverged AS (
        SELECT {group}, ordering, count(*) FILTER (status = 'diverged') AS num_diverged,
               count(*) FILTER (status = 'stopped') AS num_stopped FROM trials
        WHERE status IN ('diverged', 'stopped') AND ($sweep::VARCHAR IS NULL OR sweep = $sweep) GROUP BY ALL
    ), keys AS (
        SELECT {group}, ordering FROM per_ordering UNION SELECT {group}, ordering FROM diverged
    )
    SELECT k.*, coalesce(p.num_seeds, 0) AS num_seeds, p.final_train_loss_mean, p.final_train_loss_std,
           p.val_metric_mean, p.val_metric_name, m.epoch_seconds_mean, m.order_wait_seconds_mean,
           coalesce(d.num_diverged, 0) AS num_diverged, coalesce(d.num_stopped, 0) AS num_stopped
    FROM keys k
    LEFT JOIN per_ordering p ON {_same_group("k", "p")} AND k.ordering = p.ordering
    LEFT JOIN timing m ON {_same_group("k", "m")} AND k.ordering = m.ordering
    LEFT JOIN diverged d ON {_same_group("k", "d")} AND k.ordering = d.ordering
    ORDER BY {", ".join(f"k.{c}" for c in GROUP_COLUMNS)}, p.final_train_loss_mean, k.ordering
    """
    with connect(root) as con:
        if sweep is not None:
            sweeps = [
                row[0] for row in con.execute("SELECT DISTINCT sweep FROM trials ORDER BY sweep").fetchall()
            ]
            if sweep not in sweeps:
                there = f"its sweeps: {', '.join(sweeps)}" if sweeps else "it holds no trials"
                raise OrderlabError(f"no sweep {sweep!r} under results root {root!r}; {there}")
        df = con.execute(sql, {"sweep": sweep}).df()
        curves = con.execute(_completed_epochs_sql(), {"sweep": sweep}).df()
    runs = _runs_by_ordering(curves)
    columns: dict[str, list[float]] = {name: [] for name in _STAT_COLUMNS}
    for key, ordering in zip(df[list(GROUP_COLUMNS)].itertuples(index=False), df["ordering"], strict=True):
        group_key = _group_key(key)
        empty = stats.Runs(np.empty((0, 0)), np.empty((0, 0)), np.empty(0))
        own, base = runs.get((group_key, ordering), empty), runs.get((group_key, baseline), empty)
        speedup = stats.speedup_vs_baseline(base, own, same=ordering == baseline)
        columns["epochs_to_baseline"].append(speedup.epochs_to_target)
        columns["final_train_loss_ci95"].append(stats.t_ci_halfwidth(own.finals))
        columns["seconds_to_baseline"].append(speedup.seconds_to_target)
        for name in _STAT_COLUMNS[3:]:
            columns[name].append(getattr(speedup, name))
    df.insert(
        df.columns.get_loc("epoch_seconds_mean"), "epochs_to_baseline", columns.pop("epochs_to_baseline")
    )
    num_diverged, num_stopped = df.pop("num_diverged"), df.pop("num_stopped")
    return df.assign(**{name: np.asarray(values, dtype=float) for name, values in columns.items()}).assign(
        num_diverged=num_diverged, num_stopped=num_stopped
    )


def summary_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The text cells of ``summary()`` per ordering, as ``format_summary`` and the HTML report show them.

    Args:
        df: the DataFrame returned by ``summary()``.

    Returns:
        One row per row of ``df``, string columns: ordering, seeds, diverged, stopped, final train loss
        (mean ± std), 95% CI (± half-width), val metric, epochs to baseline, s to baseline,
        speedup [95% CI], time speedup [95% CI], epoch s, order-wait s; "-" where NaN.
    """

    def cells(column: str, spec: str, prefix: str = "") -> list[str]:
        return ["-" if pd.isna(value) else prefix + format(value, spec) for value in df[column]]

    def with_ci(column: str) -> list[str]:
        points, lows, highs = (
            cells(column, ".3g"),
            cells(f"{column}_ci_low", ".3g"),
            cells(f"{column}_ci_high", ".3g"),
        )
        return [
            p if p == "-" or lo == "-" else f"{p} [{lo}, {hi}]"
            for p, lo, hi in zip(points, lows, highs, strict=True)
        ]

    stds = ["" if std == "-" else f" ± {std}" for std in cells("final_train_loss_std", ".2g")]
    names = ["" if pd.isna(name) else f" {name}" for name in df["val_metric_name"]]
    return pd.DataFrame(
        {
            "ordering": df["ordering"].tolist(),
            "seeds": df["num_seeds"].tolist(),
            "diverged": df["num_diverged"].tolist(),
            "stopped": df["num_stopped"].tolist(),
            "final train loss": [
                m + s for m, s in zip(cells("final_train_loss_mean", ".4g"), stds, strict=True)
            ],
            "95% CI": cells("final_train_loss_ci95", ".2g", "± "),
            "val metric": [v + n for v, n in zip(cells("val_metric_mean", ".4g"), names, strict=True)],
            "epochs to baseline": cells("epochs_to_baseline", ".0f"),
            "s to baseline": cells("seconds_to_baseline", ".1f"),
            "speedup [95% CI]": with_ci("speedup"),
            "time speedup [95% CI]": with_ci("time_speedup"),
            "epoch s": cells("epoch_seconds_mean", ".2f"),
            "order-wait s": cells("order_wait_seconds_mean", ".3f"),
        }
    )


def format_summary(df: pd.DataFrame) -> str:
    """Render ``summary()`` as a plain-text table, with a header line per group when there are several.

    Args:
        df: the DataFrame returned by ``summary()``.

    Returns:
        The table as text (the columns of ``summary_cells``); group headers name only the group
        columns that differ between groups.
    """
    if df.empty:
        return "no completed trials"
    table = summary_cells(df)
    header, *lines = table.to_string(index=False).splitlines()
    group_ids = df.groupby(list(GROUP_COLUMNS), dropna=False, sort=False).ngroup().tolist()
    if max(group_ids) == 0:
        return "\n".join([header, *lines])
    varying = [c for c in GROUP_COLUMNS if df[c].nunique(dropna=False) > 1]
    out: list[str] = []
    for i, line in enumerate(lines):  # summary() rows are sorted by group, so groups are contiguous
        if i == 0 or group_ids[i] != group_ids[i - 1]:
            out += ([""] if out else []) + [" ".join(f"{c}={df[c].iloc[i]}" for c in varying), header]
        out.append(line)
    return "\n".join(out)


def ensure_writable(root: str) -> None:
    """Check that results can be written under ``root`` (creates it), before anything runs.

    Raises:
        OrderlabError: the root cannot be created or written, naming it and the fix.
    """
    fs, base = _storage(root)
    probe = f"{base}/.orderlab-write-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as exc:
        raise OrderlabError(
            f"storage={root!r} is not writable ({exc}); choose a directory or bucket you can write to"
        ) from exc


def create_marker(root: str, relative: str) -> bool:
    """Create the empty file ``{root}/{relative}``; False if it already existed (a once-only latch)."""
    fs, base = _storage(root)
    path = f"{base}/{relative}"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path):
        pass
    return True


def read_trial(root: str, sweep: str, trial_id: str) -> dict[str, Any] | None:
    """The trials row of one trial, or None when it has none yet."""
    fs, base = _storage(root)
    path = f"{base}/trials/{sweep}/{trial_id}.parquet"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return pq.read_table(path, filesystem=fs).to_pylist()[0]
