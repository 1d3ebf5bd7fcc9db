"""Benchmark tasks, installed as ``orderlab.tasks``: data loading, model, loss and metric per task.

A task is a class registered with ``@register_task(name)``. Its constructor takes the task's
options (config ``task.options``) as keyword arguments; ``make_task(task_config)`` builds one.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from orderlab.errors import OrderlabError


@dataclass
class TaskData:
    """A task's examples as tensors; row i of inputs goes with row i of targets.

    Attributes:
        train_inputs: [N, ...] float32. train_targets: [N] (int64 class labels or float32 targets).
        val_inputs: [M, ...] float32. val_targets: [M].
    """

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor


class Task(Protocol):
    """What the worker needs from a task."""

    name: str
    metric_name: str  # e.g. "accuracy"

    def load(self, data_dir: Path) -> TaskData: ...

    def make_model(self) -> nn.Module: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> float: ...


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
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise OrderlabError(
            f"data file {path} is corrupt: sha256 {digest.hexdigest()} != expected {sha256}; "
            f"download it again from {source}"
        )
    return path


def read_gzip_bytes(path: Path) -> bytes:
    """The decompressed bytes of a gzip file."""
    with gzip.open(path, "rb") as handle:
        return handle.read()


def accuracy_sum(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Number of correct arg-max predictions: outputs [N, C] logits, targets [N] int64."""
    return float((outputs.argmax(dim=1) == targets).sum())


# registration happens on import; keep these after the registry
from orderlab.tasks import digits, mnist1d  # noqa: E402,F401

__all__ = ["TASKS", "Task", "TaskData", "make_task", "register_task", "resolve_data_dir", "verified_file"]
