"""MNIST (LeCun, Cortes, Burges): 28x28 grayscale digits, 60,000 train / 10,000 test (the validation set).

Data: the four gzipped idx archives in ``{data_dir}/mnist/`` (sha256-checked; see ``tasks.files``).
Pixels are scaled to [0, 1] and normalized with mean 0.1307 and std 0.3081, as GraB's
``train_logreg_mnist.py`` does (``Normalize((0.1307,), (0.3081,))``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orderlab.tasks import TaskData, TaskDefaults, accuracy_sum, data_file, read_idx_gz, register_task

FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MEAN, STD = 0.1307, 0.3081


def load_idx_dataset(data_dir: Path, folder: str, mean: float, std: float) -> TaskData:
    """An MNIST-format dataset: images [N, 28, 28] float32 normalized with (mean, std), labels [N] int64.

    Args:
        folder: the dataset's folder under ``data_dir`` (``mnist``, ``fashion-mnist``), holding the
            train and t10k idx archives; t10k is the validation set.

    Raises:
        OrderlabError: a file is missing, corrupt, or not an idx file.
    """
    arrays = [read_idx_gz(data_file(data_dir, f"{folder}/{name}")) for name in FILE_NAMES]
    train_images, train_labels, val_images, val_labels = arrays

    def images(pixels) -> torch.Tensor:
        return (torch.from_numpy(pixels.copy()).to(torch.float32) / 255.0 - mean) / std

    return TaskData(
        train_inputs=images(train_images),
        train_targets=torch.from_numpy(train_labels.astype("int64")),
        val_inputs=images(val_images),
        val_targets=torch.from_numpy(val_labels.astype("int64")),
    )


@register_task("mnist-logreg")
class MnistLogReg(TaskDefaults):
    """Multinomial logistic regression on MNIST: flattened normalized pixels, linear 784 -> 10 (d = 7,850).

    GraB's LR-MNIST experiment (``lg_mnist.sh``: SGD lr 0.01, momentum 0.9, weight decay 1e-4,
    batch 64, 100 epochs); see ``configs/paper/grab-lr-mnist.yaml``.
    """

    metric_name = "accuracy"
    data_files = tuple(f"mnist/{name}" for name in FILE_NAMES)

    def load(self, data_dir: Path) -> TaskData:
        data = load_idx_dataset(data_dir, "mnist", MEAN, STD)
        data.train_inputs = data.train_inputs.reshape(len(data.train_inputs), 784)
        data.val_inputs = data.val_inputs.reshape(len(data.val_inputs), 784)
        return data

    def make_model(self) -> nn.Module:
        return nn.Linear(784, 10)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy_sum(outputs, targets)
