"""HMDA mortgage decisions, New York 2017, as processed by the CD-GraB authors: logistic regression.

Labels: ``hmda/targets-processed-NY-2017.npz`` (arrays ``y_train`` [195,285], ``y_test`` [48,822],
float32 in {0, 1}), or CD-GraB's original ``hmda/targets-processed-NY-2017.pt`` (a tuple of the
same two tensors; ``orderlab data fetch hmda-logreg`` downloads it), both sha256-checked.

Features: **user-provided**; no public copy exists (see ``tasks.files.HMDA_FEATURES_SOURCE``).
Accepted: ``hmda/features-processed-NY-2017.npz`` with float arrays ``X_train`` [195,285, d] and
``X_test`` [48,822, d], or CD-GraB's ``hmda/features-processed-NY-2017.pt`` (the tuple
``(X_train, X_test)``; read with ``torch.load(weights_only=True)``, checked against its git blob id).
Rows must follow the labels' order. As in CD-GraB (``main-LR-HMDA.py``) the features are used as
given (no standardization), the model is ``nn.Linear(d, 1)`` with binary cross-entropy on the logit,
a prediction is ``logit > 0``, and the test split is the validation set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orderlab.errors import OrderlabError
from orderlab.tasks import TaskData, TaskDefaults, data_file, register_task
from orderlab.tasks.files import HMDA_FEATURES_SOURCE

TARGETS_NPZ = "hmda/targets-processed-NY-2017.npz"
TARGETS_PT = "hmda/targets-processed-NY-2017.pt"
FEATURES_NPZ = "hmda/features-processed-NY-2017.npz"
FEATURES_PT = "hmda/features-processed-NY-2017.pt"
NUM_TRAIN, NUM_TEST = 195_285, 48_822


def _read_pair(data_dir: Path, npz: str, pt: str, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) arrays from ``npz`` (arrays ``keys``) or, when it is absent, from ``pt`` (a 2-tuple)."""
    if (data_dir / npz).is_file() or not (data_dir / pt).is_file():
        with np.load(data_file(data_dir, npz), allow_pickle=False) as arrays:
            missing = [key for key in keys if key not in arrays]
            if missing:
                raise OrderlabError(
                    f"{data_dir / npz} has no array {missing[0]!r}; it needs {', '.join(keys)}"
                )
            return arrays[keys[0]], arrays[keys[1]]
    loaded = torch.load(data_file(data_dir, pt), weights_only=True, map_location="cpu")
    if not (
        isinstance(loaded, tuple | list) and len(loaded) == 2 and all(torch.is_tensor(t) for t in loaded)
    ):
        raise OrderlabError(f"{data_dir / pt} must hold a tuple of two tensors ({', '.join(keys)})")
    return loaded[0].numpy(), loaded[1].numpy()


def load_features(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X_train [195285, d], X_test [48822, d]) float32 from the user's features file.

    Raises:
        OrderlabError: neither file exists (the message says there is no public copy and how to
            provide one), or the arrays have the wrong shapes or non-finite values.
    """
    if not (data_dir / FEATURES_NPZ).is_file() and not (data_dir / FEATURES_PT).is_file():
        raise OrderlabError(
            f"HMDA features are missing: neither {data_dir / FEATURES_NPZ} nor {data_dir / FEATURES_PT} exists; "
            f"{HMDA_FEATURES_SOURCE}. Put the file in {data_dir / 'hmda'} (or set task.data_dir / ORDERLAB_DATA "
            "to a directory whose hmda/ folder has it)."
        )
    train, test = _read_pair(data_dir, FEATURES_NPZ, FEATURES_PT, ("X_train", "X_test"))
    for name, array, rows in (("X_train", train, NUM_TRAIN), ("X_test", test, NUM_TEST)):
        if array.ndim != 2 or array.shape[0] != rows or array.shape[1] != train.shape[-1]:
            raise OrderlabError(
                f"HMDA features {name} has shape {array.shape}; expected [{rows}, d] with the same d for X_train "
                "and X_test, rows in the order of the labels"
            )
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise OrderlabError(f"HMDA features {name} must be finite numbers (dtype {array.dtype})")
    return train.astype(np.float32), test.astype(np.float32)


def load_labels(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(y_train [195285], y_test [48822]) float32 in {0, 1}, from the .npz or else the .pt.

    Raises:
        OrderlabError: neither labels file is present and valid (naming both, checksums and sources).
    """
    train, test = _read_pair(data_dir, TARGETS_NPZ, TARGETS_PT, ("y_train", "y_test"))
    return train.astype(np.float32), test.astype(np.float32)


@register_task("hmda-logreg")
class HmdaLogReg(TaskDefaults):
    """Logistic regression on HMDA NY-2017 (CD-GraB's LR-HMDA): linear d -> 1, BCE with logits, accuracy.

    d is the number of feature columns, known after ``load`` (so ``make_model`` needs ``load`` first).
    """

    metric_name = "accuracy"
    data_files = (TARGETS_NPZ, TARGETS_PT, FEATURES_NPZ, FEATURES_PT)

    def __init__(self) -> None:
        self.num_features: int | None = None

    def load(self, data_dir: Path) -> TaskData:
        y_train, y_test = load_labels(data_dir)
        x_train, x_test = load_features(data_dir)
        self.num_features = x_train.shape[1]
        return TaskData(
            torch.from_numpy(x_train),
            torch.from_numpy(y_train),
            torch.from_numpy(x_test),
            torch.from_numpy(y_test),
        )

    def make_model(self) -> nn.Module:
        if self.num_features is None:
            raise RuntimeError("hmda-logreg: call load() before make_model(); d comes from the features file")
        return nn.Linear(self.num_features, 1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """outputs [N, 1] logits, targets [N] float32 in {0, 1}."""
        return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float(((outputs.squeeze(-1) > 0).to(targets.dtype) == targets).sum())
