"""Fashion-MNIST (Zalando): 28x28 grayscale clothing images, 10 classes, 60,000 train / 10,000 test.

It stands in for CIFAR-10 in CD-GraB's LeNet ablations (CIFAR-10 could not be obtained offline).
Data: the four gzipped idx archives in ``{data_dir}/fashion-mnist/`` (sha256-checked), the upstream
files that the Debian package ``dataset-fashion-mnist`` ships. Pixels are scaled to [0, 1] and
normalized with the training set's mean 0.2860 and std 0.3530.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orderlab.tasks import TaskData, TaskDefaults, accuracy_sum, register_task
from orderlab.tasks.mnist import FILE_NAMES, load_idx_dataset

MEAN, STD = 0.2860, 0.3530


class LeNet5(nn.Module):
    """LeNet-5 as in CD-GraB's ``d_model.LeNet`` (ReLU, max pooling), for 1x28x28 inputs, no BatchNorm.

    conv 1->6 5x5 (padding 2, so 28x28 plays LeNet's padded 32x32) -> pool -> conv 6->16 5x5 -> pool
    -> conv 16->120 5x5 -> fc 120->84 -> fc 84->10. No BatchNorm, so ``torch.func.vmap`` computes
    per-example gradients (``unit: example``). d = 61,706.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convnet = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 6, kernel_size=5, padding=2)),
                    ("relu1", nn.ReLU()),
                    ("s2", nn.MaxPool2d(kernel_size=2, stride=2)),
                    ("conv3", nn.Conv2d(6, 16, kernel_size=5)),
                    ("relu3", nn.ReLU()),
                    ("s4", nn.MaxPool2d(kernel_size=2, stride=2)),
                    ("conv5", nn.Conv2d(16, 120, kernel_size=5)),
                    ("relu5", nn.ReLU()),
                ]
            )
        )
        self.fc = nn.Sequential(
            OrderedDict([("fc6", nn.Linear(120, 84)), ("relu6", nn.ReLU()), ("fc7", nn.Linear(84, 10))])
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 1, 28, 28] -> logits [N, 10]."""
        return self.fc(self.convnet(images).flatten(start_dim=1))


@register_task("fashion-mnist-cnn")
class FashionMnistCnn(TaskDefaults):
    """LeNet-5 (no BatchNorm) on Fashion-MNIST, cross-entropy, validation accuracy on the 10,000 test images."""

    metric_name = "accuracy"
    data_files = tuple(f"fashion-mnist/{name}" for name in FILE_NAMES)

    def load(self, data_dir: Path) -> TaskData:
        data = load_idx_dataset(data_dir, "fashion-mnist", MEAN, STD)
        data.train_inputs = data.train_inputs.unsqueeze(1)  # [N, 1, 28, 28]
        data.val_inputs = data.val_inputs.unsqueeze(1)
        return data

    def make_model(self) -> nn.Module:
        return LeNet5()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy_sum(outputs, targets)
