"""Nothing from the data directory, the results or a checkpoint is ever unpickled."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

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


class _PickleBomb:
    """An object whose unpickling creates the directory ``path``: evidence that a reader unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _pickled_npz(path: Path, evidence: Path, key: str, **arrays: np.ndarray) -> None:
    """An .npz whose array ``key`` is a pickled object array (unpickling it makes ``evidence``), and ``arrays``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{key: np.array([_PickleBomb(evidence)], dtype=object)}, **arrays)


def test_the_npz_reader_refuses_pickled_arrays_that_pass_the_checksum(tmp_path, monkeypatch):
    """The file's checksum is the table's, so the refusal to unpickle is all that stops it."""
    from orderlab.data import file_sha256, verify_file
    from orderlab.tasks.files import FILES
    from orderlab.tasks.mnist1d import NPZ, load_mnist1d

    evidence = tmp_path / "unpickled"
    empty = np.zeros(1)
    _pickled_npz(tmp_path / NPZ, evidence, "x", y=empty, x_test=empty, y_test=empty)
    digest = file_sha256(tmp_path / NPZ)
    monkeypatch.setitem(FILES, NPZ, replace(FILES[NPZ], sha256=digest, also_accepted=()))
    assert verify_file(tmp_path, FILES[NPZ]) == tmp_path / NPZ  # the checksum lets it through
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_mnist1d(tmp_path)
    assert not evidence.exists()


def test_a_user_provided_npz_without_a_checksum_is_not_unpickled(tmp_path):
    """HMDA's features have no known checksum (the user provides them): nothing but the reader guards them."""
    from orderlab.tasks.files import FILES
    from orderlab.tasks.hmda import FEATURES_NPZ, load_features

    assert FILES[FEATURES_NPZ].sha256 is None and FILES[FEATURES_NPZ].git_blob_sha1 is None
    evidence = tmp_path / "unpickled"
    _pickled_npz(tmp_path / FEATURES_NPZ, evidence, "X_train", X_test=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_features(tmp_path)
    assert not evidence.exists()
