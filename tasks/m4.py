"""M4 Weekly forecasting with an autoregressive MLP, built as CD-GraB builds it.

CD-GraB (``d_data.py: Dataset_M4``, ``d_model.py: Auto_MLP``, ``main-MLP-M4.py``):

- series: the 359 rows of ``m4/Weekly-train.csv`` without their empty (NaN) cells, each z-scored with
  its own mean and population std;
- windows: 20 inputs -> the next 6 values, starting at ``j in range(0, len - 20 - 6, 3)`` of every
  series (stride 3; the range excludes the last possible start, as CD-GraB's does): 119,316 windows;
- split: the windows are shuffled with ``np.random.RandomState(0)``; the first 90% are training
  examples (107,384), the rest validation (11,932);
- model: an MLP that maps 20 values to the next ``num_steps`` (1), applied autoregressively (its
  predictions are appended to the input window) until the horizon is covered: 6 steps in training,
  13 for the test set; 3 linear layers x 64 hidden, ReLU (d = 5,569); CD-GraB runs it with
  ``use_RevIN=False``, so there is no per-window normalization;
- loss: MSE on z-scored values; validation metric: RMSE (square root of the mean MSE);
- test (``test_metrics``): per series, the last 20 z-scored training values -> the 13 values of
  ``m4/Weekly-test.csv``; sMAPE on de-normalized values and RMSE on z-scored values.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orderlab.errors import OrderlabError
from orderlab.tasks import TaskData, TaskDefaults, data_file, register_task

TRAIN_CSV = "m4/Weekly-train.csv"
TEST_CSV = "m4/Weekly-test.csv"
TEST_HORIZON = 13  # the M4 guide's horizon for Weekly series
WINDOW_STRIDE = 3
TRAIN_FRACTION = 0.9


def read_series_csv(path: Path) -> list[np.ndarray]:
    """The rows of an M4 CSV (header, then id and values; empty cells pad short series) as float64 arrays."""
    with path.open(newline="") as handle:
        rows = csv.reader(handle)
        next(rows)  # header: "V1","V2",...
        return [np.array([float(cell) for cell in row[1:] if cell not in ("", "NA")]) for row in rows]


@functools.cache
def load_series(data_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """(z-scored train series, raw test series, per-series means, per-series stds), read once per directory.

    Raises:
        OrderlabError: a file is missing or corrupt, or the train and test files disagree.
    """
    train = read_series_csv(data_file(data_dir, TRAIN_CSV))
    test = read_series_csv(data_file(data_dir, TEST_CSV))
    if len(train) != len(test) or any(len(values) != TEST_HORIZON for values in test):
        raise OrderlabError(
            f"{data_dir / TEST_CSV} must have one row of {TEST_HORIZON} values per series of {data_dir / TRAIN_CSV}"
        )
    means = np.array([values.mean() for values in train])
    stds = np.array([values.std() for values in train])  # population std, as np.std in CD-GraB
    return [(values - m) / s for values, m, s in zip(train, means, stds, strict=True)], test, means, stds


def make_windows(
    series: list[np.ndarray], input_length: int, output_length: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """All (input, target) windows in CD-GraB's (series, start) order: [num_windows, input_length], [.., output_length]."""
    inputs, targets = [], []
    span = input_length + output_length
    for values in series:
        starts = np.arange(0, len(values) - span, stride)
        if len(starts) == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(values, span)[starts]
        inputs.append(windows[:, :input_length])
        targets.append(windows[:, input_length:])
    return np.concatenate(inputs), np.concatenate(targets)


class AutoregressiveMlp(nn.Module):
    """An MLP from ``input_length`` values to the next ``num_steps``, rolled out to a horizon.

    ``forward(x)`` forecasts ``horizon`` values; ``forecast(x, h)`` any ``h``.
    """

    def __init__(self, input_length: int, horizon: int, hidden: int, num_layers: int, num_steps: int) -> None:
        super().__init__()
        self.horizon, self.num_steps = horizon, num_steps
        layers: list[nn.Module] = [nn.Linear(input_length, hidden), nn.ReLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, num_steps))
        self.net = nn.Sequential(*layers)

    def forecast(self, window: torch.Tensor, horizon: int) -> torch.Tensor:
        """window [N, input_length] -> the next ``horizon`` values [N, horizon], predictions fed back."""
        predictions = []
        for _ in range(math.ceil(horizon / self.num_steps)):
            step = self.net(window)
            predictions.append(step)
            window = torch.cat([window[:, self.num_steps :], step], dim=1)
        return torch.cat(predictions, dim=1)[:, :horizon]

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.forecast(window, self.horizon)


@register_task("m4-mlp")
class M4Mlp(TaskDefaults):
    """Autoregressive MLP on M4 Weekly windows (CD-GraB's MLP-M4); validation metric RMSE."""

    metric_name = "rmse"
    data_files = (TRAIN_CSV, TEST_CSV)

    def __init__(
        self,
        input_length: int = 20,
        output_length: int = 6,
        hidden: int = 64,
        num_layers: int = 3,
        num_steps: int = 1,
    ) -> None:
        if min(input_length, output_length, hidden, num_steps) < 1 or num_layers < 2:
            raise OrderlabError(
                "task.options of m4-mlp: input_length, output_length, hidden and num_steps must be >= 1 "
                f"and num_layers >= 2 (got {input_length}, {output_length}, {hidden}, {num_steps}, {num_layers})"
            )
        self.input_length, self.output_length = input_length, output_length
        self.hidden, self.num_layers, self.num_steps = hidden, num_layers, num_steps

    def load(self, data_dir: Path) -> TaskData:
        series = load_series(data_dir)[0]
        inputs, targets = make_windows(series, self.input_length, self.output_length, WINDOW_STRIDE)
        order = np.arange(len(inputs))
        np.random.RandomState(0).shuffle(order)  # the same permutation CD-GraB's list shuffle gives
        num_train = int(len(order) * TRAIN_FRACTION)
        train, val = order[:num_train], order[num_train:]

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).to(torch.float32)

        return TaskData(
            tensor(inputs[train]), tensor(targets[train]), tensor(inputs[val]), tensor(targets[val])
        )

    def make_model(self) -> nn.Module:
        return AutoregressiveMlp(
            self.input_length, self.output_length, self.hidden, self.num_layers, self.num_steps
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Sum over windows of the window's mean squared error (its mean is the MSE; see ``finalize_metric``)."""
        return float(((outputs - targets) ** 2).mean(dim=1).sum())

    def finalize_metric(self, val_loss_mean: float, metric_mean: float) -> float:
        """RMSE: the square root of the mean squared error."""
        return math.sqrt(metric_mean)

    @torch.no_grad()
    def test_metrics(self, model: nn.Module, data_dir: Path) -> dict[str, float]:
        """The M4 test evaluation: last ``input_length`` training values of each series -> 13 test values.

        Returns:
            ``smape`` (mean over series and horizon of 200·|ŷ−y|/(|ŷ|+|y|), de-normalized values),
            ``rmse`` (z-scored values) and ``num_series``.
        """
        series, test, means, stds = load_series(data_dir)
        windows = torch.tensor(
            np.stack([values[-self.input_length :] for values in series]), dtype=torch.float32
        )
        parameter = next(model.parameters())
        predicted = model.forecast(windows.to(parameter.device), TEST_HORIZON).double().cpu().numpy()
        scale, shift = stds[:, None], means[:, None]
        actual = np.stack(test)
        forecast = predicted * scale + shift
        smape = np.mean(200.0 * np.abs(forecast - actual) / (np.abs(forecast) + np.abs(actual)))
        rmse = math.sqrt(float(np.mean((predicted - (actual - shift) / scale) ** 2)))
        return {"smape": float(smape), "rmse": rmse, "num_series": len(series)}
