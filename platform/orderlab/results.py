"""Result tables of docs/architecture.md: Parquet schemas, the atomic writer, compaction, DuckDB views, summaries.

Layout under a storage root (a local path or an s3://, gs://, file:// URI); see docs/results.md:

    {root}/trials/{sweep}/{trial_id}.parquet                      a trial's row (row file)
    {root}/epochs/{sweep}/{trial_id}/epoch-{epoch:05d}.parquet    an epoch's row while the trial runs
    {root}/epochs/{sweep}/{trial_id}/epochs.parquet               the trial's epoch rows once it ended
    {root}/compacted/{table}/{sweep}/part-{generation}.parquet    a compacted sweep

Names are deterministic, so a retried trial or epoch overwrites its file instead of adding a row.
Readers see every row once whatever the compaction state: per key, a row file wins over a trial's
file, which wins over the newest compacted part (``SOURCE_RANKS``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orderlab import stats
from orderlab.errors import DamagedResultsWarning, OrderlabError

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
    ("stopped_epoch", _I32),  # the epoch whose report the sweep's scheduler stopped the trial on
    ("started_at", _UTC_US), ("finished_at", _UTC_US), ("wall_seconds", _F64),
    ("orderlab_version", _STR), ("ray_version", _STR), ("torch_version", _STR), ("python_version", _STR),
    ("git_commit", _STR),
    ("config_json", _STR),  # the whole trial config as JSON
    ("grid_point_json", _STR),  # JSON object: the trial's value of each of its sweep's grid axes, by dotted key
    ("searched_json", _STR),  # JSON object: its value of each search-space axis (sampled by the search)
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


#: Where a row comes from, by precedence: for one key (``KEY_COLUMNS``) readers and compaction keep
#: the row of the lowest rank, and among compacted parts the newest (the largest file name).
SOURCE_RANKS = {"row": 0, "trial": 1, "compacted": 2}
KEY_COLUMNS = {"trials": ("sweep", "trial_id"), "epochs": ("sweep", "trial_id", "epoch")}
TRIAL_EPOCHS_FILE = "epochs.parquet"  # a finished trial's epoch rows, in its epochs directory
COMPACTED_DIR = "compacted"
_ROW, _TRIAL, _COMPACTED = SOURCE_RANKS.values()
_DAMAGED_READ = "it is left out, so these results are partial"
_DAMAGED_FIX = (
    "copy the file again from a complete source (the sweep's storage, a finished sync), "
    "or delete it to drop its rows"
)


@dataclass(frozen=True)
class _ResultFile:
    """One Parquet file of a table: its path, sweep, trial (None for a compacted part) and source rank."""

    path: str
    table: str
    sweep: str
    trial_id: str | None
    rank: int


def _result_files(fs: pafs.FileSystem, base: str, sweep: str | None = None) -> dict[str, list[_ResultFile]]:
    """Every finished results file under ``base`` (of one sweep, or all), by table.

    Raises:
        OSError: the root cannot be listed.
    """
    found: dict[str, list[_ResultFile]] = {name: [] for name in TABLES}
    for table in TABLES:
        prefix = f"{base}/{table}/" if sweep is None else f"{base}/{table}/{sweep}/"
        for path in _parquet_files(fs, prefix.rstrip("/")):
            parts = path[len(f"{base}/{table}/") :].split("/")
            name = parts[-1]
            rank = _TRIAL if table == "epochs" and name == TRIAL_EPOCHS_FILE else _ROW
            trial_id = parts[1] if len(parts) > 2 else name.removesuffix(".parquet")
            found[table].append(_ResultFile(path, table, parts[0] if len(parts) > 1 else "", trial_id, rank))
        compacted = f"{base}/{COMPACTED_DIR}/{table}" + ("" if sweep is None else f"/{sweep}")
        for path in _parquet_files(fs, compacted):
            parts = path[len(f"{base}/{COMPACTED_DIR}/{table}/") :].split("/")
            found[table].append(_ResultFile(path, table, parts[0], None, _COMPACTED))
    return found


def _overlapping_sweeps(files: list[_ResultFile]) -> set[str]:
    """Sweeps whose files may hold a key twice: more than one compacted part, a compacted part and
    other files, or a trial with both row files and its trial file (all after an interruption)."""
    parts = Counter(f.sweep for f in files if f.rank == _COMPACTED)
    others = {f.sweep for f in files if f.rank != _COMPACTED}
    ranks: defaultdict[tuple[str, str | None], set[int]] = defaultdict(set)
    for f in files:
        if f.rank != _COMPACTED:
            ranks[(f.sweep, f.trial_id)].add(f.rank)
    return {s for s, n in parts.items() if n > 1 or s in others} | {
        s for (s, _), r in ranks.items() if len(r) > 1
    }


def _display(root: str, fs: pafs.FileSystem, path: str) -> str:
    """A path as a user would pass it: local as is, remote as a URI with the root's scheme."""
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{root.split('://', 1)[0]}://{path}"


def _warn_damaged(root: str, fs: pafs.FileSystem, damaged: dict[str, str], consequence: str) -> None:
    for path, reason in damaged.items():
        warnings.warn(
            DamagedResultsWarning(
                f"unreadable results file {_display(root, fs, path)} ({reason}); {consequence}: {_DAMAGED_FIX}"
            ),
            stacklevel=3,
        )


def _read_file(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as stream:
        return pq.ParquetFile(stream).read()


def _read_files(fs: pafs.FileSystem, paths: list[str]) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """Read each file whole; the ones that fail are returned as path -> reason instead."""

    def attempt(path: str) -> pa.Table | str:
        try:
            return _read_file(fs, path)
        except (OSError, pa.ArrowException) as exc:
            return f"{type(exc).__name__}: {exc}"

    threads = 1 if isinstance(fs, pafs.LocalFileSystem) else 16  # remote reads wait on the network
    with ThreadPoolExecutor(threads) as pool:
        outcomes = dict(zip(paths, pool.map(attempt, paths), strict=True))
    tables = {p: t for p, t in outcomes.items() if isinstance(t, pa.Table)}
    return tables, {p: r for p, r in outcomes.items() if isinstance(r, str)}


def _conform(table: pa.Table, name: str) -> pa.Table:
    """``table`` with the schema's columns in order (absent ones null, each cast to its type), then
    any other columns it has (from a newer schema) as they are."""
    schema = TABLES[name]
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    extra = [c for c in table.column_names if c not in schema.names]
    fields = [*schema, *(table.schema.field(c) for c in extra)]
    return pa.Table.from_arrays(columns + [table[c] for c in extra], schema=pa.schema(fields))


def _deduplicated(table: str, files: list[_ResultFile], tables: dict[str, pa.Table]) -> pa.Table:
    """The rows of ``files`` (read into ``tables``), one per key by SOURCE_RANKS, sorted by key."""
    ranked = [
        _conform(tables[f.path], table)
        .append_column("_rank", pa.array([f.rank] * tables[f.path].num_rows, pa.int8()))
        .append_column("_file", pa.array([f.path] * tables[f.path].num_rows, pa.string()))
        for f in files
        if f.path in tables
    ]
    combined = pa.concat_tables(ranked, promote_options="default")
    keys = KEY_COLUMNS[table]
    ordered = combined.sort_by(
        [*((k, "ascending") for k in keys), ("_rank", "ascending"), ("_file", "descending")]
    )
    first = np.ones(ordered.num_rows, dtype=bool)
    if ordered.num_rows > 1:
        first[1:] = False
        for key in keys:
            values = ordered[key].to_numpy(zero_copy_only=False)
            first[1:] |= values[1:] != values[:-1]
    return ordered.filter(pa.array(first)).drop_columns(["_rank", "_file"])


def _delete_files(fs: pafs.FileSystem, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass  # removed by an earlier, interrupted run of the same step


def consolidate_trial(root: str, sweep: str, trial_id: str) -> str | None:
    """Merge a finished trial's epoch row files into ``{root}/epochs/{sweep}/{trial_id}/epochs.parquet``.

    The trial file is written atomically with every row (a row file wins over the trial file
    already there, see SOURCE_RANKS), then the row files it holds are removed; a crash in between
    leaves rows that readers see once. Call it only when no rank writes the trial's rows any more.
    Needs pyarrow alone (no DuckDB).

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        sweep, trial_id: the trial.

    Returns:
        The trial file's path (a URI for remote roots), or None when there were no row files.

    Warns:
        DamagedResultsWarning: a file could not be read; it is left in place (and with an unreadable
            trial file nothing is merged).

    Raises:
        OrderlabError: the root cannot be read or written.
    """
    fs, base = _storage(root)
    try:
        files = [f for f in _result_files(fs, base, sweep)["epochs"] if f.trial_id == trial_id]
    except OSError as exc:
        raise OrderlabError(f"cannot read results under {root!r} ({exc}); check the storage root") from exc
    row_files = [f.path for f in files if f.rank == _ROW]
    if not row_files:
        return None
    tables, damaged = _read_files(fs, [f.path for f in files])
    _warn_damaged(root, fs, damaged, "it was left in place and the trial's rows stay in separate files")
    if any(f.rank == _TRIAL and f.path in damaged for f in files) or not tables:
        return None  # never overwrite a file that could not be read
    merged = _deduplicated("epochs", files, tables)
    path = _write_atomic(root, ["epochs", sweep, trial_id, TRIAL_EPOCHS_FILE], merged)
    _delete_files(fs, [p for p in row_files if p in tables])
    return path


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` did.

    Attributes:
        sweeps: the sweeps compacted, sorted.
        files_read: results files read (and removed, once their part was written).
        rows: rows written, by table.
        parts: the compacted parts written (paths, URIs for remote roots).
        damaged: unreadable files, left in place (paths).
    """

    sweeps: list[str]
    files_read: int
    rows: dict[str, int]
    parts: list[str]
    damaged: list[str]


def compact(root: str, sweep: str | None = None, *, missing_ok: bool = False) -> Compaction:
    """Rewrite each sweep's rows as one Parquet part per table: ``{root}/compacted/{table}/{sweep}/part-*.parquet``.

    For each table and sweep with anything to merge, every row (one per key, SOURCE_RANKS) is
    written atomically to a new part, and only then are the files it was read from removed (row
    files, trial files, older parts), so a crash at any point leaves each row readable exactly once.
    Roots written before trial files and compaction existed are migrated the same way. Do not run
    it while trials of the sweep still write rows (a row written during compaction can be lost).
    Needs pyarrow alone (no DuckDB).

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        sweep: only this sweep (default: every sweep under the root).
        missing_ok: a ``sweep`` with no files yet (every trial failed before its first row) is
            nothing to compact rather than an error.

    Returns:
        The Compaction (sweeps, files read, rows, parts, damaged files).

    Warns:
        DamagedResultsWarning: a file could not be read; it is never removed.

    Raises:
        OrderlabError: the root cannot be read or written, or holds no sweep named ``sweep``
            (unless ``missing_ok``).
    """
    fs, base = _storage(root)
    try:
        found = _result_files(fs, base, sweep)
    except OSError as exc:
        raise OrderlabError(f"cannot read results under {root!r} ({exc}); check the storage root") from exc
    if sweep is not None and not any(found.values()) and not missing_ok:
        raise OrderlabError(f"no sweep {sweep!r} under results root {root!r}; compact without --sweep")
    generation = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # file names sort by time
    sweeps: set[str] = set()
    files_read, rows, parts, damaged_all = 0, {name: 0 for name in TABLES}, [], []
    for table, files in found.items():
        by_sweep: defaultdict[str, list[_ResultFile]] = defaultdict(list)
        for f in files:
            by_sweep[f.sweep].append(f)
        for name, group in sorted(by_sweep.items()):
            if len(group) == 1 and group[0].rank == _COMPACTED:
                continue  # already one part
            tables, damaged = _read_files(fs, [f.path for f in group])
            _warn_damaged(root, fs, damaged, "it was not compacted and is left in place")
            damaged_all += [_display(root, fs, p) for p in damaged]
            if not tables:
                continue
            merged = _deduplicated(table, group, tables)
            parts.append(
                _write_atomic(root, [COMPACTED_DIR, table, name, f"part-{generation}.parquet"], merged)
            )
            _delete_files(fs, list(tables))
            _remove_empty_dirs(fs, f"{base}/{table}/{name}")
            sweeps.add(name)
            files_read += len(tables)
            rows[table] += merged.num_rows
    return Compaction(sorted(sweeps), files_read, rows, parts, damaged_all)


def _remove_empty_dirs(fs: pafs.FileSystem, directory: str) -> None:
    """Remove ``directory`` when no file is left under it (damaged files keep it)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    if (
        not any(i.type == pafs.FileType.File for i in infos)
        and fs.get_file_info(directory).type != pafs.FileType.NotFound
    ):
        fs.delete_dir(directory)


@dataclass
class _Source:
    """One input of a table's view: a DuckDB relation (a registered table or ``read_parquet``) over
    files of one rank."""

    relation: str
    rank: int
    overlapping: bool  # from sweeps that may hold a key twice: deduplicated
    columns: set[str]
    with_file: bool  # has a ``filename`` column (compacted parts of overlapping sweeps)


def _file_columns(fs: pafs.FileSystem, paths: list[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Each file's column names, from its footer; the files that fail are returned as path -> reason."""
    columns, damaged = {}, {}
    for path in paths:
        try:
            columns[path] = tuple(pq.read_schema(path, filesystem=fs).names)
        except (OSError, pa.ArrowException) as exc:
            damaged[path] = f"{type(exc).__name__}: {exc}"
    return columns, damaged


def _sources(
    con: duckdb.DuckDBPyConnection, root: str, fs: pafs.FileSystem, table: str, files: list[_ResultFile]
) -> list[_Source]:
    """The inputs of a table's view. Remote files, and local epoch row files (removed when their
    trial's rows are merged), are read now through pyarrow; other local files are read at query
    time by DuckDB, one ``read_parquet`` per set of columns (their footers are checked now)."""
    local = isinstance(fs, pafs.LocalFileSystem)
    now = {f.path for f in files if not local or (f.rank == _ROW and table == "epochs")}
    tables, damaged = _read_files(fs, [f.path for f in files if f.path in now])
    columns, damaged_footers = _file_columns(fs, [f.path for f in files if f.path not in now])
    _warn_damaged(root, fs, {**damaged, **damaged_footers}, _DAMAGED_READ)
    readable = [f for f in files if f.path in tables or f.path in columns]
    overlapping = _overlapping_sweeps(readable)
    sources: list[_Source] = []
    for rank in SOURCE_RANKS.values():
        for overlaps in (False, True):
            chosen = [f.path for f in readable if f.rank == rank and (f.sweep in overlapping) == overlaps]
            with_file = rank == _COMPACTED and overlaps
            read = [p for p in chosen if p in tables]
            if read:
                data = _conform(
                    pa.concat_tables([tables[p] for p in read], promote_options="permissive"), table
                ).combine_chunks()  # one chunk, not one per file: DuckDB scans it faster
                if with_file:
                    rows = [tables[p].num_rows for p in read]
                    data = data.append_column("filename", pa.array(np.repeat(read, rows), pa.string()))
                name = f"_{table}_{len(sources)}"
                con.register(name, data)
                sources.append(_Source(name, rank, overlaps, set(data.column_names), with_file))
            by_columns: defaultdict[tuple[str, ...], list[str]] = defaultdict(list)
            for path in chosen:
                if path in columns:
                    by_columns[columns[path]].append(path)
            for names, paths in by_columns.items():
                listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)  # paths, not user values
                relation = f"read_parquet([{listed}]{', filename=true' if with_file else ''})"
                sources.append(_Source(relation, rank, overlaps, set(names), with_file))
    return sources


def _view_sql(table: str, sources: list[_Source]) -> str:
    """The table's view: sources of sweeps without overlap as they are, the others one row per key."""
    schema = TABLES[table]

    def select(source: _Source) -> str:
        return ", ".join(
            f'"{f.name}"'
            if f.name in source.columns
            else f'CAST(NULL AS {_DUCKDB_TYPES[str(f.type)]}) AS "{f.name}"'
            for f in schema
        )

    parts = [f"SELECT {select(s)} FROM {s.relation}" for s in sources if not s.overlapping]
    ranked = [
        f"SELECT {select(s)}, {s.rank} AS _rank, {'filename' if s.with_file else repr('')} AS _file "
        f"FROM {s.relation}"
        for s in sources
        if s.overlapping
    ]
    if ranked:
        keys = ", ".join(KEY_COLUMNS[table])
        parts.append(
            f"SELECT * EXCLUDE (_rank, _file) FROM ({' UNION ALL '.join(ranked)}) "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY _rank, _file DESC) = 1"
        )
    return " UNION ALL ".join(parts)


def connect(root: str) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views ``trials`` and ``epochs`` over a storage root.

    Each view has one row per key (trial; trial and epoch) whatever the root's compaction state
    (``SOURCE_RANKS``). On a local root, epoch row files are read at ``connect`` (they are removed
    when their trial ends) and the other files at query time, from the files there at ``connect``
    (reconnect to see files written later); a remote root is read once, at ``connect``, through
    pyarrow. A table with no files yet is an empty view with the schema's
    columns. Columns added to the schema after a file was written read as null from it.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI; a missing root is empty.

    Returns:
        The connection; ``con.sql("SELECT ... FROM epochs").df()`` gives pandas.

    Warns:
        DamagedResultsWarning: a file could not be read (named, with what to do); the views hold
            the other files' rows.

    Raises:
        OrderlabError: the root is a file or cannot be listed.
    """
    import duckdb  # here, not above: writing rows needs pyarrow alone (the GPU machine has no duckdb)

    fs, base = _storage(root)
    try:
        root_is_file = fs.get_file_info(base).type == pafs.FileType.File
        files_by_table = _result_files(fs, base)
    except OSError as exc:
        raise OrderlabError(
            f"cannot read results under {root!r} ({exc}); pass the sweep's storage root"
        ) from exc
    if root_is_file:
        raise OrderlabError(f"results root {root!r} is a file; pass the directory the sweep wrote to")
    con = duckdb.connect()
    for name, schema in TABLES.items():
        sources = _sources(con, root, fs, name, files_by_table[name]) if files_by_table[name] else []
        if sources:
            con.execute(f"CREATE VIEW {name} AS {_view_sql(name, sources)}")
        else:
            con.register(name, schema.empty_table())
    return con


@contextmanager
def connected(root: str, con: duckdb.DuckDBPyConnection | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` when given (left open), else ``connect(root)`` for the block, closed after it.

    The readers below take ``con`` so that several queries of one large uncompacted root pay for
    one ``connect`` (it reads every epoch row file of a local root)."""
    if con is not None:
        yield con
        return
    with connect(root) as opened:
        yield opened


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


def counted_trials_sql() -> str:
    """SQL of the trials whose epoch rows count in summaries and reports (the one status filter):
    completed trials, of sweep ``$sweep`` when that parameter is not NULL."""
    return "SELECT * FROM trials WHERE status = 'completed' AND ($sweep::VARCHAR IS NULL OR sweep = $sweep)"


def best_trials(
    root: str,
    sweep: str | None = None,
    metric: str = "train_loss",
    mode: str = "min",
    *,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """The best completed trial of each grid point of each sweep, by ``metric`` at its last epoch.

    A sweep with search spaces runs several trials per grid point (``sweep.search.num_samples``):
    this answers "each ordering at its own best lr". Trials written before ``grid_point_json``
    existed are left out.

    Args:
        root: storage root, a local path or an s3://, gs://, file:// URI.
        sweep: only this sweep (default: all sweeps).
        metric: ``train_loss``, ``val_loss`` or ``val_metric``; mode: ``min`` or ``max``.
        con: an open ``connect(root)`` to query (left open); default: one for this call.

    Returns:
        One row per (sweep, grid point): sweep, one column per grid axis then per searched axis
        (dotted keys; a section's value as JSON), trial_id, ``metric``, epochs_done, num_trials
        (the grid point's trials in any status: more than one in a search); sorted by
        sweep, then the grid point's JSON. Empty when no completed trial has a grid point.

    Raises:
        OrderlabError: ``metric`` or ``mode`` is not one of the above.
    """
    if metric not in ("train_loss", "val_loss", "val_metric") or mode not in ("min", "max"):
        raise OrderlabError(
            f"best_trials: metric={metric!r}, mode={mode!r}; use metric train_loss, val_loss or "
            "val_metric and mode min or max"
        )
    order = "ASC" if mode == "min" else "DESC"
    sql = f"""
        WITH finals AS (
            SELECT t.sweep, t.trial_id, t.grid_point_json, t.searched_json, e.{metric}, e.epoch + 1 AS epochs_done
            FROM ({counted_trials_sql()}) t JOIN epochs e ON e.trial_id = t.trial_id AND e.sweep = t.sweep
            WHERE t.grid_point_json IS NOT NULL
            QUALIFY e.epoch = max(e.epoch) OVER (PARTITION BY t.sweep, t.trial_id))
        , points AS (
            SELECT sweep, grid_point_json, count(*) AS num_trials FROM trials
            WHERE grid_point_json IS NOT NULL AND ($sweep::VARCHAR IS NULL OR sweep = $sweep) GROUP BY ALL)
        SELECT * FROM finals JOIN points USING (sweep, grid_point_json)
        QUALIFY row_number() OVER (
            PARTITION BY sweep, grid_point_json ORDER BY {metric} {order} NULLS LAST, trial_id) = 1
        ORDER BY sweep, grid_point_json"""
    with connected(root, con) as db:
        finals = db.execute(sql, {"sweep": sweep}).df()

    def columns(text: str) -> dict[str, Any]:
        return {key: json.dumps(v) if isinstance(v, dict) else v for key, v in json.loads(text).items()}

    rows = [
        {"sweep": r.sweep, **columns(r.grid_point_json), **columns(r.searched_json), "trial_id": r.trial_id,
         metric: getattr(r, metric), "epochs_done": int(r.epochs_done), "num_trials": int(r.num_trials)}
        for r in finals.itertuples()
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _completed_epochs_sql() -> str:
    """SQL of the epoch rows of counted trials, with the trial's group columns and ordering."""
    return f"""
        SELECT {", ".join(f"t.{c}" for c in GROUP_COLUMNS)}, t.ordering, e.trial_id, e.epoch, e.train_loss,
               e.val_metric, e.val_metric_name, e.epoch_seconds, e.order_wait_seconds
        FROM epochs e JOIN ({counted_trials_sql()}) t ON e.trial_id = t.trial_id AND e.sweep = t.sweep"""


def _pair_runs(con: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, list[stats.Runs]]:
    """Each (group, ordering) pair of counted trials with epoch rows: the pairs (GROUP_COLUMNS,
    ordering, pair: an index into the list) and their runs, seeds in trial_id order."""
    group = ", ".join(GROUP_COLUMNS)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _pair_epochs AS
        SELECT dense_rank() OVER (ORDER BY {group}, ordering) - 1 AS pair,
               dense_rank() OVER (PARTITION BY {group}, ordering ORDER BY trial_id) - 1 AS seed,
               epoch, coalesce(train_loss, 'NaN'::DOUBLE) AS train_loss,
               coalesce(epoch_seconds, 'NaN'::DOUBLE) AS epoch_seconds,
               epoch = max(epoch) OVER (PARTITION BY trial_id, {group}, ordering) AS last,
               {group}, ordering
        FROM _counted_epochs"""
    )
    pairs = con.execute(f"SELECT DISTINCT {group}, ordering, pair FROM _pair_epochs ORDER BY pair").df()
    rows = con.execute(
        "SELECT pair, seed, epoch, train_loss, epoch_seconds, last FROM _pair_epochs ORDER BY pair, seed, epoch"
    ).fetchnumpy()
    pair, seed, epoch = (np.asarray(rows[c], dtype=np.int64) for c in ("pair", "seed", "epoch"))
    starts = np.searchsorted(pair, np.arange(len(pairs) + 1))
    runs = []
    for p in range(len(pairs)):
        part = slice(starts[p], starts[p + 1])
        shape = (int(seed[part].max()) + 1, int(epoch[part].max()) + 1)
        losses, seconds, finals = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape[0], np.nan)
        losses[seed[part], epoch[part]] = rows["train_loss"][part]
        seconds[seed[part], epoch[part]] = rows["epoch_seconds"][part]
        last = np.asarray(rows["last"][part], dtype=bool)
        finals[seed[part][last]] = rows["train_loss"][part][last]
        runs.append(stats.Runs(losses, seconds, finals))
    return pairs, runs


def _stacked(runs: list[stats.Runs]) -> stats.Runs:
    """Runs with equal seed counts as one batch [P, k, E], shorter curves padded with NaN epochs."""
    width = max(r.losses.shape[1] for r in runs)
    losses = np.full((len(runs), runs[0].num_seeds, width), np.nan)
    seconds = np.full_like(losses, np.nan)
    for i, r in enumerate(runs):
        losses[i, :, : r.losses.shape[1]] = r.losses
        seconds[i, :, : r.seconds.shape[1]] = r.seconds
    return stats.Runs(losses, seconds, np.stack([r.finals for r in runs]))


def _stat_columns(
    df: pd.DataFrame, pairs: pd.DataFrame, runs: list[stats.Runs], baseline: str
) -> pd.DataFrame:
    """_STAT_COLUMNS for each row of ``df`` (NaN without runs or a baseline), batched by seed counts."""
    keys = [*GROUP_COLUMNS, "ordering"]
    own = df[keys].merge(pairs, on=keys, how="left")["pair"]  # pandas matches NaN keys to NaN keys
    base_pairs = pairs[pairs["ordering"] == baseline].drop(columns="ordering")
    base = df[list(GROUP_COLUMNS)].merge(base_pairs, on=list(GROUP_COLUMNS), how="left")["pair"]
    out = pd.DataFrame(np.nan, index=df.index, columns=list(_STAT_COLUMNS))
    out["final_train_loss_ci95"] = [
        np.nan if pd.isna(p) else stats.t_ci_halfwidth(runs[int(p)].finals) for p in own
    ]
    batches: defaultdict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for row, (p, b) in enumerate(zip(own, base, strict=True)):
        if not (pd.isna(p) or pd.isna(b)):
            batches[(runs[int(b)].num_seeds, runs[int(p)].num_seeds, p == b)].append(row)
    for (_, _, same), rows in batches.items():
        found = stats.batched_speedups(
            _stacked([runs[int(base[r])] for r in rows]),
            _stacked([runs[int(own[r])] for r in rows]),
            same=same,
        )
        out.iloc[rows, out.columns.get_loc("epochs_to_baseline")] = found["epochs_to_target"]
        out.iloc[rows, out.columns.get_loc("seconds_to_baseline")] = found["seconds_to_target"]
        for name in _STAT_COLUMNS[3:]:
            out.iloc[rows, out.columns.get_loc(name)] = found[name]
    return out


def summary(
    root: str,
    baseline: str = "rr",
    sweep: str | None = None,
    *,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
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
        con: an open ``connect(root)`` to query (left open); default: one for this call.

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
    WITH ep AS (SELECT * FROM _counted_epochs
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
    with connected(root, con) as db:
        if sweep is not None:
            sweeps = [
                row[0] for row in db.execute("SELECT DISTINCT sweep FROM trials ORDER BY sweep").fetchall()
            ]
            if sweep not in sweeps:
                there = f"its sweeps: {', '.join(sweeps)}" if sweeps else "it holds no trials"
                raise OrderlabError(f"no sweep {sweep!r} under results root {root!r}; {there}")
        # the epochs of counted trials, read once: every query below uses them
        db.execute(
            f"CREATE OR REPLACE TEMP TABLE _counted_epochs AS {_completed_epochs_sql()}", {"sweep": sweep}
        )
        df = db.execute(sql, {"sweep": sweep}).df()
        pairs, runs = _pair_runs(db)
    columns = _stat_columns(df, pairs, runs, baseline)
    df.insert(
        df.columns.get_loc("epoch_seconds_mean"), "epochs_to_baseline", columns.pop("epochs_to_baseline")
    )
    num_diverged, num_stopped = df.pop("num_diverged"), df.pop("num_stopped")
    return pd.concat([df, columns], axis=1).assign(num_diverged=num_diverged, num_stopped=num_stopped)


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
    """The trials row of one trial (its row file, else the newest compacted part that holds it), or None.

    Warns:
        DamagedResultsWarning: a compacted part of the sweep could not be read (it is skipped).
    """
    fs, base = _storage(root)
    path = f"{base}/trials/{sweep}/{trial_id}.parquet"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return pq.read_table(path, filesystem=fs).to_pylist()[0]
    for part in reversed(_parquet_files(fs, f"{base}/{COMPACTED_DIR}/trials/{sweep}")):  # newest first
        try:
            found = pq.read_table(part, filesystem=fs, filters=[("trial_id", "=", trial_id)])
        except (OSError, pa.ArrowException) as exc:
            _warn_damaged(root, fs, {part: f"{type(exc).__name__}: {exc}"}, "it was skipped")
            continue
        if found.num_rows:
            return found.to_pylist()[0]
    return None
