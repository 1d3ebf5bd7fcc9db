"""scikit-learn's digits (UCI optical digits): 1797 images of 8x8 pixel counts 0..16, 10 classes.

Data: ``{data_dir}/sklearn/digits.csv.gz`` (the file bundled in scikit-learn's wheel, sha256-checked):
64 pixel columns then the label, no header. Split: a fixed seeded 80/20 permutation.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orderlab.seeding import DATA, rng_for
from orderlab.tasks import TaskData, TaskDefaults, accuracy_sum, data_file, read_gzip_bytes, register_task

CSV = "sklearn/digits.csv.gz"  # checksum and source in tasks.files


@register_task("digits-logreg")
class DigitsLogReg(TaskDefaults):
    """Logistic regression on digits: pixels scaled to [0, 1], linear 64 -> 10 (the fastest task)."""

    metric_name = "accuracy"
    data_files = (CSV,)

    def load(self, data_dir: Path) -> TaskData:
        table = np.loadtxt(io.BytesIO(read_gzip_bytes(data_file(data_dir, CSV))), delimiter=",")
        inputs = torch.as_tensor(table[:, :64] / 16.0, dtype=torch.float32)
        targets = torch.as_tensor(table[:, 64], dtype=torch.int64)
        permutation = torch.randperm(len(targets), generator=rng_for(0, 0, 0, DATA))
        num_train = int(0.8 * len(targets))
        train, val = permutation[:num_train], permutation[num_train:]
        return TaskData(inputs[train], targets[train], inputs[val], targets[val])

    def make_model(self) -> nn.Module:
        return nn.Linear(64, 10)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy_sum(outputs, targets)
