"""The simulated backend against Ray Train: the same sweep end to end, and where a simulated step's time goes.

1. ``orderlab sweep CONFIG`` twice, as a user runs it (a fresh process and an embedded local Ray
   each): ``--set train.backend=ray-train`` and ``--set train.backend=simulated``, into temporary
   storages; wall seconds of each, their ratio, and the largest relative difference between the two
   runs' final train losses over (ordering, seed).
2. The anatomy of simulated steps, in this process: per-unit gradients of the W workers, the
   optimizer step, and the ordering's balancing, per step, for the demo's trial and for the LeNet
   worker-scaling study at W = 64 (``--scaling-workers``).

    python benchmarks/backends.py                 # the demo sweep (about 10 minutes on 2 cores)
    python benchmarks/backends.py --quick         # 3 epochs of the demo, one seed
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _common import fmt, git_state, machine_line, markdown_table

from orderlab import results
from orderlab.config import load_config
from orderlab.grads import assign_flat_gradient, num_parameters
from orderlab.loop import TrainingLoop, build_model, plan_trial
from orderlab.orderings import ordering_class
from orderlab.simulated import SimulatedWorkers
from orderlab.tasks import load_task_data, make_task

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(config: str, backend: str, storage: str, extra: list[str]) -> float:
    """Wall seconds of ``orderlab sweep config`` with ``backend`` into ``storage``."""
    command = [sys.executable, "-m", "orderlab.cli", "sweep", config, "--set", f"train.backend={backend}"]
    command += ["--set", f"storage={storage}", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def epoch_rows(storage: str) -> pd.DataFrame:
    """(ordering, seed, epoch) -> train_loss, order_digest, and whether it is the trial's last epoch."""
    return (
        results.connect(storage)
        .sql(
            "SELECT ordering, seed, epoch, epoch = trials.epochs - 1 AS last, train_loss, order_digest "
            "FROM epochs JOIN trials USING (trial_id, sweep)"
        )
        .df()
        .set_index(["ordering", "seed", "epoch"])
        .sort_index()
    )


def end_to_end(config: str, extra: list[str]) -> None:
    rows, epochs, seconds = [], {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for backend in ("ray-train", "simulated"):
            storage = f"{directory}/{backend}"
            seconds[backend] = run_sweep(config, backend, storage, extra)
            epochs[backend] = epoch_rows(storage)
            rows.append([backend, len(epochs[backend].query("last")), fmt(seconds[backend])])
    ray_rows, simulated = epochs["ray-train"], epochs["simulated"]
    final = ray_rows["last"]
    difference = (simulated["train_loss"] - ray_rows["train_loss"]).abs() / ray_rows["train_loss"].abs()
    same_orders = int((simulated["order_digest"] == ray_rows["order_digest"]).sum())
    print(f"\n### `orderlab sweep {config}` end to end\n")
    print(markdown_table(["backend", "trials", "wall s"], rows))
    print(
        f"\nsimulated is {seconds['ray-train'] / seconds['simulated']:.1f}x sooner; "
        f"epochs with equal orders: {same_orders} of {len(ray_rows)}; train losses bit-identical in "
        f"{int((difference == 0).sum())} of {len(ray_rows)} epochs; largest relative difference: "
        f"{difference.max():.1e} over all epochs, {difference[final].max():.1e} at the last"
    )
    if difference.max() > 0:
        print("epochs whose train losses differ:\n" + difference[difference > 0].to_string())


def step_anatomy(config: str, overrides: dict, steps: int) -> list[str]:
    """Milliseconds per simulated step of one epoch's first ``steps`` steps, by part."""
    cfg = load_config(ROOT / config, {"sweep": {}, "train.backend": "simulated", **overrides})
    task = make_task(cfg.task.name, cfg.task.options)
    data = load_task_data(task, cfg.task.data_dir, cfg.task.train_examples)
    data = task.arrange(data, cfg.train.num_workers, cfg.train.microbatch_size)
    ordering = ordering_class(cfg.ordering.name)
    dim = num_parameters(build_model(task, cfg.seed))
    plan = plan_trial(
        cfg.train, len(data.train_targets), dim, ordering.needs_gradients, ordering.message_kind
    )
    workers = SimulatedWorkers(cfg, plan)
    with tempfile.TemporaryDirectory() as directory:
        loop = TrainingLoop(
            cfg, plan, workers, trial_id="bench", results_root=directory, device=torch.device("cpu")
        )
        orders, _ = workers.fetch_orders(0)
        k, parts = plan.units_per_step, {"gradients": 0.0, "optimizer": 0.0, "ordering": 0.0}
        warmup = min(10, plan.steps_per_epoch // 2)  # the balancing kernel's first call loads it (0.4 s)
        steps = min(steps, plan.steps_per_epoch - warmup)
        for step in range(-warmup, steps):
            if step == 0:
                parts = dict.fromkeys(parts, 0.0)
            started = time.perf_counter()
            first = (step + warmup) * k
            inputs, targets = loop.shard.batch(orders[:, first : first + k])
            unit_grads, reduced = loop.step_gradients(inputs, targets)
            parts["gradients"] += time.perf_counter() - started
            started = time.perf_counter()
            assign_flat_gradient(loop.model, reduced[:-1] / plan.num_workers, cfg.train.grad_clip)
            loop.optimizer.step()
            loop.scheduler.step()
            parts["optimizer"] += time.perf_counter() - started
            started = time.perf_counter()
            if unit_grads is not None:
                workers.observe(unit_grads)
            parts["ordering"] += time.perf_counter() - started
    total = sum(parts.values())
    label = f"{cfg.task.name} {cfg.ordering.name} W={plan.num_workers} k={k} d={dim:,}"
    return [label, *(fmt(1e3 * parts[p] / steps) for p in parts), fmt(1e3 * total / steps)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--quick", action="store_true", help="3 epochs, seed 0")
    parser.add_argument("--scaling-workers", type=int, default=64)
    parser.add_argument("--skip-sweeps", action="store_true", help="only the step anatomy")
    args = parser.parse_args()
    print(machine_line())
    print(f"commit: {git_state()}")
    extra = ["--set", "train.epochs=3", "--set", "sweep.seed=[0]"] if args.quick else []
    if not args.skip_sweeps:
        end_to_end(args.config, extra)
    rows = [step_anatomy("configs/demo.yaml", {"ordering.name": name}, 200) for name in ("rr", "cd-grab")]
    scaling = {
        "train.num_workers": args.scaling_workers,
        "train.batch_size": args.scaling_workers,
        "task.train_examples": 6400,
    }
    config = "configs/paper/cdgrab-lenet-fashion-mnist-scaling.yaml"
    rows += [step_anatomy(config, {**scaling, "ordering.name": name}, 30) for name in ("rr", "cd-grab")]
    print("\n### Where a simulated step's time goes (ms per step)\n")
    print(markdown_table(["trial", "gradients", "optimizer", "ordering", "step"], rows))


if __name__ == "__main__":
    main()
