"""orderlab.search without a Ray cluster: YAML spaces as Tune's, search and scheduler configs and
their errors, and GridPointSearch's per-grid-point searches."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, HyperBandScheduler, MedianStoppingRule
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.hyperopt import HyperOptSearch
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer

from orderlab.cli import main
from orderlab.config import SchedulerConfig, SearchConfig, load_config, validate, validate_grid
from orderlab.errors import OrderlabError
from orderlab.search import (
    TIME_ATTR,
    GridPointSearch,
    make_scheduler,
    make_searcher,
    search_plan,
    tune_space,
)

BASE = {"task": {"name": "digits-logreg"}}
GRID = [{"ordering.name": "rr"}, {"ordering.name": "cd-grab"}]


def test_yaml_spaces_map_to_tune_spaces() -> None:
    log = tune_space({"loguniform": [1.0e-3, 1.0]})
    assert isinstance(log, Float) and (log.lower, log.upper) == (1.0e-3, 1.0)
    assert isinstance(log.get_sampler(), Float._LogUniform)
    flat = tune_space({"uniform": [0.0, 0.9]})
    assert isinstance(flat, Float) and isinstance(flat.get_sampler(), Float._Uniform)
    ints = tune_space({"randint": [1, 5]})
    assert isinstance(ints, Integer) and (ints.lower, ints.upper) == (1, 5)
    choice = tune_space({"choice": ["rr", "grab"]})
    assert isinstance(choice, Categorical) and choice.categories == ["rr", "grab"]
    assert tune_space([1, 2]) == {"grid_search": [1, 2]} == tune_space({"grid": [1, 2]})


def test_grid_axes_are_crossed_and_spaces_are_checked_at_their_ends() -> None:
    cfg = validate(
        {**BASE, "sweep": {"ordering.name": ["rr", "grab"], "train.lr": {"loguniform": [1e-3, 1.0]}}}
    )
    assert cfg.sweep.grid_axes == {"ordering.name": ["rr", "grab"]}
    assert cfg.sweep.space_axes == {"train.lr": {"loguniform": [1e-3, 1.0]}}
    assert [p.ordering.name for p in validate_grid(cfg)] == ["rr", "grab"]
    bad = validate({**BASE, "sweep": {"train.momentum": {"uniform": [0.5, 1.5]}}})
    with pytest.raises(OrderlabError, match=r"sweep\[train.momentum=1.5\]: train.momentum=1.5: must be < 1"):
        validate_grid(bad)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "sweep.train.lr={loguniform: [0, 1]}",
            "sweep.train.lr={'loguniform': [0, 1]}: loguniform needs 0 < low",
        ),
        (
            "sweep.train.lr={logunifrm: [1, 2]}",
            "sweep.train.lr={'logunifrm': [1, 2]}: must be a list of values",
        ),
        ("sweep.seed={randint: [3, 3]}", "sweep.seed={'randint': [3, 3]}: randint needs low < high"),
        (
            "sweep.search.algorithm=optima",
            "sweep.search.algorithm='optima': must be one of: random, optuna, hyperopt",
        ),
        ("sweep.search.num_samples=0", "sweep.search.num_samples=0: must be >= 1"),
        (
            "sweep.search.metric=loss",
            "sweep.search.metric='loss': must be one of: train_loss, val_loss, val_metric",
        ),
        ("sweep.search.seeed=1", "sweep.search.seeed: unknown key 'seeed' (did you mean 'seed'?)"),
        ("sweep.scheduler.name=asah", "sweep.scheduler.name='asah': must be one of: fifo, asha"),
        ("sweep.scheduler.reduction_factor=1", "sweep.scheduler.reduction_factor=1: must be > 1"),
        ("tracking=[mlflow, neptune]", "tracking.1='neptune'"),
    ],
)
def test_bad_search_config_exits_2_naming_the_key(tmp_path: Path, capsys, override: str, needle: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("task: {name: digits-logreg}\n")
    assert main(["sweep", str(config), "--set", f"storage={tmp_path / 'out'}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orderlab: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_optuna_choice_over_sections_is_refused_before_any_trial(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "task: {name: digits-logreg}\n"
        "sweep: {train: {choice: [{lr: 0.1}, {lr: 0.2}]}, search: {algorithm: optuna, num_samples: 2}}\n"
    )
    assert main(["sweep", str(config), "--set", f"storage={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "sweep.train=" in err and "optuna chooses among plain values only" in err and "Traceback" not in err
    )
    assert not (tmp_path / "out").exists()
    # the same choice with Tune's random search, or optuna's choice among numbers, is a valid sweep
    load_config(config, ["sweep.search.algorithm=random"])
    load_config(config, ["sweep={train.lr: {choice: [0.1, 0.2]}, search: {algorithm: optuna}}"])


def test_scheduler_grace_period_must_leave_epochs_to_stop(tmp_path: Path, capsys, data_dir: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "task: {name: digits-logreg}\ntrain: {epochs: 3}\nsweep: {scheduler: {name: asha, grace_period: 3}}\n"
    )
    assert main(["sweep", str(config), "--set", f"storage={tmp_path / 'out'}"]) == 2
    assert "sweep.scheduler.grace_period=3 must be < train.epochs=3" in capsys.readouterr().err


def test_schedulers_count_epochs_and_never_stop_a_trial_for_finishing() -> None:
    asha = make_scheduler(SchedulerConfig(name="asha", grace_period=2, reduction_factor=2), max_epochs=8)
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == (TIME_ATTR, "train_loss", "min", 8)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [8, 4, 2]
    assert not asha._brackets[0]._stop_last_trials
    median = make_scheduler(SchedulerConfig(name="median-stopping", mode="max", metric="val_metric"), 4)
    assert isinstance(median, MedianStoppingRule) and median._metric == "val_metric" and median._mode == "max"
    assert isinstance(make_scheduler(SchedulerConfig(name="hyperband"), 9), HyperBandScheduler)
    assert make_scheduler(SchedulerConfig(), 4) is None


def test_a_missing_optional_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    with pytest.raises(
        OrderlabError, match=r"sweep.search.algorithm=optuna needs the 'optuna' package.*orderlab\[search\]"
    ):
        make_searcher(SearchConfig(algorithm="optuna"))


def lr_loss(lr: float) -> float:
    """A loss with its minimum at lr = 0.1, as the searchers see it."""
    return (math.log10(lr) + 1.0) ** 2


def run_search(search: GridPointSearch, trials: int) -> list[dict]:
    """Suggest ``trials`` trials one at a time, each completed with ``lr_loss`` before the next."""
    configs = []
    for i in range(trials):
        config = search.suggest(f"t{i}")
        assert isinstance(config, dict)
        search.on_trial_result(f"t{i}", {"train_loss": 9.0, TIME_ATTR: 1, "training_iteration": 1})
        search.on_trial_complete(f"t{i}", {"train_loss": lr_loss(config["train.lr"]), TIME_ATTR: 2})
        configs.append(config)
    return configs


def optuna_search(seed: int, num_samples: int = 6) -> GridPointSearch:
    space = {"train.lr": tune_space({"loguniform": [1e-3, 1.0]})}
    return GridPointSearch(OptunaSearch(seed=seed), GRID, space, num_samples, "train_loss", "min")


def test_grid_point_search_runs_num_samples_trials_per_grid_point_in_turn() -> None:
    search = optuna_search(seed=0, num_samples=6)
    assert search.total_trials == 12
    configs = run_search(search, 12)
    assert [c["ordering.name"] for c in configs] == ["rr", "cd-grab"] * 6  # the points take turns
    assert all(1e-3 <= c["train.lr"] <= 1.0 for c in configs)
    assert search.suggest("t12") == Searcher.FINISHED
    # each point has its own study, fed only its own trials' results
    studies = [s._ot_study for s in search.searchers]
    assert [len(study.trials) for study in studies] == [6, 6]
    rr_lrs = [c["train.lr"] for c in configs if c["ordering.name"] == "rr"]
    assert [t.params["train.lr"] for t in studies[0].trials] == rr_lrs
    assert studies[0].best_value == min(lr_loss(lr) for lr in rr_lrs)


def test_the_same_seed_gives_the_same_search() -> None:
    first, again, other = (run_search(optuna_search(seed), 12) for seed in (7, 7, 8))
    assert first == again
    assert first != other
    hyperopt = [
        run_search(
            GridPointSearch(
                HyperOptSearch(random_state_seed=3),
                GRID,
                {"train.lr": tune_space({"loguniform": [1e-3, 1.0]})},
                4,
                "train_loss",
                "min",
            ),
            8,
        )
        for _ in range(2)
    ]
    assert hyperopt[0] == hyperopt[1]


def test_search_plan_random_is_tunes_variant_generator_and_a_searcher_goes_per_grid_point() -> None:
    space = {
        "ordering.name": tune_space(["rr", "cd-grab"]),
        "train.lr": tune_space({"loguniform": [1e-3, 1.0]}),
        "task.name": "digits-logreg",
    }
    algorithm, tuner_space, num_samples = search_plan(
        space, None, 3, "train_loss", "min", 0, max_concurrent=2
    )
    assert isinstance(algorithm, BasicVariantGenerator) and tuner_space == space and num_samples == 3
    assert algorithm.max_concurrent == 2  # Tune ignores max_concurrent_trials for a SearchAlgorithm
    algorithm, tuner_space, num_samples = search_plan(space, OptunaSearch(seed=0), 3, "train_loss", "min", 0)
    assert isinstance(algorithm, GridPointSearch) and algorithm.grid == GRID
    assert tuner_space == {"task.name": "digits-logreg"} and num_samples == 6


@pytest.mark.parametrize("searcher", [OptunaSearch(seed=1), HyperOptSearch(random_state_seed=1)])
def test_a_saved_search_restores_and_continues_as_the_original(tmp_path: Path, searcher: Searcher) -> None:
    """Tune saves the search with the experiment's state; --resume restores it."""
    space = {"train.lr": tune_space({"loguniform": [1e-3, 1.0]})}
    original = GridPointSearch(searcher, GRID, space, 4, "train_loss", "min")
    run_search(original, 3)
    original.save(str(tmp_path / "search.pkl"))
    restored = GridPointSearch(searcher, GRID, space, 4, "train_loss", "min")
    restored.restore(str(tmp_path / "search.pkl"))
    assert restored.started == [2, 1] and restored.turn == 1
    assert [restored.suggest(f"u{i}") for i in range(5)] == [original.suggest(f"u{i}") for i in range(5)]
    assert restored.suggest("u5") == Searcher.FINISHED
