"""orderlab: a Ray-based experiment platform for example ordering in SGD training.

``import orderlab`` is light (no torch, no Ray); submodules load on first use::

    res = orderlab.sweep("configs/demo.yaml", overrides={"train.epochs": 3})  # the module is callable
    con = orderlab.results.connect("results/")
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("cli", "config", "grads", "herding", "orderings", "results", "server", "sweep", "worker")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"orderlab.{name}")
    raise AttributeError(f"module 'orderlab' has no attribute {name!r}")
