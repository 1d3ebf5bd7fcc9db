"""MNIST-1D (Greydanus 2020): 40-sample 1-D signals of 10 digit classes, 4000 train / 1000 test.

Data: ``{data_dir}/mnist1d/mnist1d_data.npz`` when present (sha256-checked, numpy arrays, no
pickle); otherwise generated offline by the ``mnist1d`` package's ``make_dataset`` with its default
arguments (seed 42), which reproduces the reference file exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orderlab.tasks import TaskData, TaskDefaults, accuracy_sum, data_file, register_task

NPZ = "mnist1d/mnist1d_data.npz"  # optional (checksum and source in tasks.files)


def load_mnist1d(data_dir: Path) -> TaskData:
    """MNIST-1D as tensors: inputs [N, 40] float32, targets [N] int64 (4000 train, 1000 val)."""
    if (data_dir / NPZ).exists():
        with np.load(data_file(data_dir, NPZ), allow_pickle=False) as arrays:
            raw = {key: arrays[key] for key in ("x", "y", "x_test", "y_test")}
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        raw = make_dataset(get_dataset_args())
    return TaskData(
        train_inputs=torch.as_tensor(raw["x"], dtype=torch.float32),
        train_targets=torch.as_tensor(raw["y"], dtype=torch.int64),
        val_inputs=torch.as_tensor(raw["x_test"], dtype=torch.float32),
        val_targets=torch.as_tensor(raw["y_test"], dtype=torch.int64),
    )


class _Mnist1dClassification(TaskDefaults):
    metric_name = "accuracy"
    data_files = (NPZ,)

    def load(self, data_dir: Path) -> TaskData:
        return load_mnist1d(data_dir)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy_sum(outputs, targets)


@register_task("mnist1d-logreg")
class Mnist1dLogReg(_Mnist1dClassification):
    """Multinomial logistic regression on MNIST-1D: linear 40 -> 10, cross-entropy (the demo task)."""

    def make_model(self) -> nn.Module:
        return nn.Linear(40, 10)


@register_task("mnist1d-mlp")
class Mnist1dMlp(_Mnist1dClassification):
    """MLP on MNIST-1D: 40 -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, hidden: int = 100) -> None:
        self.hidden = hidden

    def make_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(40, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, 10),
        )
