"""Epoch-time overhead of cd-grab over rr (D-RR) with 4 Ray Train workers, from one sweep per task.

For every task, one ``orderlab.sweep`` runs rr, cd-grab and cd-grab with ``ordering.sketch_dim=256``
and ``payload_dtype=float16``, each with 2 seeds, 4 workers (``resources.cpus_per_worker=0.45``,
``trial_cpus=0.1``: one trial at a time on 2 CPUs), into a temporary storage. The epochs table
(``orderlab.results.connect``) gives epoch, compute, all-reduce and order-wait seconds and
``bytes_to_server``; epoch 0 (warm-up) is left out. The ratio is the median cd-grab epoch seconds
over the median rr epoch seconds (medians over seeds × epochs), beside the issue's goals and the
CD-GraB authors' 1.45× (LSTM, microbatch units) to 2.0× (HMDA logistic regression, example units).

Then the anatomy of one worker step, measured in this process with one torch thread (no Ray Train):
the unit gradients each ordering needs (microbatch backward for rr; per-example ``vmap`` gradients
for cd-grab with example units), the optimizer step, and the worker-side messaging per step
(``ServerMessenger.add``: pair differences, sketch, encode, and every 16 steps a message to a real
order-server actor, through its shared-memory ring as the sweep's workers send, and through
``push.remote``, ``ordering.transport: ray``), beside the all-reduce and order-wait seconds per step of the sweep.

Tasks: the issue's mnist-logreg (example units, batch 64) and wikitext2-lstm (microbatch units,
batch 16) when ``orderlab.tasks`` has them and the worker can run them; otherwise their stand-ins
with the same unit, mnist1d-logreg (example units, batch 64 -> microbatch 16) and mnist1d-mlp
(``train.unit=microbatch``, batch 64). ``--tasks all`` runs every one of them that can run.

    python benchmarks/epoch_overhead.py              # the issue's tasks, or their stand-ins (~41 min on 2 cores)
    python benchmarks/epoch_overhead.py --tasks all  # every task above that can run (the README's table, ~48 min)
    python benchmarks/epoch_overhead.py --quick      # mnist1d-logreg only, 1 seed, 3 epochs (~2 min)
    python benchmarks/epoch_overhead.py --tasks mnist-logreg --epochs 5
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from _common import fmt, machine_line, markdown_table, median
from ray import tune

import orderlab
from orderlab import results
from orderlab.config import OrderingConfig, validate
from orderlab.grads import CountSketch, microbatch_gradient, num_parameters, per_example_gradients
from orderlab.loop import build_model, make_optimizer
from orderlab.messaging import ServerMessenger, make_transport
from orderlab.orderings import OrderingSpec
from orderlab.server import RemoteOrderServer
from orderlab.sweep import RAY_ENV
from orderlab.tasks import TASKS, make_task, resolve_data_dir

#: per task: the train settings of its reference config (configs/demo.yaml, configs/paper/*), 4 workers
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d-logreg": {"train": {"unit": "example", "batch_size": 64, "lr": 0.1, "momentum": 0.9}},
    "mnist1d-mlp": {"train": {"unit": "microbatch", "batch_size": 64, "lr": 0.05, "momentum": 0.9}},
    "mnist-logreg": {
        "train": {"unit": "example", "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    },
    "wikitext2-lstm": {
        "train": {"unit": "microbatch", "batch_size": 16, "lr": 5.0, "momentum": 0.9},
        # the paper's model and layout on a documented prefix of train.txt (task.options.train_tokens):
        # 150,000 tokens = 267 steps per epoch instead of 3,729; the step is the full task's step
        "options": {
            "bptt": 35,
            "embedding_size": 32,
            "hidden_size": 32,
            "num_layers": 2,
            "dropout": 0.0,
            "train_tokens": 150_000,
        },
    },
}
#: the issue's goals for cd-grab / rr epoch seconds, by task (other tasks: reported only)
GOALS = {"mnist-logreg": 1.10, "wikitext2-lstm": 1.03}
#: the CD-GraB authors' own code, cd-grab / D-RR epoch time (issue 4), by unit
AUTHORS = {"example": "2.0× (HMDA LR)", "microbatch": "1.45× (LSTM)"}
VARIANTS = {
    "rr": {"name": "rr"},
    "cd-grab": {"name": "cd-grab"},
    "cd-grab sketch256 fp16": {"name": "cd-grab", "sketch_dim": 256, "payload_dtype": "float16"},
    "cd-grab ray calls": {"name": "cd-grab", "transport": "ray"},  # not run unless --variants names it
}
DEFAULT_VARIANTS = ("rr", "cd-grab", "cd-grab sketch256 fp16")
#: the ordering settings a variant leaves at their defaults
ORDERING_DEFAULTS = {"sketch_dim": None, "payload_dtype": "float32", "transport": "auto"}


def worker_can_run(task: str) -> str | None:
    """Why the current worker cannot run ``task`` yet, or None.

    wikitext2-lstm needs the worker to lay out the corpus (``Task.arrange``) and to evaluate
    through ``Task.evaluate_sums``: the plain full-batch evaluation would materialise 4096 × 35 ×
    33,278 logits (about 19 GB) at once.
    """
    if task != "wikitext2-lstm":
        return None
    source = inspect.getsource(orderlab.loop)
    if ".arrange(" in source and "evaluate_sums" in source:
        return None
    return "the worker does not call Task.arrange / Task.evaluate_sums yet (its evaluation would need ~19 GB)"


#: the issue's tasks and the stand-in (same unit) that runs when one is missing or cannot run yet
STAND_INS = {"mnist-logreg": "mnist1d-logreg", "wikitext2-lstm": "mnist1d-mlp"}


def steps_per_epoch(task_name: str, num_workers: int) -> int:
    """Training steps in one epoch of ``task_name`` with its settings (examples // global batch)."""
    settings = TASK_SETTINGS[task_name]
    train = settings["train"]
    task = make_task(task_name, settings.get("options", {}))
    data = task.arrange(task.load(resolve_data_dir(None)), num_workers, train["batch_size"] // num_workers)
    return len(data.train_targets) // train["batch_size"]


def choose_tasks(requested: str, num_workers: int, max_epoch_steps: int) -> tuple[list[str], list[str]]:
    """The tasks to run and notes on the ones left out.

    ``auto``: each of the issue's tasks (mnist-logreg, wikitext2-lstm) when ``orderlab.tasks``
    has it, the worker can run it and an epoch has at most ``max_epoch_steps`` steps, else its
    MNIST-1D stand-in with the same unit; ``all``: every task of ``TASK_SETTINGS`` that can run;
    else a comma-separated list.
    """
    if requested == "auto":
        names, notes = [], []
        for paper, stand_in in STAND_INS.items():
            why = "not in orderlab.tasks.TASKS" if paper not in TASKS else worker_can_run(paper)
            if why is None and (steps := steps_per_epoch(paper, num_workers)) > max_epoch_steps:
                why = (
                    f"{steps:,} steps per epoch (> --max-epoch-steps {max_epoch_steps:,}; "
                    f"run it with --tasks {paper})"
                )
            names.append(stand_in if why else paper)
            if why:
                notes.append(f"{paper}: {why}; {stand_in} stands in")
        return names, notes
    names = list(TASK_SETTINGS) if requested == "all" else [t.strip() for t in requested.split(",")]
    chosen, notes = [], []
    for name in names:
        if name not in TASKS:
            notes.append(f"{name}: not in orderlab.tasks.TASKS")
        elif name not in TASK_SETTINGS:
            notes.append(f"{name}: no settings in benchmarks/epoch_overhead.py TASK_SETTINGS")
        elif (why := worker_can_run(name)) is not None:
            notes.append(f"{name}: skipped, {why}")
        else:
            chosen.append(name)
    return chosen, notes


def base_config(task: str, args: argparse.Namespace, storage: str) -> dict[str, Any]:
    settings = TASK_SETTINGS[task]
    return {
        "name": f"bench-{task}",
        "task": {"name": task, "options": settings.get("options", {})},
        "train": {
            "epochs": args.epochs,
            "num_workers": args.workers,
            "optimizer": "sgd",
            **settings["train"],
        },
        "ordering": {"first_epoch": "random"},
        "resources": {"cpus_per_worker": 0.45, "trial_cpus": 0.1, "num_threads": 1},
        "metrics": {"herding": False},
        "storage": storage,
        "sweep": {"seed": list(range(args.seeds))},
    }


def run_task_sweep(task: str, args: argparse.Namespace, storage: str) -> float:
    """One sweep: rr, cd-grab and the sketched variant × seeds; returns its wall seconds."""
    cfg = validate(base_config(task, args, storage), source=f"epoch_overhead {task}")
    started = time.perf_counter()
    orderlab.sweep(cfg, param_space={"ordering": tune.grid_search([VARIANTS[v] for v in args.variants])})
    return time.perf_counter() - started


def variant_name(config_json: str) -> str:
    ordering = json.loads(config_json)["ordering"]
    for name, spec in VARIANTS.items():
        if all(
            ordering.get(k, ORDERING_DEFAULTS.get(k)) == v for k, v in {**ORDERING_DEFAULTS, **spec}.items()
        ):
            return name
    return ordering["name"]


def epoch_rows(storage: str, task: str) -> pd.DataFrame:
    """The epochs (epoch >= 1) of the task's sweep with trial facts and the variant name."""
    con = results.connect(storage)
    df = con.sql(
        f"""SELECT t.trial_id, t.seed, t.unit, t.num_workers, t.shard_size, t.microbatch_size, t.status,
                   t.config_json, e.epoch, e.epoch_seconds, e.compute_seconds, e.allreduce_seconds,
                   e.order_wait_seconds, e.bytes_to_server
            FROM epochs e JOIN trials t USING (trial_id)
            WHERE t.sweep = 'bench-{task}' AND e.epoch >= 1"""
    ).df()
    df["variant"] = df["config_json"].map(variant_name)
    units_per_step = np.where(df["unit"] == "example", df["microbatch_size"], 1)
    df["steps"] = df["shard_size"] // units_per_step
    df["pairs"] = df["num_workers"] * (df["shard_size"] // 2)
    return df


def summarize(df: pd.DataFrame, task: str) -> dict[str, dict[str, float]]:
    """Per variant: medians over seeds × epochs, wait share, bytes per step and per pair."""
    out: dict[str, dict[str, float]] = {}
    for variant, group in df.groupby("variant"):
        steps = float(group["steps"].iloc[0])
        workers = float(group["num_workers"].iloc[0])
        out[str(variant)] = {
            "epochs": len(group),
            "seeds": group["seed"].nunique(),
            "epoch_s": median(list(group["epoch_seconds"])),
            "compute_s": median(list(group["compute_seconds"])),
            "allreduce_s": median(list(group["allreduce_seconds"])),
            "wait_s": median(list(group["order_wait_seconds"])),
            "wait_share": float(group["order_wait_seconds"].sum() / group["epoch_seconds"].sum()),
            "bytes_per_step": median(list(group["bytes_to_server"] / steps / workers)),
            "bytes_per_pair": median(list(group["bytes_to_server"] / group["pairs"])),
            "steps": steps,
            "unit": group["unit"].iloc[0],
        }
    return out


def overhead_table(summaries: dict[str, dict[str, dict[str, float]]], variants: list[str]) -> str:
    header = [
        "task (unit)",
        "variant",
        "seeds × epochs",
        "epoch s",
        "step ms",
        "compute s",
        "all-reduce s",
        "order-wait s (share)",
        "bytes/step/worker",
        "bytes/pair",
        "÷ rr",
        "goal",
        "authors' code",
    ]
    rows = []
    for task, summary in summaries.items():
        if "rr" not in summary:
            continue
        rr = summary["rr"]["epoch_s"]
        for variant in variants:
            if variant not in summary:
                continue
            s = summary[variant]
            ratio = s["epoch_s"] / rr
            goal = GOALS.get(task)
            if variant == "rr":
                goal_cell, authors = "-", "-"
            else:
                goal_cell = (
                    f"≤ {goal:.2f}: {'met' if ratio <= goal else 'missed'}"
                    if goal
                    else "(no goal for this task)"
                )
                authors = AUTHORS[str(s["unit"])]
            rows.append(
                [
                    f"{task} ({s['unit']})",
                    variant,
                    f"{s['seeds']} × {s['epochs'] // max(1, s['seeds'])}",
                    f"{s['epoch_s']:.3f}",
                    f"{1e3 * s['epoch_s'] / s['steps']:.2f}",
                    f"{s['compute_s']:.3f}",
                    f"{s['allreduce_s']:.3f}",
                    f"{s['wait_s']:.3f} ({100 * s['wait_share']:.1f}%)",
                    fmt(s["bytes_per_step"]),
                    fmt(s["bytes_per_pair"]),
                    f"{ratio:.2f}",
                    goal_cell,
                    authors,
                ]
            )
    return markdown_table(header, rows)


def time_calls(function: Any, count: int) -> float:
    """Median seconds of ``count`` calls of ``function()`` after one warm-up call."""
    function()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return median(samples)


def step_anatomy(task_name: str, num_steps: int) -> dict[str, float]:
    """Seconds per worker step of the parts of a training step, in this process, one torch thread."""
    settings = TASK_SETTINGS[task_name]
    train = validate(
        {
            "task": {"name": task_name, "options": settings.get("options", {})},
            "train": {**settings["train"], "num_workers": 4},
        }
    ).train
    task = make_task(task_name, settings.get("options", {}))
    data = task.load(resolve_data_dir(None))
    if hasattr(task, "arrange"):
        data = task.arrange(data, train.num_workers, train.microbatch_size)
    model = build_model(task, 0)
    optimizer = make_optimizer(train, model)
    dim = num_parameters(model)
    k = train.microbatch_size
    inputs, targets = data.train_inputs[:k], data.train_targets[:k]
    example_units = train.unit == "example"
    parts: dict[str, float] = {"dim": float(dim)}
    parts["rr gradient"] = time_calls(
        lambda: microbatch_gradient(model, task.loss, inputs, targets), num_steps
    )
    if example_units:
        parts["cd-grab gradient"] = time_calls(
            lambda: per_example_gradients(model, task.loss, inputs, targets), num_steps
        )
        unit_grads = per_example_gradients(model, task.loss, inputs, targets)[0]
    else:
        parts["cd-grab gradient"] = parts["rr gradient"]
        unit_grads = microbatch_gradient(model, task.loss, inputs, targets)[0].unsqueeze(0)
    microbatch_gradient(model, task.loss, inputs, targets)
    parts["optimizer step"] = time_calls(optimizer.step, num_steps)
    units_per_step = len(unit_grads)
    for variant, sketch_dim, payload_dtype, transport in (
        ("exact", None, "float32", "shared_memory"),
        ("exact, ray calls", None, "float32", "ray"),
        ("sketch256 fp16", 256, "float16", "shared_memory"),
    ):
        # steady state, as in a trial's later epochs: the first 128 steps (more than a full ring of
        # 5 slots × 16 steps, whose first writes page-fault) are not timed
        steps, warm_up = 16 * max(2, num_steps // 16), 128
        spec = OrderingSpec(
            num_workers=1, shard_size=(warm_up + steps) * units_per_step, dim=sketch_dim or dim
        )
        server = RemoteOrderServer.remote("cd-grab", spec)
        sketch = CountSketch(dim, sketch_dim, 0) if sketch_dim else None
        channel = make_transport(
            transport,
            server,
            rank=0,
            message_kind="pair_differences",
            units_per_step=units_per_step,
            width=sketch_dim or dim,
            shard_size=spec.shard_size,
            ordering=OrderingConfig(message_steps=16, max_in_flight=4, payload_dtype=payload_dtype),
        )
        messenger = ServerMessenger(
            channel,
            message_kind="pair_differences",
            message_steps=16,
            sketch=sketch,
            payload_dtype=payload_dtype,
        )
        messenger.start(generation=0)  # a ring is created and attached here
        for _ in range(warm_up):
            messenger.add(unit_grads)
        started = time.perf_counter()
        for _ in range(steps):
            messenger.add(unit_grads)
        parts[f"messaging {variant}"] = (time.perf_counter() - started) / steps
        messenger.flush()
        ray.kill(server)
    return parts


def per_step(summary: dict[str, float] | None, key: str) -> str:
    """Milliseconds per step of a summed epoch quantity, or '-'."""
    return f"{1e3 * summary[key] / summary['steps']:.2f}" if summary else "-"


def anatomy_table(
    anatomy: dict[str, dict[str, float]], summaries: dict[str, dict[str, dict[str, float]]]
) -> str:
    header = [
        "task",
        "d",
        "rr gradient ms",
        "cd-grab gradient ms",
        "optimizer ms",
        "messaging ms/step exact",
        "messaging ms/step exact, ray calls",
        "messaging ms/step sketch256 fp16",
        "all-reduce ms/step (rr, cd-grab)",
        "order wait ms/step (cd-grab)",
        "sweep step ms (rr, cd-grab)",
    ]
    rows = []
    for task, parts in anatomy.items():
        summary = summaries.get(task, {})
        rr, cd = summary.get("rr"), summary.get("cd-grab")

        rows.append(
            [
                task if task in summaries else f"{task} (not swept)",
                f"{int(parts['dim']):,}",
                f"{1e3 * parts['rr gradient']:.2f}",
                f"{1e3 * parts['cd-grab gradient']:.2f}",
                f"{1e3 * parts['optimizer step']:.2f}",
                f"{1e3 * parts['messaging exact']:.2f}",
                f"{1e3 * parts['messaging exact, ray calls']:.2f}",
                f"{1e3 * parts['messaging sketch256 fp16']:.2f}",
                f"{per_step(rr, 'allreduce_s')}, {per_step(cd, 'allreduce_s')}",
                per_step(cd, "wait_s"),
                f"{per_step(rr, 'epoch_s')}, {per_step(cd, 'epoch_s')}",
            ]
        )
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks",
        default="auto",
        help="'auto' (mnist-logreg and wikitext2-lstm, or their MNIST-1D stand-ins), 'all', or names",
    )
    parser.add_argument(
        "--max-epoch-steps", type=int, default=2000, help="'auto' replaces longer tasks by their stand-ins"
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (epoch 0 is left out)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--anatomy-steps", type=int, default=48, help="steps timed per part of the step anatomy"
    )
    parser.add_argument("--storage", help="keep the results here (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="mnist1d-logreg, 1 seed, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.epochs, args.anatomy_steps = "mnist1d-logreg", 1, 3, 16
    args.variants = [v.strip() for v in args.variants.split(",")]
    os.environ.setdefault("ORDERLAB_DATA", str(resolve_data_dir(None)))
    torch.set_num_threads(1)

    print(f"# epoch_overhead: {machine_line()}", flush=True)
    tasks, notes = choose_tasks(args.tasks, args.workers, args.max_epoch_steps)
    print(f"tasks: {', '.join(tasks)}" + "".join(f"\n  - {note}" for note in notes), flush=True)
    started = time.perf_counter()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a fresh local Ray (never someone else's cluster), set up as orderlab.sweep would
    ray.init(
        address="local",
        num_cpus=2,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": RAY_ENV},
    )
    with tempfile.TemporaryDirectory(prefix="orderlab-bench-") as scratch:
        storage = args.storage or str(Path(scratch) / "results")
        summaries, sweep_seconds = {}, {}
        for task in tasks:
            print(f"\n## sweep {task}", flush=True)
            sweep_seconds[task] = run_task_sweep(task, args, storage)
            summaries[task] = summarize(epoch_rows(storage, task), task)
        # the tasks that were left out only for their length still get the step anatomy
        unswept = [
            t
            for t in STAND_INS
            if t not in tasks and t in TASKS and worker_can_run(t) is None and not args.quick
        ]
        anatomy = {task: step_anatomy(task, args.anatomy_steps) for task in tasks + unswept}

    print(
        f"\nEpoch seconds, {args.workers} workers, medians over seeds × epochs 1..{args.epochs - 1} "
        "(epoch 0 left out); ÷ rr: median epoch seconds over rr's, from the same sweep; "
        "sweep wall seconds: " + ", ".join(f"{t} {s:.0f}" for t, s in sweep_seconds.items())
    )
    print()
    print(overhead_table(summaries, args.variants))
    print(
        "\nStep anatomy (ms per worker step; gradient, optimizer and messaging measured in this process, one thread):\n"
    )
    print(anatomy_table(anatomy, summaries))
    print(f"\n(epoch_overhead took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
