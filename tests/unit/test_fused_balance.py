"""The fused sign rule (two vectors per pass over r) and per-worker item arrays (the order server's
no-copy input path)."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch

from orderlab.errors import OrderlabError
from orderlab.orderings import make_ordering
from orderlab.orderings._balance import (
    PARALLEL_MIN_DIM,
    SignRule,
    _sweep_in_parallel,
    fused_balance,
    rank_arrays,
)
from orderlab.orderings.spec import OrderingSpec


def plain_rule(running_sum: np.ndarray, vectors: list[np.ndarray]) -> list[bool]:
    """The spec's rule one vector at a time; the sign from a float64 inner product."""
    signs = []
    for vector in vectors:
        positive = float(running_sum.astype(np.float64) @ vector.astype(np.float64)) < 0.0
        running_sum += vector if positive else -vector
        signs.append(positive)
    return signs


@pytest.mark.parametrize(
    ("num_arrays", "num_rows", "dim"),
    [
        (1, 1, 3),
        (2, 1, 10),
        (3, 1, 10),
        (1, 7, 50),
        (4, 5, 1000),
        (3, 2, 100_003),
    ],  # 1, 2, 3, 7, 20, 6 vectors
)
def test_fused_balance_equals_the_plain_rule(num_arrays: int, num_rows: int, dim: int) -> None:
    rng = np.random.default_rng(dim)
    arrays = tuple(rng.standard_normal((num_rows, dim), dtype=np.float32) for _ in range(num_arrays))
    start = rng.standard_normal(dim, dtype=np.float32)
    fused_sum, plain_sum = start.copy(), start.copy()
    positive = fused_balance(fused_sum, arrays)
    # the sequence is row-major over the arrays: arrays[0][0], arrays[1][0], ..., arrays[0][1], ...
    expected = plain_rule(plain_sum, [arrays[a][j] for j in range(num_rows) for a in range(num_arrays)])
    assert positive.shape == (num_rows, num_arrays)
    assert positive.ravel().tolist() == expected
    np.testing.assert_array_equal(fused_sum, plain_sum)  # float32 r ± v, bit for bit


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fused_balance_on_threads_gives_the_signs_and_sums_of_one_thread(dtype: type) -> None:
    """r sharded over 2 threads by coordinates: the chunks' sums are added in chunk order, so the
    signs cannot depend on the thread count; r is bit for bit the same too."""
    dim = PARALLEL_MIN_DIM + 12_345  # the last chunk is partial
    rng = np.random.default_rng(3)
    arrays = tuple(rng.standard_normal((5, dim), dtype=np.float32).astype(dtype) for _ in range(3))
    arrays = tuple(rank_arrays(list(arrays), 3, dim, "pair_differences"))
    serial_sum, threaded_sum = np.zeros(dim, np.float32), np.zeros(dim, np.float32)
    serial = fused_balance(serial_sum, arrays)
    rule = SignRule(balance="deterministic", balance_c=1.0, seed=0, num_sums=1, threads=2)
    threaded = rule.balance_rows(threaded_sum, list(arrays), 0)
    assert _sweep_in_parallel.signatures  # the threaded kernel made its passes with the parallel sweep
    np.testing.assert_array_equal(threaded, serial)
    np.testing.assert_array_equal(threaded_sum, serial_sum)
    plain_sum = np.zeros(dim, np.float32)
    widened = [a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a for a in arrays]
    assert serial.ravel().tolist() == plain_rule(
        plain_sum, [widened[a][j] for j in range(5) for a in range(3)]
    )
    np.testing.assert_array_equal(serial_sum, plain_sum)


def test_balancing_threads_must_be_positive_and_are_capped_at_numbas_threads() -> None:
    with pytest.raises(OrderlabError, match="server_threads=0"):
        OrderingSpec(num_workers=1, shard_size=2, dim=3, threads=0)
    rule = SignRule(balance="deterministic", balance_c=1.0, seed=0, num_sums=1, threads=10_000)
    assert rule.threads == numba.config.NUMBA_NUM_THREADS


def test_fused_balance_widens_every_half_and_bfloat16_value_exactly() -> None:
    bits = np.arange(2**16, dtype=np.uint16).reshape(1, -1)
    expected = {
        "float16": bits.view(np.float16).astype(np.float32)[0],
        "bfloat16": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()[0],
    }
    for name, rows in [("float16", bits), ("bfloat16", bits.view(np.int16))]:
        running_sum = np.zeros(2**16, dtype=np.float32)
        fused_balance(running_sum, (rows,))  # <0, v> = 0 gives ε = -1: r = -v
        finite = ~np.isnan(expected[name])
        np.testing.assert_array_equal(-running_sum[finite], expected[name][finite], err_msg=name)
        assert np.isnan(running_sum[~finite]).all()


@pytest.mark.parametrize("payload_dtype", [torch.float16, torch.bfloat16])
def test_fused_balance_on_half_rows_equals_the_rule_on_their_float32_values(
    payload_dtype: torch.dtype,
) -> None:
    generator = torch.Generator().manual_seed(7)
    items = torch.randn(3, 6, 5000, generator=generator).to(payload_dtype)
    arrays = rank_arrays(items, 3, 5000, "pair_differences")
    running_sum, plain_sum = np.zeros(5000, np.float32), np.zeros(5000, np.float32)
    positive = fused_balance(running_sum, tuple(arrays))
    values = items.float().numpy()
    assert positive.ravel().tolist() == plain_rule(
        plain_sum, [values[a, j] for j in range(6) for a in range(3)]
    )
    np.testing.assert_array_equal(running_sum, plain_sum)


def test_fused_balance_tie_gives_minus_one_and_empty_input_is_a_no_op() -> None:
    running_sum = np.zeros(4, dtype=np.float32)
    vector = np.array([[1.0, -2.0, 0.5, 0.0]], dtype=np.float32)
    assert fused_balance(running_sum, (vector,)).tolist() == [[False]]  # <0, v> = 0: ε = -1
    np.testing.assert_array_equal(running_sum, -vector[0])
    assert fused_balance(running_sum, (np.empty((0, 4), np.float32),)).shape == (0, 1)
    np.testing.assert_array_equal(running_sum, -vector[0])


def test_probabilistic_rows_draw_as_one_vector_at_a_time() -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((6, 20), dtype=np.float32) for _ in range(2)]
    rows, single = (SignRule(balance="probabilistic", balance_c=2.0, seed=5, num_sums=1) for _ in range(2))
    rows.begin_epoch(1)
    single.begin_epoch(1)
    sum_rows, sum_single = np.zeros(20, np.float32), np.zeros(20, np.float32)
    positive = rows.balance_rows(sum_rows, arrays, 0)
    expected = [single.balance(sum_single, arrays[a][j], 0) for j in range(6) for a in range(2)]
    assert positive.ravel().tolist() == expected
    np.testing.assert_array_equal(sum_rows, sum_single)


@pytest.mark.parametrize("name", ["pair-balance", "cd-grab", "grab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_worker_arrays_give_the_orders_of_a_stacked_tensor(name: str, dtype: torch.dtype) -> None:
    num_workers, shard_size, dim = 3, 10, 16
    made = [
        make_ordering(name, num_workers=num_workers, shard_size=shard_size, dim=dim, seed=2) for _ in range(2)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for ordering in made:
            ordering.begin_epoch()
        items = torch.randn(num_workers, made[0].items_per_epoch, dim, generator=generator).to(dtype)
        for start in range(0, made[0].items_per_epoch, 2):  # in messages of up to 2 items
            chunk = items[:, start : start + 2]
            made[0].observe_items(chunk)
            made[1].observe_items([chunk[w].numpy() for w in range(num_workers)])
    assert torch.equal(made[0].begin_epoch(), made[1].begin_epoch())


def test_rank_arrays_uses_float32_in_place_and_rejects_bad_shapes() -> None:
    stacked = torch.randn(2, 3, 5)
    arrays = rank_arrays(stacked, 2, 5, "pair_differences")
    assert all(np.shares_memory(a, stacked.numpy()) for a in arrays)  # no copy
    halves = rank_arrays([np.ones((3, 5), np.float16)] * 2, 2, 5, "pair_differences")
    assert all(a.dtype == np.uint16 and a.flags.c_contiguous for a in halves)  # float16 bits, not widened
    assert rank_arrays(torch.ones(2, 3, 5, dtype=torch.bfloat16), 2, 5, "x")[0].dtype == np.int16
    widened = rank_arrays([np.ones((3, 5), np.float16)] * 2, 2, 5, "pair_differences", float32=True)
    assert all(a.dtype == np.float32 and (a == 1).all() for a in widened)
    with pytest.raises(ValueError, match=r"num_workers=2.*got 3 items"):
        rank_arrays([np.ones((3, 5), np.float32)] * 3, 2, 5, "pair_differences")
    with pytest.raises(ValueError, match=r"num_workers=2.*got \(2, 15\)"):
        rank_arrays(torch.ones(2, 15), 2, 5, "pair_differences")
    with pytest.raises(ValueError, match="one k for all"):
        rank_arrays([np.ones((3, 5), np.float32), np.ones((2, 5), np.float32)], 2, 5, "pair_differences")
    with pytest.raises(ValueError, match="dim=5"):
        rank_arrays([np.ones((3, 4), np.float32)] * 2, 2, 5, "pair_differences")


def test_read_only_and_writable_arrays_mix() -> None:
    """Ray hands the server read-only arrays; a split message is concatenated into a writable one."""
    ordering = make_ordering("cd-grab", num_workers=2, shard_size=4, dim=3, seed=0)
    ordering.begin_epoch()
    from_store = np.ones((2, 3), np.float32)
    from_store.flags.writeable = False
    ordering.observe_items([from_store, np.full((2, 3), 2.0, np.float32)])
    assert ordering.begin_epoch().shape == (2, 4)


def test_a_second_process_loads_the_kernel_from_numbas_disk_cache(tmp_path) -> None:
    """The kernel compiles once per argument types and machine: later processes (every order server
    of a sweep) load it, so the cache gets one file per type instead of one per process."""
    script = (
        "import numpy as np\n"
        "from orderlab.orderings._balance import SignRule\n"
        "rule = SignRule(balance='deterministic', balance_c=1.0, seed=0, num_sums=1)\n"
        "print(rule.balance_rows(np.zeros(8, np.float32), [np.ones((3, 8), np.float32)] * 2, 0).sum())\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "3"  # six equal vectors: ε = -1 (the tie at r = 0), +1, -1, ...: 3 of 6
    assert len(list(tmp_path.rglob("*fused_balance*.nbc"))) == 1
