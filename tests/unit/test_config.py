"""Unit tests for orderlab.config: schema defaults, overrides, error messages, sweep grids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orderlab.config import (
    ExperimentConfig,
    apply_overrides,
    config_to_dict,
    expand_grid,
    leaf_keys,
    load_config,
    validate,
    validate_grid,
)
from orderlab.errors import OrderlabError

REPO = Path(__file__).resolve().parents[2]
TASK = "mnist1d-logreg"
BASE: dict[str, Any] = {"task": {"name": TASK}}


def check(data: dict[str, Any], overrides: Any = None) -> ExperimentConfig:
    return validate(apply_overrides(data, overrides))


def error_of(data: Any, overrides: Any = None) -> str:
    with pytest.raises(OrderlabError) as info:
        check(data, overrides)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- schema


def test_defaults() -> None:
    cfg = validate(BASE)
    assert (cfg.name, cfg.seed, cfg.storage, cfg.sweep.axes, cfg.num_samples) == (
        "experiment",
        0,
        "results",
        {},
        1,
    )
    assert cfg.task.name == TASK and cfg.task.data_dir is None and cfg.task.options == {}
    train = cfg.train
    assert (train.epochs, train.batch_size, train.num_workers, train.unit) == (10, 32, 2, "example")
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay) == ("sgd", 0.1, 0.0, 0.0)
    assert train.betas == (0.9, 0.999) and train.lr_schedule.name == "constant"
    assert train.microbatch_size == 16 and train.effective_lr == 0.1
    assert cfg.ordering.name == "rr" and cfg.ordering.first_epoch == "random"
    assert cfg.ordering.balance == "deterministic" and cfg.ordering.balance_c == 30.0
    assert (cfg.ordering.message_steps, cfg.ordering.max_in_flight) == (16, 4)
    assert cfg.resources.cpus_per_worker == 0.45 and cfg.resources.max_concurrent_trials is None


def test_lr_schedule_shorthand() -> None:
    short = check(BASE, {"train.lr_schedule": "cosine"})
    full = check(BASE, {"train.lr_schedule": {"name": "cosine"}})
    assert short == full and short.train.lr_schedule.name == "cosine"
    # a sub-key override expands the shorthand instead of failing on a string
    cfg = check({**BASE, "train": {"lr_schedule": "cosine"}}, ["train.lr_schedule.min_lr=0.001"])
    assert cfg.train.lr_schedule.name == "cosine" and cfg.train.lr_schedule.min_lr == 0.001


@pytest.mark.parametrize(("scaling", "expected"), [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_effective_lr(scaling: str, expected: float) -> None:
    overrides = {"train.batch_size": 128, "train.lr_scaling": scaling, "train.lr_base_batch_size": 32}
    assert check(BASE, overrides).train.effective_lr == pytest.approx(expected)


def test_config_to_dict_is_json_and_round_trips() -> None:
    cfg = check(BASE, {"sweep.seed": [0, 1], "task.options.width": 8})
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data and data["train"]["betas"] == [0.9, 0.999]
    assert validate(data) == cfg


def test_leaf_keys() -> None:
    keys = leaf_keys()
    for key in (
        "seed",
        "task.options",
        "train.lr",
        "train.lr_schedule.name",
        "ordering.name",
        "sweep.search.seed",
    ):
        assert key in keys
    assert "train" not in keys and "train.lr_schedule" not in keys


def test_import_pulls_in_neither_ray_nor_torch() -> None:
    code = "import sys, orderlab.config; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- overrides


def test_overrides_mapping_and_strings_agree() -> None:
    strings = ["train.lr=0.05", "ordering.name=grab", "sweep.seed=[0, 1]", "sweep.ordering.name=[rr, so]"]
    mapping = {
        "train.lr": 0.05,
        "ordering.name": "grab",
        "sweep.seed": [0, 1],
        "sweep.ordering.name": ["rr", "so"],
    }
    cfg = check(BASE, strings)
    assert cfg == check(BASE, mapping)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 0.05
    assert cfg.sweep.axes == {"seed": [0, 1], "ordering.name": ["rr", "so"]}


def test_override_values_are_yaml_typed() -> None:
    data = apply_overrides(BASE, ["seed=3", "train.lr=1e-2", "task.data_dir=null", "task.options.a.b=true"])
    # PyYAML alone reads 1e-2 as a string (YAML 1.1); the loader reads it as a float like YAML 1.2
    assert data["seed"] == 3 and data["train"]["lr"] == 0.01 and data["task"]["data_dir"] is None
    assert data["task"]["options"] == {"a": {"b": True}}


def test_apply_overrides_is_pure_and_merges_sections() -> None:
    data = {"task": {"name": TASK}, "train": {"epochs": 3, "lr": 0.5}}
    out = apply_overrides(data, {"train": {"lr": 0.2}, "resources.num_threads": 2})
    assert out["train"] == {"epochs": 3, "lr": 0.2} and out["resources"] == {"num_threads": 2}
    assert data == {"task": {"name": TASK}, "train": {"epochs": 3, "lr": 0.5}}


def test_with_overrides_revalidates() -> None:
    cfg = validate(BASE)
    new = cfg.with_overrides({"train.epochs": 4})
    assert new.train.epochs == 4 and cfg.train.epochs == 10
    with pytest.raises(OrderlabError, match=r"train\.epochs=0: must be >= 1"):
        cfg.with_overrides({"train.epochs": 0})


@pytest.mark.parametrize(
    ("key", "level", "valid"),
    [
        ("trian.lr", "at the top level", "name, seed, task, train, ordering"),
        ("train.lrr", "under train", "epochs, batch_size, num_workers"),
        ("train.lr_schedule.nam", "under train.lr_schedule", "name, step_size, gamma"),
        ("ordering.nme", "under ordering", "name, first_epoch, balance"),
        ("resources.cpus", "under resources", "cpus_per_worker, gpus_per_worker"),
        ("task.nam", "under task", "name, data_dir, train_examples, options"),
    ],
)
def test_unknown_key_names_dotted_key_and_valid_keys(key: str, level: str, valid: str) -> None:
    override_msg = error_of(BASE, {key: 1})
    assert override_msg.startswith(f"{key}: unknown key") and level in override_msg and valid in override_msg
    # the same key written in the file instead of passed as an override; pydantic stops at the
    # first unknown part, so a file's ``trian: {lr: 1}`` is reported as ``trian``
    nested: Any = 1
    for part in reversed(key.split(".")):
        nested = {part: nested}
    file_msg = error_of({**nested, "task": {"name": TASK, **nested.get("task", {})}})
    file_key = "trian" if key == "trian.lr" else key
    assert f"config: {file_key}: unknown key" in file_msg and level in file_msg and valid in file_msg


def test_override_into_a_value_or_malformed_string() -> None:
    assert "train.lr is a value" in error_of(BASE, ["train.lr.x=1"])
    assert "must look like dotted.key=value" in error_of(BASE, ["train.lr"])
    assert "malformed YAML" in error_of(BASE, ["train.lr=[1,"])


def test_free_sub_keys_are_accepted() -> None:
    cfg = check(BASE, {"task.options.hidden.width": 16, "sweep.train.lr_schedule.name": ["cosine"]})
    assert cfg.task.options == {"hidden": {"width": 16}}
    assert cfg.sweep.axes == {"train.lr_schedule.name": ["cosine"]}


# ---------------------------------------------------------------- error messages


def test_unknown_names_list_known_ones() -> None:
    msg = error_of(BASE, {"ordering.name": "grabb"})
    assert "ordering.name='grabb': unknown ordering (did you mean 'grab'?)" in msg
    assert "known: cd-grab, flipflop, grab, pair-balance, rr, so, with-replacement" in msg
    msg = error_of({"task": {"name": "mnist"}})
    assert "task.name='mnist': unknown task" in msg and "digits-logreg" in msg and TASK in msg
    msg = error_of(BASE, {"train.lr_schedule": "cosin"})
    assert "train.lr_schedule.name='cosin': must be one of: constant, step, multistep, cosine" in msg
    assert "did you mean 'cosine'?" in msg


def test_batch_size_not_divisible_by_num_workers() -> None:
    msg = error_of(BASE, {"train.batch_size": 30, "train.num_workers": 4})
    assert msg.startswith("config: train.batch_size=30: must be divisible by train.num_workers=4")
    assert "train.batch_size=28 or 32" in msg and "train.num_workers=3 or 5" in msg
    msg = error_of(BASE, {"train.batch_size": 3, "train.num_workers": 4})
    assert "train.batch_size=4," in msg and "train.num_workers=3" in msg


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("train.unit", "example, microbatch"),
        ("train.optimizer", "sgd, adam, adamw"),
        ("train.lr_scaling", "none, linear, sqrt"),
        ("ordering.first_epoch", "random, identity"),
        ("ordering.balance", "deterministic, probabilistic"),
    ],
)
def test_literal_errors_list_allowed_values(key: str, allowed: str) -> None:
    assert error_of(BASE, {key: "bogus"}) == f"config: {key}='bogus': must be one of: {allowed}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.optimizer": "adam", "train.momentum": 0.9}, "train.momentum=0.9: is for sgd only"),
        ({"train.lr_scaling": "linear"}, "train.lr_base_batch_size=None: required when train.lr_scaling"),
        (
            {"train.epochs": 3, "train.lr_schedule": {"name": "warmup-cosine", "warmup_epochs": 3}},
            "train.lr_schedule.warmup_epochs=3: must be < train.epochs=3",
        ),
        (
            {"train.epochs": 5, "train.lr_schedule": {"name": "multistep", "milestones": [2, 5]}},
            "train.lr_schedule.milestones=[2, 5]: must all be < train.epochs=5",
        ),
        ({"train.lr_schedule": {"name": "multistep", "milestones": [3, 2]}}, "must be strictly increasing"),
        ({"train.lr_schedule": "multistep"}, "train.lr_schedule.milestones=[]: must list >= 1 epoch"),
        ({"train.momentum": 1.0}, "train.momentum=1.0: must be < 1"),
        ({"train.lr": float("nan")}, "train.lr=nan: Input should be a finite number"),
        ({"train.epochs": True}, "train.epochs=True: Input should be a valid integer"),
        ({"train.lr": "0.1"}, "train.lr='0.1': Input should be a valid number"),
        ({"name": "a/b"}, "name='a/b': may contain only letters, digits"),
        ({"name": ".."}, "name='..': must name a directory"),
        ({"sweep.seed": []}, "sweep.seed=[]: needs at least one value"),
        ({"resources.max_concurrent_trials": 0}, "resources.max_concurrent_trials=0: must be >= 1"),
    ],
)
def test_field_and_cross_field_errors(overrides: dict[str, Any], expected: str) -> None:
    assert expected in error_of(BASE, overrides)


def test_one_line_per_problem() -> None:
    msg = error_of({"task": {}, "seed": -1, "train": {"lr": 0, "unit": "x"}})
    assert msg.splitlines() == [
        "config: seed=-1: must be >= 0",
        "config: task.name: required key is missing",
        "config: train.unit='x': must be one of: example, microbatch",
        "config: train.lr=0: must be > 0.0",
    ]


def test_top_level_not_a_mapping() -> None:
    with pytest.raises(OrderlabError, match=r"^config: \(top level\)=\[1, 2\]: Input should be a valid dict"):
        validate([1, 2])


# ---------------------------------------------------------------- loading


def test_load_config_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, f"name: x\ntask:\n  name: {TASK}\ntrain:\n  epochs: 3\n  weight_decay: 5e-4\n")
    cfg = load_config(path, ["train.lr=0.05", "sweep.seed=[0,1]"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr, cfg.sweep.axes) == ("x", 3, 0.05, {"seed": [0, 1]})
    assert cfg.train.weight_decay == 5e-4
    assert load_config(str(path)).train.lr == 0.1


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"task:\n  name: {TASK}\ntrain:\n  epochs: 0\n")
    with pytest.raises(OrderlabError, match=r"^.*exp\.yaml: train\.epochs=0: must be >= 1$"):
        load_config(path)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, f"task:\n  name: {TASK}\ntrain:\n  lr: 0.1\n   epochs: 3\n", name="bad.yaml")
    with pytest.raises(OrderlabError, match=r"bad\.yaml: malformed YAML: line 5, column 10: mapping values"):
        load_config(path)
    path = write(tmp_path, "task:\n\tname: x\n", name="tabs.yaml")
    with pytest.raises(OrderlabError, match=r"tabs\.yaml: malformed YAML: line 2"):
        load_config(path)
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"task: \xff\xfe\n")
    with pytest.raises(OrderlabError, match=r"binary\.yaml: malformed YAML: byte"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OrderlabError, match=r"config file '.*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(OrderlabError, match="not found"):
        load_config(tmp_path)  # a directory is not a config file


@pytest.mark.parametrize(("text", "kind"), [("", "empty"), ("- a\n- b\n", "a list"), ("3\n", "a int")])
def test_top_level_of_file_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    with pytest.raises(OrderlabError, match=f"exp.yaml: the top level is {kind}; it must be a mapping"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(("name", "num_points"), [("demo.yaml", 10), ("tiny.yaml", 2)])
def test_example_configs_load_and_validate(name: str, num_points: int) -> None:
    cfg = load_config(REPO / "configs" / name)
    points = validate_grid(cfg)
    assert len(points) == num_points and all(p.sweep.axes == {} for p in points)
    assert {p.ordering.name for p in points} == set(cfg.sweep.axes["ordering.name"])


# ---------------------------------------------------------------- sweep grids


def test_expand_grid_order_and_count() -> None:
    cfg = check(BASE, {"sweep": {"ordering.name": ["rr", "grab"], "seed": [0, 1, 2]}})
    grid = expand_grid(cfg)
    assert len(grid) == 6
    assert grid[:4] == [
        {"ordering.name": "rr", "seed": 0},
        {"ordering.name": "rr", "seed": 1},
        {"ordering.name": "rr", "seed": 2},
        {"ordering.name": "grab", "seed": 0},
    ]
    assert expand_grid(validate(BASE)) == [{}]


def test_validate_grid_applies_each_point() -> None:
    cfg = check(BASE, {"sweep": {"train.lr_schedule": ["constant", "cosine"], "train.num_workers": [1, 4]}})
    points = validate_grid(cfg)
    assert [(p.train.lr_schedule.name, p.train.num_workers) for p in points] == [
        ("constant", 1),
        ("constant", 4),
        ("cosine", 1),
        ("cosine", 4),
    ]


def test_bad_value_in_a_sweep_axis_names_axis_and_value() -> None:
    cfg = check(BASE, {"sweep": {"seed": [0], "ordering.name": ["rr", "bogus"]}})
    with pytest.raises(OrderlabError) as info:
        validate_grid(cfg)
    assert str(info.value) == (
        "sweep[seed=0, ordering.name='bogus']: ordering.name='bogus': unknown ordering; "
        "known: cd-grab, flipflop, grab, pair-balance, rr, so, with-replacement"
    )
    cfg = check(BASE, {"sweep": {"train.num_workers": [2, 3]}})
    with pytest.raises(
        OrderlabError, match=r"sweep\[train\.num_workers=3\]: train\.batch_size=32: must be divisible"
    ):
        validate_grid(cfg)


def test_unknown_sweep_axis_lists_valid_leaves() -> None:
    msg = error_of(BASE, {"sweep": {"ordering.nam": ["rr"]}})
    assert msg.startswith(
        "config: sweep.ordering.nam=['rr']: unknown sweep axis (did you mean 'ordering.name'?)"
    )
    assert "valid axes: name, seed, task.name" in msg and "train.lr_schedule.name" in msg
    assert "task.options.<key>" in msg
    for axis in ("sweep", "num_samples", "task.options."):
        assert "unknown sweep axis" in error_of(BASE, {"sweep": {axis: [1]}})
    assert "a section as an axis takes mappings" in error_of(BASE, {"sweep": {"train": [1]}})


def test_a_section_axis_sets_several_keys_of_each_point_together() -> None:
    """The CD-GraB scaling study's B = W: one axis whose values set num_workers and batch_size."""
    axis = [{"num_workers": 4, "batch_size": 4}, {"num_workers": 8, "batch_size": 8}]
    points = validate_grid(validate({**BASE, "sweep": {"train": axis, "seed": [0, 1]}}))
    assert [(p.train.num_workers, p.train.batch_size, p.seed) for p in points] == [
        (4, 4, 0),
        (4, 4, 1),
        (8, 8, 0),
        (8, 8, 1),
    ]
    with pytest.raises(OrderlabError, match="train.batch_sizee: unknown key"):
        validate_grid(validate({**BASE, "sweep": {"train": [{"batch_sizee": 4}]}}))


# ---------------------------------------------------------------- property test

SECTIONS = ["train", "train.lr_schedule", "task", "task.options", "ordering", "resources", "sweep"]
BOGUS_KEYS = ["trian", "train.lrr", "train.lr.x", "task.options.x.y", "", ".", "sweep.bogus", "sweep.seed"]
KEYS = st.sampled_from(
    leaf_keys() + SECTIONS + BOGUS_KEYS + ["sweep.ordering.name", "sweep.train.batch_size"]
)
NAMES = st.sampled_from(
    ["rr", "cd-grab", "grab", "bogus", TASK, "digits-logreg", "cosine", "multistep", "adam", "microbatch"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    NAMES,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)
GOOD_VALUES = {
    "seed": st.integers(0, 5),
    "train.epochs": st.integers(1, 20),
    "train.batch_size": st.sampled_from([16, 32, 64]),
    "train.num_workers": st.sampled_from([1, 2, 4]),
    "train.lr": st.floats(1e-4, 1.0),
    "train.momentum": st.sampled_from([0.0, 0.9]),
    "train.optimizer": st.sampled_from(["sgd", "adam", "adamw"]),
    "train.lr_schedule": st.sampled_from(["constant", "cosine", {"name": "multistep", "milestones": [1]}]),
    "ordering.name": st.sampled_from(["rr", "so", "grab", "pair-balance", "cd-grab"]),
    "ordering.balance": st.sampled_from(["deterministic", "probabilistic"]),
    "resources.cpus_per_worker": st.floats(0.1, 2.0),
    "task.options.width": st.integers(1, 64),
    "sweep.seed": st.lists(st.integers(0, 3), min_size=1, max_size=3),
    "sweep.ordering.name": st.lists(st.sampled_from(["rr", "grab", "cd-grab"]), min_size=1, max_size=3),
    "sweep.train.num_workers": st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=2),
}
GOOD_PAIR = st.sampled_from(sorted(GOOD_VALUES)).flatmap(lambda k: st.tuples(st.just(k), GOOD_VALUES[k]))
ANY_PAIR = st.tuples(KEYS, VALUES)
# plausible values plus sometimes one arbitrary pair: about half of these configs are valid
PLAUSIBLE = st.tuples(
    st.lists(GOOD_PAIR, max_size=4),
    st.sampled_from([0, 0, 1]).flatmap(lambda n: st.lists(ANY_PAIR, min_size=n, max_size=n)),
).map(lambda pairs: dict(pairs[0] + pairs[1]))
GARBAGE = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=6),
    st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, st.one_of(st.text(max_size=8), NAMES)), max_size=4),
)
CASES = st.one_of(  # (base data, overrides)
    st.tuples(st.just(BASE), PLAUSIBLE),
    st.tuples(st.just(BASE), PLAUSIBLE),
    st.tuples(st.just(BASE), GARBAGE),
    st.tuples(st.dictionaries(KEYS, VALUES, max_size=4), st.one_of(PLAUSIBLE, GARBAGE)),
)


@settings(max_examples=500, deadline=None)
@given(case=CASES)
def test_any_input_validates_or_raises_orderlab_error(case: tuple[dict[str, Any], Any]) -> None:
    base, overrides = case
    try:
        cfg = check(base, overrides)
        points = validate_grid(cfg)
        assert len(points) == len(expand_grid(cfg))
        event("valid")
    except OrderlabError as err:
        assert str(err).strip()
        event("OrderlabError")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(st.text(max_size=40), st.builds(lambda v: f"task:\n  name: {TASK}\ntrain: {v}\n", VALUES))
)
def test_any_file_loads_or_raises_orderlab_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    try:
        load_config(path)
    except OrderlabError as err:
        assert str(err).strip()
