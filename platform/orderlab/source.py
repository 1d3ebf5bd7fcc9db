"""Which orderlab source a process runs: the git commit that the trials table records."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: the file, in a package staged by ``orderlab submit``, that holds the commit it was copied from
#: (the copy that a Ray Job imports is no git checkout)
COMMIT_FILE = "GIT_COMMIT"
PACKAGE_DIR = Path(__file__).parent


def source_commit(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The git commit (40 hex digits) of the orderlab package in ``package_dir``: the one written
    in its ``COMMIT_FILE`` when ``orderlab submit`` staged it, else ``git rev-parse HEAD`` of the
    orderlab checkout it lives in (``<checkout>/platform/orderlab``); None for an installed package,
    also one inside some other repository (a virtual environment in a project's checkout), or
    where git is missing."""
    staged = package_dir / COMMIT_FILE
    if staged.is_file():
        return staged.read_text().strip() or None
    try:
        found = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no git
        return None
    lines = found.stdout.split()
    if found.returncode != 0 or len(lines) != 2:
        return None
    toplevel, commit = lines
    return commit if Path(toplevel).resolve() == package_dir.resolve().parents[1] else None
