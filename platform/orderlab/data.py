"""Data files: checksums, resumable atomic downloads, and a status check (standard library only).

The table of the files the tasks read (relative path, sha256, URLs, where to get them by hand)
lives in ``orderlab.tasks.files``; this module knows nothing about tasks. A download writes to
``{file}.part`` (resumed with an HTTP ``Range`` request when a previous attempt left one), checks the
sha256, and only then renames it to the final name, so a reader never sees a partial or corrupt
file under the final name::

    fetch_files([FILES["mnist/t10k-labels-idx1-ubyte.gz"]], Path("~/.cache/orderlab/data"))
    print(format_status_table(check_files(FILES.values(), data_dir)))
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from orderlab.errors import OrderlabError

Status = Literal["ok", "unverified", "missing", "corrupt"]
PART_SUFFIX = ".part"
_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class DataFile:
    """One data file a task reads, and how to verify and obtain it.

    Attributes:
        relative: path under the data directory, e.g. ``mnist/train-images-idx3-ubyte.gz``.
        sha256: hex digest of the bytes the ``urls`` serve; None when no checksum is known.
        urls: mirrors tried in order by ``fetch``; empty when the file cannot be downloaded.
        source: where a user gets the file by hand (URL, package), for error messages.
        also_accepted: other sha256 digests of known-good copies (e.g. a re-gzipped archive).
        git_blob_sha1: the file's git blob id, checked when ``sha256`` is None.
        alternative_to: the ``relative`` of another file that serves the same purpose; a task needs
            only one of them (e.g. a ``.pt`` and an ``.npz`` of the same arrays).
        optional: the task works without it (e.g. data that can be generated offline).
    """

    relative: str
    sha256: str | None
    urls: tuple[str, ...] = ()
    source: str = ""
    also_accepted: tuple[str, ...] = ()
    git_blob_sha1: str | None = None
    alternative_to: str | None = None
    optional: bool = False
    accepted: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digests = {self.sha256, *self.also_accepted} - {None}
        object.__setattr__(self, "accepted", frozenset(digests))

    @property
    def group(self) -> str:
        """The requirement this file satisfies: its own path, or the file it is an alternative to."""
        return self.alternative_to or self.relative

    def describe_checksum(self) -> str:
        """``sha256 X`` (``or Y``), ``git blob Z``, or ``no known checksum``."""
        if self.sha256:
            return "sha256 " + " or ".join([self.sha256, *self.also_accepted])
        if self.git_blob_sha1:
            return f"git blob sha1 {self.git_blob_sha1}"
        return "no known checksum"


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of the file at ``path`` (what ``git hash-object`` prints)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_error(path: Path, file: DataFile) -> str | None:
    """Why ``path`` does not match ``file``'s checksum, or None when it matches (or none is known)."""
    if file.accepted:
        actual = file_sha256(path)
        return None if actual in file.accepted else f"sha256 {actual} != expected {file.describe_checksum()}"
    if file.git_blob_sha1:
        actual = git_blob_sha1(path)
        return None if actual == file.git_blob_sha1 else f"git blob {actual} != expected {file.git_blob_sha1}"
    return None


def file_status(data_dir: Path, file: DataFile) -> Status:
    """``ok`` (checksum matches), ``unverified`` (present, no checksum known), ``missing`` or ``corrupt``."""
    path = data_dir / file.relative
    if not path.is_file():
        return "missing"
    if _checksum_error(path, file) is not None:
        return "corrupt"
    return "ok" if file.accepted or file.git_blob_sha1 else "unverified"


def verify_file(data_dir: Path, file: DataFile) -> Path:
    """The path of ``file`` under ``data_dir`` after checking it exists and matches its checksum.

    Raises:
        OrderlabError: missing or corrupt; the message names the file, the expected checksum and
            where to get it.
    """
    path = data_dir / file.relative
    if not path.is_file():
        how = f"run `orderlab data fetch TASK --data-dir {data_dir}`, or get it" if file.urls else "get it"
        raise OrderlabError(
            f"data file {path} is missing (task data directory {data_dir}); {how} from {file.source} "
            f"({file.describe_checksum()}) or set task.data_dir / ORDERLAB_DATA to a directory that has "
            f"{file.relative}"
        )
    problem = _checksum_error(path, file)
    if problem is not None:
        raise OrderlabError(
            f"data file {path} is corrupt: {problem}; delete it and download it again from {file.source}"
        )
    return path


def check_files(files: Iterable[DataFile], data_dir: Path) -> list[tuple[DataFile, Status]]:
    """Each file with its status under ``data_dir``, in the given order."""
    return [(file, file_status(data_dir, file)) for file in files]


def missing_requirements(rows: Sequence[tuple[DataFile, Status]]) -> list[list[DataFile]]:
    """The requirements among ``rows`` that no file is there for, each as its files (the members of one
    ``DataFile.group``): every member ``missing`` and at least one not optional. A group with a
    corrupt member is not listed: the corrupt file is the problem to report."""
    groups: dict[str, list[tuple[DataFile, Status]]] = {}
    for file, status in rows:
        groups.setdefault(file.group, []).append((file, status))
    return [
        [file for file, _ in members]
        for members in groups.values()
        if all(status == "missing" for _, status in members) and not all(f.optional for f, _ in members)
    ]


def format_status_table(
    rows: Sequence[tuple[DataFile, Status]], users: dict[str, list[str]] | None = None
) -> str:
    """A plain-text table: file, status, and (when ``users`` maps paths to task names) the tasks."""
    users = users or {}
    header = ("file", "status", "tasks")
    lines = [(f.relative, status, ", ".join(users.get(f.relative, []))) for f, status in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in [header, *lines])


def download_file(
    file: DataFile, data_dir: Path, *, timeout_seconds: float = 60.0, log: Callable[[str], None] = print
) -> Path:
    """Download ``file`` into ``data_dir`` from its first URL that works; resume a ``.part`` left behind.

    The bytes go to ``{relative}.part``; with a non-empty ``.part`` the request asks for the rest
    (``Range: bytes=N-``) and appends when the server answers 206, or starts over when it answers 200.
    After the checksum matches, the ``.part`` is renamed to the final name (atomic on one file system).
    A ``.part`` whose checksum fails is deleted; one cut short by a network error is kept for resuming.

    Raises:
        OrderlabError: no URL, every URL failed (HTTP error, network error), or the checksum differs;
            the message names the file, the checksum and where to get it.
    """
    if not file.urls:
        raise OrderlabError(
            f"{file.relative} cannot be downloaded: {file.source} ({file.describe_checksum()}); "
            f"put it in {data_dir / file.relative}"
        )
    final = data_dir / file.relative
    part = final.with_name(final.name + PART_SUFFIX)
    final.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in file.urls:
        for _attempt in range(2):  # a second, fresh attempt when a resumed .part turns out corrupt
            resumed = part.is_file() and part.stat().st_size > 0
            try:
                _download_to(url, part, timeout_seconds, log)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                failures.append(f"{url}: {_describe_network_error(error)}")  # keep the .part to resume
                break
            problem = _checksum_error(part, file)
            if problem is None:
                os.replace(part, final)
                return final
            part.unlink()
            if not resumed:
                failures.append(f"{url}: downloaded file is corrupt: {problem}")
                break
    raise OrderlabError(
        f"could not download {file.relative} ({file.describe_checksum()}): "
        + "; ".join(failures)
        + f". Get it by hand from {file.source} and put it in {final}"
    )


def _describe_network_error(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"network error: {error.reason}"
    return f"{type(error).__name__}: {error}"


def _download_to(url: str, part: Path, timeout_seconds: float, log: Callable[[str], None]) -> None:
    """Write ``url``'s body to ``part``, resuming from its current size when the server allows it."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "orderlab-data-fetch"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_seconds)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the .part already holds the whole file: let the checksum decide
            return
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        log(f"{'resuming' if resumed else 'downloading'} {url}" + (f" from byte {offset}" if resumed else ""))
        expected = response.headers.get("Content-Length")
        received = 0
        with part.open("ab" if resumed else "wb") as out:
            for block in iter(lambda: response.read(_BLOCK_BYTES), b""):
                out.write(block)
                received += len(block)
            out.flush()
            os.fsync(out.fileno())
    if expected is not None and received < int(expected):  # http.client ends a short body silently
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def fetch_files(
    files: Sequence[DataFile],
    data_dir: Path,
    *,
    timeout_seconds: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Make every requirement among ``files`` present and verified under ``data_dir``.

    Files are grouped by ``DataFile.group``: a group is satisfied by any one verified member; else its
    first downloadable member is downloaded. Optional files without URLs are skipped. Everything that
    can be downloaded is, before an error reports what could not.

    Returns:
        The verified paths, one per satisfied group.

    Raises:
        OrderlabError: a required group could not be satisfied (no URL, download failed, corrupt).
    """
    groups: dict[str, list[DataFile]] = {}
    for file in files:
        groups.setdefault(file.group, []).append(file)
    paths, problems = [], []
    for members in groups.values():
        present = [f for f in members if file_status(data_dir, f) in ("ok", "unverified")]
        if present:
            log(f"ok          {present[0].relative}")
            paths.append(data_dir / present[0].relative)
            continue
        downloadable = [f for f in members if f.urls]
        if not downloadable:
            if all(f.optional for f in members):
                log(f"skipped     {members[0].relative} (optional; {members[0].source})")
            else:
                problems.append(_not_downloadable(members, data_dir))
            continue
        try:
            paths.append(download_file(downloadable[0], data_dir, timeout_seconds=timeout_seconds, log=log))
            log(f"fetched     {downloadable[0].relative}")
        except OrderlabError as error:
            problems.append(str(error))
    if problems:
        raise OrderlabError("\n".join(problems))
    return paths


def _not_downloadable(members: Sequence[DataFile], data_dir: Path) -> str:
    names = " or ".join(str(data_dir / f.relative) for f in members)
    return f"{names}: not downloadable; {members[0].source}"
