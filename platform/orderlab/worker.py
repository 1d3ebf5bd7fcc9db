"""The Ray Train side of the training loop: one rank per worker process.

``train_loop`` is the ``ray.train.torch.TorchTrainer`` entry point: it runs ``orderlab.loop``'s
``TrainingLoop`` with ``RayTrainWorkers``, which fetches orders from the trial's order server,
all-reduces each step's gradient sum with ``torch.distributed`` (gloo on CPU, NCCL on GPU), sends
the ordering's inputs to the server in batched fire-and-forget messages (``orderlab.messaging``),
and keeps checkpoints with Ray Train. Nothing on the training step waits for the server except the
bounded in-flight window; only the next epoch's order does.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orderlab.config import ExperimentConfig
from orderlab.grads import CountSketch
from orderlab.loop import TrainingLoop, TrialPlan, load_checkpoint, save_checkpoint
from orderlab.messaging import ServerMessenger, make_transport, message_transport
from orderlab.order_queue import OrderServerRestarted


class RayTrainWorkers:
    """``orderlab.loop.Workers`` for one Ray Train worker: rank ``ray.train``'s world rank.

    Args:
        cfg: the trial's config. plan: its sizes. server: the trial's order-server actor handle.
        device: this worker's device (``ray.train.torch.get_device()``).
    """

    def __init__(self, cfg: ExperimentConfig, plan: TrialPlan, server: Any, device: torch.device) -> None:
        rank = ray.train.get_context().get_world_rank()
        self.ranks, self.writes_results = range(rank, rank + 1), rank == 0
        self.plan, self.server, self.rank, self.generation = plan, server, rank, 0
        ordering = cfg.ordering
        sketch = None
        if ordering.sketch_dim is not None and plan.needs_gradients:
            sketch = CountSketch(plan.dim, ordering.sketch_dim, cfg.seed, device)
        kind = message_transport(ordering.transport, server, device) if plan.needs_gradients else "ray"
        transport = make_transport(
            kind,
            server,
            rank=rank,
            message_kind=plan.message_kind,
            units_per_step=plan.units_per_step,
            width=ordering.sketch_dim or plan.dim,
            shard_size=plan.shard_size,
            ordering=ordering,
        )
        self.messenger = ServerMessenger(
            transport,
            message_kind=plan.message_kind,
            message_steps=ordering.message_steps,
            sketch=sketch,
            payload_dtype=ordering.payload_dtype,
        )

    @property
    def bytes_sent(self) -> int:
        return self.messenger.bytes_sent

    @property
    def wait_seconds(self) -> float:
        return self.messenger.wait_seconds

    def start(self, state: dict[str, Any] | None) -> None:
        """Reset the order server to the checkpoint (rank 0), share its generation, and attach this
        worker's transport (a ring is created and mapped now, not on a training step).

        Every start of a worker group (first start, Ray Train restart, resumed sweep) begins a new
        generation, so messages still in flight from a crashed group are dropped by the server.
        """
        generation = [
            ray.get(self.server.reset.remote(state["server"] if state else None)) if self.rank == 0 else 0
        ]
        dist.broadcast_object_list(generation, src=0)
        self.generation = generation[0]
        self.messenger.start(generation[0])

    def fetch_orders(self, epoch: int) -> tuple[np.ndarray, float]:
        order, wait_seconds = self.messenger.fetch_order(epoch)
        self.messenger.begin_epoch(epoch)
        return order[np.newaxis], wait_seconds

    def all_reduce(self, tensor: torch.Tensor) -> float:
        started = time.perf_counter()
        dist.all_reduce(tensor)
        return time.perf_counter() - started

    def observe(self, unit_grads: torch.Tensor) -> None:
        self.messenger.add(unit_grads[0])

    def finish_steps(self) -> None:
        self.messenger.flush()

    def gather(self, grads: torch.Tensor) -> torch.Tensor | None:
        rows = grads[0]
        gathered = [torch.empty_like(rows) for _ in range(self.plan.num_workers)] if self.rank == 0 else None
        dist.gather(rows, gathered, dst=0)
        return torch.stack(gathered) if gathered is not None else None  # rank 0

    def order_digest(self, epoch: int) -> str:
        return ray.get(self.server.order_digest.remote(epoch))

    def ordering_state(self, epoch: int) -> dict[str, Any]:
        return ray.get(self.server.snapshot.remote(epoch, self.generation))

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is None:
            ray.train.report(row, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(checkpoint, directory)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def latest_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory)

    def kill_order_server(self) -> None:
        ray.kill(self.server, no_restart=False)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: ``loop_config`` holds config (dict), plan (dict), server, trial_id, results_root.

    Raises:
        RuntimeError: the order server died (Ray Train restarts the worker group from the last
            checkpoint when ``train.max_failures`` allows).
    """
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    plan = TrialPlan(**loop_config["plan"])
    torch.set_num_threads(cfg.resources.num_threads)
    device = ray.train.torch.get_device()
    workers = RayTrainWorkers(cfg, plan, loop_config["server"], device)
    loop = TrainingLoop(
        cfg,
        plan,
        workers,
        trial_id=loop_config["trial_id"],
        results_root=loop_config["results_root"],
        device=device,
    )
    try:
        outcome = loop.run()
    except (
        ray.exceptions.RayActorError,
        ray.exceptions.ActorUnavailableError,
        OrderServerRestarted,
    ) as error:
        raise RuntimeError(
            f"the order server of trial {loop_config['trial_id']} died ({type(error).__name__}); with "
            "train.max_failures >= 1 the trial restarts from its last checkpoint"
        ) from error
    node_ids: list[Any] = [None] * plan.num_workers
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    return {**outcome, "worker_node_ids": node_ids}
