"""The simulated backend without Ray: reproducible, resumable, and the update of data-parallel SGD.

Its equality with the Ray Train backend on the same configs is tests/ray/test_backends.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from orderlab import results
from orderlab.config import load_config
from orderlab.errors import OrderlabError
from orderlab.grads import num_parameters
from orderlab.loop import TrialPlan, build_model, plan_trial
from orderlab.orderings import ordering_class
from orderlab.seeding import ORDER, rng_for
from orderlab.simulated import run_simulated_trial
from orderlab.tasks import load_task_data, make_task

pytestmark = pytest.mark.datasets  # digits through configs/tiny.yaml
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def trial(overrides: dict) -> tuple:
    cfg = load_config(TINY, {"sweep": {}, "train.backend": "simulated", **overrides})
    task = make_task(cfg.task.name)
    data = load_task_data(task, cfg.task.data_dir)
    ordering = ordering_class(cfg.ordering.name)
    plan = plan_trial(
        cfg.train,
        len(data.train_targets),
        num_parameters(build_model(task, cfg.seed)),
        ordering.needs_gradients,
        ordering.message_kind,
    )
    return cfg, plan


def epochs(root: Path) -> pd.DataFrame:
    return results.epochs(str(root)).sort_values("epoch").reset_index(drop=True)


@pytest.mark.parametrize(
    "overrides",
    [
        {"ordering.name": "cd-grab", "train.num_workers": 4, "metrics.herding": True},
        {"ordering.name": "grab", "ordering.payload_dtype": "bfloat16", "ordering.sketch_dim": 32},
        {"ordering.name": "pair-balance", "train.unit": "microbatch", "train.num_workers": 4},
    ],
)
def test_two_runs_are_bit_identical(tmp_path, overrides):
    cfg, plan = trial({"train.epochs": 2, **overrides})
    for name in ("a", "b"):
        run_simulated_trial(cfg, plan, trial_id=name, results_root=str(tmp_path / name))
    first, second = epochs(tmp_path / "a"), epochs(tmp_path / "b")
    columns = ["train_loss", "val_loss", "val_metric", "herding", "order_digest"]
    assert first[columns].equals(second[columns])
    assert first["order_digest"].nunique() == 2  # the ordering moved the second epoch's orders


@pytest.mark.parametrize("num_workers", [2, 4])
def test_the_update_is_the_mean_of_the_workers_mean_gradients(tmp_path, num_workers):
    """An independent data-parallel SGD epoch: each worker's plain backward on its 4 examples of every
    step, the mean over workers, torch's SGD. Summing instead of averaging, or dropping a worker,
    fails this (the losses move far more than rtol 1e-5)."""
    cfg, plan = trial(
        {
            "ordering.name": "rr",
            "train.epochs": 1,
            "train.num_workers": num_workers,
            "train.batch_size": 4 * num_workers,
        }
    )
    run_simulated_trial(cfg, plan, trial_id="t", results_root=str(tmp_path))
    task = make_task(cfg.task.name)
    data = load_task_data(task, cfg.task.data_dir)
    model = build_model(task, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    n, k = plan.shard_size, plan.units_per_step
    orders = [torch.randperm(n, generator=rng_for(cfg.seed, w, 0, ORDER)) for w in range(num_workers)]
    for step in range(plan.steps_per_epoch):
        grads = []
        for w in range(num_workers):
            examples = w * n + orders[w][step * k : (step + 1) * k]
            model.zero_grad()
            task.loss(model(data.train_inputs[examples]), data.train_targets[examples]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *worker_grads in zip(model.parameters(), *grads, strict=True):
            p.grad = torch.stack(worker_grads).mean(dim=0)
        optimizer.step()
    with torch.no_grad():
        kept = num_workers * n
        expected = float(task.loss(model(data.train_inputs[:kept]), data.train_targets[:kept]))
    assert epochs(tmp_path)["train_loss"].iloc[0] == pytest.approx(expected, rel=1e-5)


def test_a_trial_resumed_from_its_checkpoint_continues_exactly(tmp_path):
    cfg, plan = trial({"ordering.name": "cd-grab", "train.epochs": 3})
    checkpoints: dict[int, dict] = {}

    def keep(row: dict, state: dict | None) -> None:
        checkpoints[row["epoch"]] = copy.deepcopy(state)  # its tensors are the live model's

    run_simulated_trial(cfg, plan, trial_id="t", results_root=str(tmp_path / "whole"), report=keep)
    assert sorted(checkpoints) == [0, 1, 2] and all(checkpoints.values())
    resumed = tmp_path / "resumed"
    run_simulated_trial(cfg, plan, trial_id="t", results_root=str(resumed), checkpoint=checkpoints[0])
    whole, after = epochs(tmp_path / "whole"), epochs(resumed)
    assert after["epoch"].tolist() == [1, 2]
    columns = ["train_loss", "val_metric", "order_digest"]
    assert after[columns].equals(whole.loc[1:, columns].reset_index(drop=True))


def test_the_backend_imports_and_runs_without_ray(tmp_path):
    """The simulated trial body and everything it uses import no Ray or DuckDB (the GPU machine has
    neither); the orderings, gradients, herding, samplers, wire formats and the in-process order server
    not pydantic or YAML either."""
    script = f"""
import sys
for name in ("ray", "duckdb", "pydantic", "yaml"):
    sys.modules[name] = None  # any import of it now fails
import orderlab.orderings, orderlab.grads, orderlab.herding, orderlab.sampler, orderlab.wire, orderlab.server
for name in ("pydantic", "yaml"):
    del sys.modules[name]
from orderlab.config import load_config
from orderlab.loop import TrialPlan
from orderlab.simulated import run_simulated_trial
plan = TrialPlan(**{TrialPlan(2, 1, 8, 16, 2, 0, 650, True, "pair_differences").__dict__!r})
overrides = {{"sweep": {{}}, "train.epochs": 1, "train.backend": "simulated", "task.train_examples": 32}}
cfg = load_config({str(TINY)!r}, {{**overrides, "ordering.name": "cd-grab"}})
print(run_simulated_trial(cfg, plan, trial_id="t", results_root={str(tmp_path)!r})["status"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("completed")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"ordering.transport": "ray"}, "ordering.transport"),
        ({"ordering.ring_directory": "/dev/shm"}, "ordering.ring_directory"),
        ({"ordering.message_steps": 4}, "ordering.message_steps"),
        ({"resources.gpus_per_worker": 1}, "resources.gpus_per_worker"),
        ({"faults.kill_order_server": {"epoch": 0}}, "faults.kill_order_server"),
    ],
)
def test_settings_of_the_order_server_or_gpus_are_config_errors(override, key):
    with pytest.raises(OrderlabError, match=rf"{key}=.*train.backend='simulated'"):
        load_config(TINY, {"train.backend": "simulated", **override})
    load_config(TINY, {"train.backend": "ray-train", **override})  # fine there


def test_a_simulated_trial_reserves_its_threads_by_default():
    simulated = load_config(TINY, {"train.backend": "simulated", "resources.num_threads": 2})
    assert (simulated.trial_cpus, simulated.worker_cpus) == (2.0, 0.0)
    ray_train = load_config(TINY, {"resources.cpus_per_worker": 0.5})
    assert (ray_train.trial_cpus, ray_train.worker_cpus) == (0.1, 1.0)
    assert load_config(TINY, {"train.backend": "simulated", "resources.trial_cpus": 0.5}).trial_cpus == 0.5


def test_microbatch_units_keep_one_gradient_per_worker(tmp_path):
    """With microbatch units the ordering sees W gradients per step, one per worker's microbatch."""
    cfg, plan = trial({"ordering.name": "grab", "train.unit": "microbatch", "train.epochs": 1})
    assert (plan.units_per_step, plan.unit_size) == (1, 8)
    run_simulated_trial(cfg, plan, trial_id="t", results_root=str(tmp_path))
    assert np.isfinite(epochs(tmp_path)["train_loss"]).all()


def test_train_device_is_for_the_simulated_backend_and_needs_a_gpu(tmp_path):
    with pytest.raises(OrderlabError, match=r"train.device='cuda'.*train.backend='simulated'"):
        load_config(TINY, {"train.device": "cuda"})  # ray-train
    if torch.cuda.is_available():
        return
    cfg, plan = trial({"ordering.name": "cd-grab", "train.device": "cuda"})
    assert cfg.trial_gpus == 1.0
    with pytest.raises(OrderlabError, match=r"train.device='cuda'.*torch.cuda.is_available\(\) is False"):
        run_simulated_trial(cfg, plan, trial_id="t", results_root=str(tmp_path))
    assert not (tmp_path / "epochs").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("name", ["cd-grab", "grab"])
def test_a_trial_on_the_gpu_trains_as_on_the_cpu(tmp_path, name):
    """The model, the unit gradients and the ordering's running sums on the GPU: the CPU's losses up
    to rounding (per-unit gradients differ in their last bits between the devices, which can flip a
    near-tie of the balancing and so move a few units; a wrong update moves the loss far more)."""
    rows = {}
    for device in ("cpu", "cuda"):
        cfg, plan = trial(
            {"ordering.name": name, "train.epochs": 2, "train.num_workers": 4, "train.device": device}
        )
        run_simulated_trial(cfg, plan, trial_id="t", results_root=str(tmp_path / device))
        rows[device] = epochs(tmp_path / device)
    np.testing.assert_allclose(rows["cuda"]["train_loss"], rows["cpu"]["train_loss"], rtol=1e-2)
