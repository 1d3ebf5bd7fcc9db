"""Nothing from the data directory, the results or a checkpoint is ever unpickled."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "platform" / "orderlab").rglob("*.py")) + sorted((ROOT / "tasks").rglob("*.py"))


def _calls(text: str, opening: str) -> list[str]:
    """The full text of every call that starts with ``opening``, parentheses balanced."""
    calls, start = [], text.find(opening)
    while start >= 0:
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0 and text[end] == ")":
                break
        calls.append(text[start : end + 1])
        start = text.find(opening, end)
    return calls


def test_no_unpickling_readers_in_the_package():
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for pattern in (
            r"pickle\.loads?\(",
            r"allow_pickle\s*=\s*True",
            r"weights_only\s*=\s*False",
            r"pd\.read_pickle",
        ):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
        for call in _calls(text, "torch.load("):
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert SOURCES and not offenders, offenders


def test_the_npz_reader_refuses_pickled_arrays(tmp_path):
    import numpy as np
    import pytest

    from orderlab.tasks.mnist1d import NPZ, load_mnist1d

    (tmp_path / "mnist1d").mkdir()
    np.savez(tmp_path / NPZ, x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(Exception, match="(?i)sha256|corrupt|pickle"):
        load_mnist1d(tmp_path)
