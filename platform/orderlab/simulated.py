"""The simulated backend (``train.backend: simulated``): every worker of a trial in one process.

Each step runs all W workers: worker w's units of the step in its order, the per-unit gradients of
all W·k units in one batched call (microbatch units and stateful models: one call per worker), and
the update from the mean over workers of each worker's mean gradient, the arithmetic of Ray Train's
all-reduce (the sum is taken in rank order; gloo may sum W > 2 workers in another order). The
ordering runs in the same process, fed exactly what workers would send the order server: pair
differences (or unit gradients), sketched and cast to ``ordering.payload_dtype`` as a worker does.
This is how the CD-GraB paper's worker-scaling studies were run (Cooper et al., NeurIPS 2023,
Sec. 5: "simulated" workers). This module imports no Ray: ``run_simulated_trial`` runs a trial
outside Tune as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from orderlab.config import ExperimentConfig
from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch
from orderlab.loop import TrainingLoop, TrialPlan, ordering_spec
from orderlab.orderings import make_ordering, order_digest
from orderlab.send_buffer import SendBuffer

#: ``report(row, checkpoint)``: receives each epoch's row and, when given, a checkpoint to keep
Report = Callable[[dict[str, Any], dict[str, Any] | None], None]


class InProcessOrdering:
    """An ordering fed in process with what W workers would send its order server.

    Per step, ``add(unit_grads [W, k, d])`` writes the step's items into a ``SendBuffer`` (the one a
    Ray Train worker sends from: pair differences or unit gradients, sketched, in
    ``payload_dtype``, so the same bits) and balances them (``observe_items``).

    Args:
        cfg: the trial's config (ordering settings, seed). plan: its sizes.
        sketch: the CountSketch workers apply before sending, or None.
    """

    def __init__(self, cfg: ExperimentConfig, plan: TrialPlan, sketch: CountSketch | None) -> None:
        self.ordering = make_ordering(cfg.ordering.name, ordering_spec(cfg, plan))
        self.buffer = SendBuffer(plan.message_kind, sketch=sketch, payload_dtype=cfg.ordering.payload_dtype)
        self.orders: np.ndarray | None = None

    def begin_epoch(self) -> np.ndarray:
        """The next epoch's orders, int64 [W, shard_size]."""
        self.buffer.begin_epoch()
        self.orders = self.ordering.begin_epoch().numpy()
        return self.orders

    def add(self, unit_grads: torch.Tensor) -> None:
        """Balance what a step's unit gradients [W, k, d] float32 give (``unit_grads`` must not be
        written to afterwards: an unpaired unit is kept as a view)."""
        for items in self.buffer.write(unit_grads):
            self.ordering.observe_items(items)
        self.buffer.clear()


class SimulatedWorkers:
    """``orderlab.loop.Workers`` for all W workers of a trial in this process.

    Args:
        cfg: the trial's config. plan: its sizes.
        checkpoint: the state to resume from (a ``TrainingLoop`` checkpoint), or None.
        report: called with each epoch's row and checkpoint (e.g. ``tune.report``); None: nothing
            beyond the epoch rows that the loop writes.
    """

    writes_results = True
    bytes_sent = 0  # nothing leaves the process
    wait_seconds = 0.0  # balancing runs on the step; its time is compute

    def __init__(
        self,
        cfg: ExperimentConfig,
        plan: TrialPlan,
        *,
        checkpoint: dict[str, Any] | None = None,
        report: Report | None = None,
    ) -> None:
        self.ranks = range(plan.num_workers)
        self.checkpoint, self.report_to = checkpoint, report
        sketch = None
        if cfg.ordering.sketch_dim is not None and plan.needs_gradients:
            sketch = CountSketch(plan.dim, cfg.ordering.sketch_dim, cfg.seed, trial_device(cfg))
        self.ordering = InProcessOrdering(cfg, plan, sketch)
        self.digests: dict[int, str] = {}

    def start(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.ordering.ordering.load_state_dict(state["server"])

    def fetch_orders(self, epoch: int) -> tuple[np.ndarray, float]:
        orders = self.ordering.begin_epoch()
        assert self.ordering.ordering.epoch == epoch, "orders are fetched once per epoch, in order"
        self.digests[epoch] = order_digest(orders)
        return orders, 0.0

    def all_reduce(self, tensor: torch.Tensor) -> float:
        return 0.0  # the loop's step already summed over all workers

    def observe(self, unit_grads: torch.Tensor) -> None:
        self.ordering.add(unit_grads)

    def finish_steps(self) -> None:
        pass  # nothing queued: the step balanced its items

    def gather(self, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def order_digest(self, epoch: int) -> str:
        return self.digests[epoch]

    def ordering_state(self, epoch: int) -> dict[str, Any]:
        return self.ordering.ordering.state_dict()

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if self.report_to is not None:
            self.report_to(row, checkpoint)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self.checkpoint

    def kill_order_server(self) -> None:
        raise OrderlabError("faults.kill_order_server: train.backend='simulated' has no order server")


def run_simulated_trial(
    cfg: ExperimentConfig,
    plan: TrialPlan,
    *,
    trial_id: str,
    results_root: str,
    checkpoint: dict[str, Any] | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """Train one trial with all its workers in this process; write its epoch rows under ``results_root``.

    Args:
        cfg: the trial's validated config (``train.backend`` is not consulted). plan: its sizes
            (``orderlab.loop.plan_trial``). trial_id: the rows' key. results_root: storage root.
        checkpoint: a checkpoint that ``report`` received, to resume after its epoch.
        report: called after each epoch with its row and a checkpoint (None after a divergence);
            the checkpoint holds the live model's tensors, so save or copy it before returning.

    Returns:
        status ("completed" or "diverged"), diverged_epoch and error when it diverged, test_metrics.

    Raises:
        OrderlabError: missing data files, a model whose per-example gradients vmap cannot take, or
            ``train.device`` cuda without a GPU.
    """
    torch.set_num_threads(cfg.resources.num_threads)
    workers = SimulatedWorkers(cfg, plan, checkpoint=checkpoint, report=report)
    loop = TrainingLoop(
        cfg, plan, workers, trial_id=trial_id, results_root=results_root, device=trial_device(cfg)
    )
    return loop.run()


def trial_device(cfg: ExperimentConfig) -> torch.device:
    """``train.device``: where the model, the per-unit gradients and the ordering's running sums live
    (the ordering follows its items there).

    Raises:
        OrderlabError: cuda, but torch sees no GPU here.
    """
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise OrderlabError(
            "train.device='cuda', but torch.cuda.is_available() is False on this machine; use "
            "train.device=cpu, or run the trial where a GPU is visible"
        )
    return torch.device(cfg.train.device)
