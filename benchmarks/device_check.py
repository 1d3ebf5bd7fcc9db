"""The GPU machine's check: balancing on CUDA against the CPU, and the simulated backend on the GPU.

One script, at most ~8 minutes on one H200 with 16 cores (``--budget`` seconds: a section that
would not fit is skipped with the reason), writing ``device_check.md`` (markdown tables) and
``device_check.json`` (the raw numbers) under ``--out``:

1. correctness: the tests marked ``cuda`` (pytest ``-m cuda``); the orders of every gradient
   ordering balancing on the GPU against the CPU kernel's on the same vectors (W = 4, d = 1e4 ...
   1e6, float32 and bfloat16 payloads; tests/unit/test_torch_balance.py's comparison at larger d)
   and the largest running-sum difference;
2. balancing throughput in pairs/s: the torch kernel on the GPU (payloads resident there, and
   copied from host memory per call), the CPU kernel (``fused_balance``) on 1 thread and on every
   core, and the plain numpy loop; d = 1e4, 1e5, 1e6, 1e7;
3. the simulated backend's Fashion-MNIST LeNet worker-scaling trial
   (configs/paper/cdgrab-lenet-fashion-mnist-scaling.yaml, cd-grab at W = B = 64) with
   ``train.device`` cuda against cpu: epoch seconds, train losses, order digests;
4. the in-process order server's capacity (``OrderServer``, no Ray) with 1, 4 and every core's
   balancing threads, d = 1e5 and 1e6.

Without a GPU the CUDA parts are skipped with the reason and the rest runs on the CPU (the torch
kernel then runs on the CPU), which is how tests/unit/test_device_check.py runs ``--quick``.

Needs torch, numba, numpy, pandas, pyarrow, pytest, and orderlab with pydantic and PyYAML (no Ray,
DuckDB or network). ``--prepare DIR`` fills DIR (an ignored folder inside the checkout, which
travels with it) with the data files and the wheels that machine lacks; benchmarks/run_on_device.sh
runs this script there with nothing installed (docs/performance.md, "GPU").

    python benchmarks/device_check.py --out results/device-check [--quick]
    python benchmarks/device_check.py --prepare .device-data       # here, before the GPU machine
    ORDERLAB_COMMIT=abc1234 bash benchmarks/run_on_device.sh $OUT  # there
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import fmt, git_state, machine_line, markdown_table, plain_balance

from orderlab.orderings._balance import SignRule
from orderlab.orderings._torch_balance import balance_step

ROOT = Path(__file__).resolve().parents[1]
SCALING_CONFIG = ROOT / "configs" / "paper" / "cdgrab-lenet-fashion-mnist-scaling.yaml"
#: what the GPU machine lacks and the check needs, as cp312 manylinux wheels (``--prepare``)
WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "typing-extensions==4.16.0", "pyyaml==6.0.4"]  # fmt: skip
#: the tasks whose data files travel: the LeNet trial's, and configs/tiny.yaml's for the cuda tests
TASKS = ["fashion-mnist-cnn", "digits-logreg"]
GRADIENT_ORDERINGS = ["grab", "pair-balance", "cd-grab"]


class Check:
    """The results of the sections so far, and the time left (``budget`` seconds from the start)."""

    def __init__(self, out: Path, budget: float, quick: bool) -> None:
        self.out, self.quick, self.deadline = out, quick, time.monotonic() + budget
        self.gpu = torch.device("cuda") if torch.cuda.is_available() else None
        self.no_gpu = "no CUDA GPU here (torch.cuda.is_available() is False)"
        # a copy of the checkout without .git cannot say its commit: ORDERLAB_COMMIT does
        commit = os.environ.get("ORDERLAB_COMMIT") or git_state()
        self.report: dict[str, Any] = {
            "machine": machine_line(),
            "gpu": gpu_line(),
            "commit": commit,
            "quick": quick,
            "sections": {},
        }
        header = f"Machine: {self.report['machine']}; GPU: {self.report['gpu']}; commit {commit}."
        self.markdown = [f"# Device check\n\n{header}\n"]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(
        self, name: str, title: str, needs_seconds: float, body: Callable[[], tuple[str, Any]]
    ) -> None:
        """Run ``body`` (returns its markdown and raw results) unless fewer than ``needs_seconds``
        are left; a failure is recorded with its traceback and the next section runs."""
        started = time.monotonic()
        if self.left() < needs_seconds:
            entry: dict[str, Any] = {
                "status": f"skipped: {self.left():.0f} s left, it needs ~{needs_seconds:.0f} s"
            }
            text = entry["status"]
        else:
            try:
                text, raw = body()
                entry = {"status": "ok", "results": raw}
            except Exception as exc:  # a section's failure is a result; the others still run
                entry = {
                    "status": f"failed: {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
                text = f"FAILED: {type(exc).__name__}: {exc}"
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.report["sections"][name] = entry
        self.markdown.append(f"## {title}\n\n{text}\n")
        print(f"{name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=2, default=str))
        (self.out / "device_check.md").write_text("\n".join(self.markdown))


def gpu_line() -> str:
    if not torch.cuda.is_available():
        return "none"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# 1. correctness -------------------------------------------------------------------------------


def cuda_tests(check: Check) -> tuple[str, Any]:
    """The tests marked ``cuda``, by pytest in a subprocess; counts from its JUnit XML."""
    if check.gpu is None:
        return f"skipped: {check.no_gpu}", {"skipped": check.no_gpu}
    junit = check.out / "cuda-tests.xml"
    tests = ["tests/unit/test_torch_balance.py", "tests/unit/test_simulated.py"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    done = subprocess.run(
        [*command, *tests], cwd=ROOT, capture_output=True, text=True, timeout=max(check.left(), 1)
    )
    (check.out / "cuda-tests.log").write_text(done.stdout + done.stderr)
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["exit_code"] = done.returncode
    table = markdown_table(["tests", "passed", "failed", "errors", "skipped"], [
        [counts["tests"], counts["passed"], counts["failures"], counts["errors"], counts["skipped"]]
    ])  # fmt: skip
    return f"`pytest -m cuda {' '.join(tests)}` (log: cuda-tests.log)\n\n{table}", counts


def equal_orders(check: Check) -> tuple[str, Any]:
    """tests/unit/test_torch_balance.py's comparison at larger d: each gradient ordering's orders over
    4 epochs balancing on the GPU (on the CPU with the torch kernel where there is none) against the
    CPU kernel, W = 4, n = 11 (5 pairs and a middle unit)."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_torch_balance import balance_epochs, items_of_epochs

    device = check.gpu or torch.device("cpu")
    dims = [10_000] if check.quick else [10_000, 100_000, 1_000_000]
    rows, raw = [], []
    for dim in dims:
        for payload in (torch.float32, torch.bfloat16):
            for name in GRADIENT_ORDERINGS:
                items = items_of_epochs(name, dim, payload, epochs=4, seed=dim)
                expected, cpu = balance_epochs(name, dim, items, None)
                got, torch_path = balance_epochs(name, dim, items, str(device))
                equal = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
                difference = float((torch_path.state.running_sum.cpu() - cpu.state.running_sum).abs().max())
                decisions = sum(call.shape[0] * call.shape[1] for calls in items for call in calls)
                raw.append({"ordering": name, "dim": dim, "payload": str(payload), "device": str(device),
                            "equal_orders": equal, "decisions": decisions, "max_sum_difference": difference})  # fmt: skip
                rows.append([name, f"{dim:.0e}", str(payload).removeprefix("torch."), decisions,
                             "yes" if equal else "**NO**", fmt(difference)])  # fmt: skip
    header = ["ordering", "d", "payload", "decisions", "orders equal", "max abs. running-sum difference"]
    where = "the GPU" if check.gpu is not None else f"the CPU with the torch kernel ({check.no_gpu})"
    return (
        f"Balancing on {where} against the CPU kernel, W = 4, 4 epochs.\n\n{markdown_table(header, rows)}",
        raw,
    )


# 2. throughput --------------------------------------------------------------------------------


def pool_of(dim: int, quick: bool) -> np.ndarray:
    """Unit-norm float32 pair differences [count, dim], about 256 MiB (64 MiB quick), 8 at least."""
    count = max(8, min(256, (64 if quick else 256) * 2**20 // (4 * dim)))
    pool = np.random.default_rng(dim).standard_normal((count, dim), dtype=np.float32)
    return pool / np.linalg.norm(pool, axis=1, keepdims=True)


def pairs_per_second(run: Callable[[], None], pairs: int, min_seconds: float) -> float:
    """Pairs/s of ``run`` (which balances ``pairs`` pairs), after one warm-up call, over repeats
    until ``min_seconds`` have passed."""
    run()
    repeats, started = 0, time.perf_counter()
    while True:
        run()
        repeats += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return repeats * pairs / elapsed


def torch_runner(pool: np.ndarray, device: torch.device, from_host: bool) -> Callable[[], None]:
    """One cd-grab pass of the torch kernel over the pool on ``device`` (signs on the host at the end,
    as ``observe_items`` gives them); ``from_host``: the pool is copied from host memory first."""
    sign = SignRule(balance="deterministic", balance_c=30.0, seed=0, num_sums=1)
    resident = torch.from_numpy(pool).to(device)
    host = (
        torch.from_numpy(pool).pin_memory() if from_host and device.type == "cuda" else torch.from_numpy(pool)
    )
    running_sum = torch.zeros(1, pool.shape[1], device=device)
    signs = torch.empty(len(pool), device=device)

    def run() -> None:
        vectors = host.to(device, non_blocking=True) if from_host else resident
        for j in range(len(pool)):
            balance_step(running_sum, vectors[j].unsqueeze(0), sign, (0,), signs[j : j + 1])
        (signs > 0).cpu()

    return run


def throughput(check: Check) -> tuple[str, Any]:
    dims = [10_000, 100_000] if check.quick else [10_000, 100_000, 1_000_000, 10_000_000]
    min_seconds = 0.05 if check.quick else 0.3
    cores = os.cpu_count() or 1
    kinds: list[tuple[str, Callable[[np.ndarray], Callable[[], None]]]] = [
        ("numpy loop", lambda pool: lambda: plain_balance(np.zeros(pool.shape[1], np.float32), [pool])),
        ("CPU kernel, 1 thread", lambda pool: cpu_runner(pool, 1)),
        (f"CPU kernel, {cores} threads", lambda pool: cpu_runner(pool, cores)),
    ]
    gpu = check.gpu
    if gpu is not None:
        kinds.append(("GPU", lambda pool: torch_runner(pool, gpu, from_host=False)))
        kinds.append(("GPU, payload from host", lambda pool: torch_runner(pool, gpu, from_host=True)))
    else:
        kinds.append(("torch kernel on CPU", lambda pool: torch_runner(pool, torch.device("cpu"), False)))
    raw: dict[str, dict[int, float]] = {kind: {} for kind, _ in kinds}
    for dim in dims:
        pool = pool_of(dim, check.quick)
        for kind, make in kinds:
            raw[kind][dim] = pairs_per_second(make(pool), len(pool), min_seconds)
    header = ["pairs/s", *[f"d = {dim:.0e}" for dim in dims]]
    rows = [[kind, *[fmt(raw[kind][dim]) for dim in dims]] for kind, _ in kinds]
    note = "" if gpu is not None else f"\n\nNo GPU columns: {check.no_gpu}."
    text = ("cd-grab's sequence (one running sum) over a pool of unit-norm float32 pair differences; "
            f"pairs/s over repeated passes.\n\n{markdown_table(header, rows)}{note}")  # fmt: skip
    return text, raw


def cpu_runner(pool: np.ndarray, threads: int) -> Callable[[], None]:
    """One pass of the CPU kernel (``SignRule.balance_rows``) over the pool on ``threads`` threads."""
    sign = SignRule(balance="deterministic", balance_c=30.0, seed=0, num_sums=1, threads=threads)
    arrays = [pool]

    def run() -> None:
        sign.balance_rows(np.zeros(pool.shape[1], np.float32), arrays, 0)

    return run


# 3. the simulated backend's LeNet trial ------------------------------------------------------


def lenet_trial(check: Check) -> tuple[str, Any]:
    from orderlab.config import load_config
    from orderlab.grads import num_parameters
    from orderlab.loop import build_model, plan_trial
    from orderlab.orderings import ordering_class
    from orderlab.simulated import run_simulated_trial
    from orderlab.tasks import load_task_data, make_task

    examples, epochs = (320, 1) if check.quick else (6400, 2)
    devices = ["cpu", "cuda"] if check.gpu is not None else ["cpu"]
    raw: dict[str, Any] = {"train_examples": examples, "epochs": epochs, "num_workers": 64}
    for device in devices:
        overrides = {
            "sweep": {}, "train.num_workers": 64, "train.batch_size": 64, "train.epochs": epochs,
            "train.device": device, "ordering.name": "cd-grab", "task.train_examples": examples,
            "resources.num_threads": os.cpu_count() or 1, "metrics.herding": not check.quick,
        }  # fmt: skip
        cfg = load_config(SCALING_CONFIG, overrides)
        task = make_task(cfg.task.name, cfg.task.options)
        data = load_task_data(task, cfg.task.data_dir, train_examples=cfg.task.train_examples)
        ordering = ordering_class(cfg.ordering.name)
        dim = num_parameters(build_model(task, cfg.seed))
        plan = plan_trial(
            cfg.train, len(data.train_targets), dim, ordering.needs_gradients, ordering.message_kind
        )
        root = check.out / "lenet" / device
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        status = run_simulated_trial(cfg, plan, trial_id=device, results_root=str(root))["status"]
        raw[device] = {"status": status, "wall_seconds": time.perf_counter() - started, **epoch_rows(root)}
    rows = []
    for epoch in range(epochs):
        row = [epoch]
        for device in devices:
            row += [fmt(raw[device]["epoch_seconds"][epoch]), f"{raw[device]['train_loss'][epoch]:.6f}"]
        if len(devices) == 2:
            cpu_loss, gpu_loss = raw["cpu"]["train_loss"][epoch], raw["cuda"]["train_loss"][epoch]
            same = raw["cpu"]["order_digest"][epoch] == raw["cuda"]["order_digest"][epoch]
            row += [fmt(abs(gpu_loss - cpu_loss) / abs(cpu_loss)), "yes" if same else "no"]
        rows.append(row)
    header = ["epoch"]
    for device in devices:
        header += [f"{device} epoch s", f"{device} train loss"]
    if len(devices) == 2:
        header += ["loss rel. diff", "same orders"]
        raw["max_loss_rel_diff"] = max(
            abs(g - c) / abs(c)
            for g, c in zip(raw["cuda"]["train_loss"], raw["cpu"]["train_loss"], strict=True)
        )
    note = "" if len(devices) == 2 else f"\n\nNo cuda run: {check.no_gpu}."
    text = (f"{SCALING_CONFIG.relative_to(ROOT)} with cd-grab, W = B = 64, task.train_examples={examples}, "
            f"{epochs} epoch(s), metrics.herding {not check.quick}, resources.num_threads = {os.cpu_count()}.\n\n{markdown_table(header, rows)}{note}")  # fmt: skip
    return text, raw


def epoch_rows(root: Path) -> dict[str, list]:
    """The trial's epoch rows (read with pyarrow: the GPU machine has no DuckDB), by column."""
    import pandas as pd

    files = sorted((root / "epochs").rglob("*.parquet"))
    rows = pd.concat([pd.read_parquet(file) for file in files]).sort_values("epoch")
    return {column: rows[column].tolist() for column in ("epoch_seconds", "train_loss", "order_digest")}


# 4. the in-process order server ---------------------------------------------------------------


def server_capacity(check: Check) -> tuple[str, Any]:
    """``OrderServer`` (cd-grab, W = 16) fed an epoch of messages of 8 pairs, then asked every
    rank's next order: pairs/s, float32 payloads, for 1, 4 and every core's balancing threads."""
    from orderlab.orderings import OrderingSpec

    dims = [10_000] if check.quick else [100_000, 1_000_000]
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, min(4, cores), cores})
    num_workers, per_message = 16, 8
    raw: dict[int, dict[int, float]] = {}
    for dim in dims:
        pool = pool_of(dim, check.quick)
        pairs_per_worker = max(1, len(pool) // per_message // num_workers) * per_message
        spec = OrderingSpec(num_workers=num_workers, shard_size=2 * pairs_per_worker, dim=dim)
        raw[dim] = {
            threads: served_pairs_per_second(spec, pool, threads, per_message) for threads in thread_counts
        }
    header = ["pairs/s", *[f"{threads} thread(s)" for threads in thread_counts]]
    rows = [[f"d = {dim:.0e}", *[fmt(raw[dim][t]) for t in thread_counts]] for dim in dims]
    text = (f"OrderServer in process (no Ray), cd-grab, W = {num_workers}, messages of {per_message} float32 "
            f"pairs, one epoch after a warm-up epoch.\n\n{markdown_table(header, rows)}")  # fmt: skip
    return text, raw


def served_pairs_per_second(spec: Any, pool: np.ndarray, threads: int, per_message: int) -> float:
    """Pairs/s of an ``OrderServer`` balancing on ``threads`` threads, from the first message of an
    epoch to every rank's next order; message (m, rank) holds pool rows from slot (m·W + rank)."""
    import asyncio

    from orderlab.order_queue import OrderMessage
    from orderlab.server import OrderServer

    server = OrderServer("cd-grab", dataclasses.replace(spec, threads=threads))
    num_workers, pairs_per_worker = spec.num_workers, spec.shard_size // 2
    slots = len(pool) - per_message + 1

    async def epoch(number: int) -> None:
        for start in range(0, pairs_per_worker, per_message):
            batch = []
            for rank in range(num_workers):
                slot = ((start // per_message * num_workers + rank) * per_message) % slots
                batch.append(OrderMessage(number, start, rank, pool[slot : slot + per_message]))
            await server.push(batch)
        for rank in range(num_workers):
            await server.begin_epoch(number + 1, rank)

    async def drive() -> float:
        await server.begin_epoch(0, 0)
        await epoch(0)  # warm-up: compiles or loads the kernel
        started = time.perf_counter()
        await epoch(1)
        return time.perf_counter() - started

    return num_workers * pairs_per_worker / asyncio.run(drive())


# --prepare ------------------------------------------------------------------------------------


def prepare(folder: Path) -> None:
    """Copy the tasks' data files (from ORDERLAB_DATA) to ``folder``/data and download the wheels the
    GPU machine lacks (cp312, manylinux x86_64) to ``folder``/wheels."""
    from orderlab.tasks import make_task, resolve_data_dir

    source = Path(resolve_data_dir(None))
    for name in TASKS:
        for relative in make_task(name).data_files:
            target = folder / "data" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, target)
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platform = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", *platform, "--dest", str(wheels), *WHEELS],
        check=True,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for device_check.md, device_check.json and logs")
    parser.add_argument("--quick", action="store_true", help="small sizes: the CPU test's run (~30 s)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections (default 450)")
    parser.add_argument("--prepare", type=Path, help="fill this folder for the GPU machine, then exit")
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare)
        return
    if args.out is None:
        parser.error("--out is required")
    check = Check(args.out, args.budget, args.quick)
    quick = args.quick
    check.section(
        "cuda_tests", "Tests marked cuda", 5 if check.gpu is None else 60, lambda: cuda_tests(check)
    )
    check.section("equal_orders", "Orders: GPU against CPU", 5 if quick else 30, lambda: equal_orders(check))
    check.section("throughput", "Balancing throughput", 10 if quick else 90, lambda: throughput(check))
    check.section(
        "lenet_trial", "LeNet worker-scaling trial, W = 64", 10 if quick else 120, lambda: lenet_trial(check)
    )
    check.section(
        "server_capacity", "In-process order server", 5 if quick else 40, lambda: server_capacity(check)
    )
    print(f"wrote {args.out / 'device_check.md'} and device_check.json")


if __name__ == "__main__":
    main()
