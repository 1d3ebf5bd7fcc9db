"""Benchmark tasks, installed as ``orderlab.tasks``: data loading, model, loss and metric per task.

A task is a class registered with ``@register_task(name)``. Its constructor takes the task's
options (config ``task.options``) as keyword arguments; ``make_task(task_config)`` builds one.
``TaskDefaults`` gives every task the defaults of the optional hooks (``arrange``,
``finalize_metric``, ``evaluate_sums``, ``test_metrics``, ``supported_units``, ``data_files``); a task overrides only
what it needs. The data files, their checksums and URLs are in ``orderlab.tasks.files``.
"""

from __future__ import annotations

import gzip
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from orderlab.data import file_sha256, verify_file
from orderlab.errors import OrderlabError


@dataclass
class TaskData:
    """A task's examples as tensors; row i of inputs goes with row i of targets.

    Attributes:
        train_inputs: [N, ...] float32 (int64 token ids for language models).
        train_targets: [N, ...] (int64 class labels, float32 targets, or int64 next tokens).
        val_inputs: [M, ...]. val_targets: [M, ...].
        extras: task-specific arrays that are not examples (e.g. the language model's whole training
            token stream, which ``Task.arrange`` lays out again for a worker count and batch size).
    """

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class EvalSums(NamedTuple):
    """Sums over evaluated examples: ``loss_sum / count`` is the mean loss, ``metric_sum / count`` the
    mean metric before ``Task.finalize_metric``. ``count`` is examples (tokens for language models)."""

    loss_sum: float
    metric_sum: float
    count: int


class Task(Protocol):
    """What the worker needs from a task."""

    name: str
    metric_name: str  # e.g. "accuracy", "perplexity", "rmse"
    supported_units: tuple[str, ...]  # the train.unit values the task can order
    data_files: tuple[str, ...]  # paths under the data directory it reads (keys of tasks.files.FILES)

    def load(self, data_dir: Path) -> TaskData: ...

    def arrange(self, data: TaskData, num_workers: int, microbatch_size: int) -> TaskData: ...

    def make_model(self) -> nn.Module: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float: ...

    def finalize_metric(self, val_loss_mean: float, metric_mean: float) -> float: ...

    def evaluate_sums(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_streams: int | None = None
    ) -> EvalSums: ...

    def test_metrics(self, model: nn.Module, data_dir: Path) -> dict[str, float]: ...


class TaskDefaults:
    """The defaults every task shares; a task class lists it as a base and overrides what differs."""

    supported_units: tuple[str, ...] = ("example", "microbatch")
    data_files: tuple[str, ...] = ()
    eval_batch_size = 4096

    def arrange(self, data: TaskData, num_workers: int, microbatch_size: int) -> TaskData:
        """The training examples laid out for ``num_workers`` contiguous shards (identity by default).

        Shards are contiguous blocks of units and a unit is ``microbatch_size`` consecutive examples
        (``unit: microbatch``) or one example; a task whose examples depend on that layout (the
        language model's corpus columns) overrides this.
        """
        return data

    def finalize_metric(self, val_loss_mean: float, metric_mean: float) -> float:
        """The reported validation metric from the mean loss and the mean of ``metric_sum``: the mean itself."""
        return metric_mean

    def test_metrics(self, model: nn.Module, data_dir: Path) -> dict[str, float]:
        """Metrics on a held-out test set beyond the validation set, after training: none by default.

        Tasks with the papers' test protocol override this (M4's sMAPE, WikiText-2's test perplexity).
        """
        return {}

    @torch.no_grad()
    def evaluate_sums(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_streams: int | None = None
    ) -> EvalSums:
        """Loss and metric sums of ``model`` over ``inputs`` [N, ...], ``eval_batch_size`` rows at a time.

        Args:
            num_streams: for stateful models, the rows are chunk-major over this many streams (the
                layout of a ``unit: microbatch`` shard); ignored by stateless tasks.
        """
        loss_sum = metric_sum = 0.0
        for offset in range(0, len(targets), self.eval_batch_size):
            outputs = model(inputs[offset : offset + self.eval_batch_size])
            batch_targets = targets[offset : offset + self.eval_batch_size]
            loss_sum += float(self.loss(outputs, batch_targets)) * len(batch_targets)  # type: ignore[attr-defined]
            metric_sum += self.metric_sum(outputs, batch_targets)  # type: ignore[attr-defined]
        return EvalSums(loss_sum, metric_sum, len(targets))


def reset_model_state(model: nn.Module) -> None:
    """Forget the state a stateful model carries between forward calls (the LSTM's hidden state).

    Call at the start of every epoch; a no-op for stateless models.
    """
    for module in model.modules():
        reset = getattr(module, "reset_state", None)
        if callable(reset):
            reset()


def stateful_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry state between forward calls: those with ``reset_state()``.

    Such a module keeps its state in a ``state`` attribute (None after ``reset_state``), which the
    simulated backend sets and reads to run several workers' streams through one model.
    """
    return [module for module in model.modules() if callable(getattr(module, "reset_state", None))]


TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator adding a task to the registry under ``name``."""

    def add(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def make_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Build the task ``name`` with its ``options``.

    Raises:
        OrderlabError: unknown task name, or an option the task does not take.
    """
    if name not in TASKS:
        raise OrderlabError(f"task.name={name!r} is unknown; known: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    options = dict(options or {})
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise OrderlabError(
            f"task.options.{unknown[0]} is not an option of task {name!r}; "
            f"its options: {', '.join(sorted(accepted)) or '(none)'}"
        )
    return cls(**options)


def resolve_data_dir(data_dir: str | None) -> Path:
    """The data directory: config ``task.data_dir``, else env ``ORDERLAB_DATA``, else ``~/.cache/orderlab/data``."""
    chosen = data_dir or os.environ.get("ORDERLAB_DATA") or Path.home() / ".cache" / "orderlab" / "data"
    return Path(chosen).expanduser().resolve()


def load_task_data(task: Task, data_dir: str | None, train_examples: int | None = None) -> TaskData:
    """The task's data from its data directory (see ``resolve_data_dir``), optionally a training subset.

    Args:
        train_examples: keep this many training examples, a random subset fixed by seed 0 (the same
            for every trial and worker) in the files' order; None keeps all.

    Raises:
        OrderlabError: missing or corrupt files; ``train_examples`` larger than the training set, or
            set for a task whose examples are laid out from a token stream (use its ``train_tokens``).
    """
    data = task.load(resolve_data_dir(data_dir))
    if train_examples is None:
        return data
    if data.extras:
        raise OrderlabError(
            f"task.train_examples does not apply to {task.name}, whose examples are laid out from a "
            f"token stream; remove it and set task.options.train_tokens instead"
        )
    available = len(data.train_targets)
    if train_examples > available:
        raise OrderlabError(
            f"task.train_examples={train_examples} exceeds the {available} training examples of {task.name}; "
            f"lower it or remove it to train on all"
        )
    generator = torch.Generator().manual_seed(0)
    keep = torch.randperm(available, generator=generator)[:train_examples].sort().values
    return TaskData(data.train_inputs[keep], data.train_targets[keep], data.val_inputs, data.val_targets)


def verified_file(data_dir: Path, relative: str, sha256: str, source: str) -> Path:
    """The path of a data file after checking it exists and matches ``sha256``.

    Args:
        data_dir: the data directory. relative: the file's path under it.
        sha256: expected hex digest. source: where a user gets the file (URL or package).

    Raises:
        OrderlabError: the file is missing or its checksum differs; the message names the file,
            the expected checksum and where to get it.
    """
    path = data_dir / relative
    if not path.is_file():
        raise OrderlabError(
            f"data file {path} is missing (task data directory {data_dir}); get it from {source} "
            f"(sha256 {sha256}) or set task.data_dir / ORDERLAB_DATA to a directory that has {relative}"
        )
    actual = file_sha256(path)
    if actual != sha256:
        raise OrderlabError(
            f"data file {path} is corrupt: sha256 {actual} != expected {sha256}; download it again from {source}"
        )
    return path


def data_file(data_dir: Path, relative: str) -> Path:
    """The verified path of ``relative``, an entry of the table ``orderlab.tasks.files.FILES``.

    Raises:
        OrderlabError: the file is missing or its checksum differs; the message names the file,
            the expected checksum and where to get it (and ``orderlab data fetch`` when it can).
    """
    from orderlab.tasks.files import FILES

    return verify_file(data_dir, FILES[relative])


def read_gzip_bytes(path: Path) -> bytes:
    """The decompressed bytes of a gzip file."""
    with gzip.open(path, "rb") as handle:
        return handle.read()


_IDX_DTYPES = {0x08: np.uint8}


def read_idx_gz(path: Path) -> np.ndarray:
    """The array of a gzipped idx file (MNIST format): magic ``0x0000 TT NN``, NN big-endian int32 sizes.

    Raises:
        OrderlabError: the header is not an idx header of unsigned bytes.
    """
    raw = read_gzip_bytes(path)
    kind, num_dims = raw[2], raw[3]
    if raw[:2] != b"\0\0" or kind not in _IDX_DTYPES or not 1 <= num_dims <= 4:
        raise OrderlabError(f"{path} is not an idx file of unsigned bytes (header {raw[:4].hex()})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=num_dims, offset=4))
    body = np.frombuffer(raw, dtype=_IDX_DTYPES[kind], offset=4 + 4 * num_dims)
    if body.size != int(np.prod(shape)):
        raise OrderlabError(f"{path}: idx header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def accuracy_sum(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Number of correct arg-max predictions: outputs [N, C] logits, targets [N] int64."""
    return float((outputs.argmax(dim=1) == targets).sum())


# registration happens on import; keep these after the registry
from orderlab.tasks import digits, fashion_mnist, hmda, m4, mnist, mnist1d, wikitext2  # noqa: E402,F401

__all__ = [
    "TASKS",
    "EvalSums",
    "Task",
    "TaskData",
    "TaskDefaults",
    "data_file",
    "make_task",
    "register_task",
    "reset_model_state",
    "stateful_modules",
    "load_task_data",
    "resolve_data_dir",
    "verified_file",
]
