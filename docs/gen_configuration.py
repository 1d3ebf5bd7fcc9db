"""Write docs/configuration.md, the reference of every config key, from orderlab's pydantic models.

Types, defaults, bounds and allowed values come from the models in ``platform/orderlab/config.py``;
each key's description is the comment written beside or above its field there, followed by the
note in ``NOTES`` below where the comment alone does not say enough. So a field added, removed or
changed in config.py changes this page; ``tests/unit/test_docs.py`` fails while the committed page
is stale.

    python docs/gen_configuration.py > docs/configuration.md    # regenerate
    python docs/gen_configuration.py --check                   # exit 1 when the page is stale

Imports only ``orderlab.config`` (pydantic and PyYAML; no torch, no Ray): from a checkout without an
install, run it with ``PYTHONPATH=platform``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import sys
import tokenize
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from orderlab import config

PAGE = Path(__file__).resolve().parent / "configuration.md"

# What the models' comments and names leave unsaid, by dotted key (shown after the comment).
NOTES: dict[str, str] = {
    "name": "The sweep's name: results go under `{storage}/trials/{name}/` and `{storage}/epochs/{name}/`, "
    "and `--resume` finds the sweep by it.",
    "seed": "Seeds the model's initialisation, every worker's permutations (from seed, rank and epoch) "
    "and the CountSketch. A sweep axis like any other (`sweep: {seed: [0, 1]}`).",
    "storage": "Where results, Tune state and checkpoints go: a local path or a URI pyarrow understands "
    "(`s3://`, `gs://`, `file://`); a multi-node run needs one every node sees ([cluster](cluster.md)).",
    "sweep": "The trials are the cartesian product of the grid axes (lists), the last axis varying fastest. A section as the key takes mappings that set several of its keys together: "
    "`train: [{num_workers: 4, batch_size: 4}, {num_workers: 8, batch_size: 8}]`. "
    "`task.options.<key>` is an axis for any key. A search-space axis, `{choice: [...]}`, `{uniform: [a, b]}`, "
    "`{loguniform: [a, b]}` or `{randint: [a, b]}` (b excluded), is sampled for each trial instead, "
    "`sweep.search.num_samples` trials per grid point ([search](search.md)); `{grid: [...]}` is a list. "
    "Every grid point is validated before anything runs, with each space at its ends (each choice).",
    "num_samples": "Tune's `num_samples`: how many times the grid is repeated (with search spaces from Python). "
    "With `sweep.search`, set `sweep.search.num_samples` instead.",
    "tracking": "`mlflow` (tracking URI `MLFLOW_TRACKING_URI`, else `sqlite:///{storage}/mlflow.db`), "
    "`tensorboard` (event files in each trial's directory under `{storage}/_tune/{name}/`), `wandb` "
    "(project `name`; offline under `{storage}/wandb` unless `WANDB_API_KEY` is set or `wandb login` was run). "
    "One run per trial, every epoch metric, the swept values, ordering, task, workers and seed as params "
    "([search](search.md#experiment-tracking)).",
    "sweep.search.algorithm": "`optuna` and `hyperopt` need `pip install 'orderlab[search]'`. "
    "Each grid point gets its own searcher.",
    "sweep.search.mode": "`min` or `max` of `metric`.",
    "sweep.scheduler.mode": "`min` or `max` of `metric`.",
    "sweep.scheduler.name": "A stopped trial is recorded with `trials.status = 'stopped'` and `stopped_epoch`.",
    "task.name": "A registered task (`orderlab.tasks.TASKS`; the README's table lists them).",
    "task.data_dir": "Where the task's files are: this, else `ORDERLAB_DATA`, else `~/.cache/orderlab/data`.",
    "task.train_examples": "Validation is never subset.",
    "task.options": "E.g. `wikitext2-lstm`'s `train_tokens` (a prefix of train.txt) and "
    "`reset_hidden_each_chunk`; an unknown option is an error from the task.",
    "train.epochs": "Epochs to train; results have one `epochs` row per epoch.",
    "train.batch_size": "Global: each worker takes `batch_size / num_workers` examples per step. Must be "
    "divisible by `train.num_workers` (the error names the nearest valid values).",
    "train.num_workers": "W: data-parallel workers, each with an equal shard (the tail that fills no whole "
    "step is dropped and counted in `trials.num_dropped`).",
    "train.unit": "What an ordering permutes: one example (per-example gradients by `torch.func.vmap`) or "
    "one microbatch of `batch_size / num_workers` consecutive examples (one backward per step).",
    "train.optimizer": "torch's `SGD`, `Adam` or `AdamW`.",
    "train.lr": "The learning rate the schedule starts from; `lr_scaling` scales it (the trials table "
    "records the scaled value).",
    "train.momentum": "SGD only; with `adam`/`adamw` it must be 0 (use `betas`).",
    "train.weight_decay": "As torch's optimizers take it.",
    "train.betas": "Adam and AdamW.",
    "train.lr_scaling": "Scale `lr` by `batch_size / lr_base_batch_size` (`linear`) or its square root (`sqrt`).",
    "train.lr_base_batch_size": "Required when `lr_scaling` is not `none`: the batch size `lr` was tuned for.",
    "train.max_failures": "Ray Train (`ray-train`) or Tune (`simulated`) restarts a failed trial this many "
    "times, from its last checkpoint ([reliability](reliability.md)).",
    "train.backend": "See the README's section on the simulated backend and [architecture](architecture.md).",
    "train.lr_schedule.name": "`constant`; `step` (×`gamma` every `step_size` epochs); `multistep` (×`gamma` "
    "at each of `milestones`); `cosine` and `linear` (down to `min_lr` at the end of the last epoch); "
    "`warmup-cosine` (a linear warm-up over `warmup_epochs`, then cosine). torch's schedulers, stepped "
    "once per optimizer step; epoch settings become step counts. A plain string is shorthand: "
    "`lr_schedule: cosine`.",
    "train.lr_schedule.milestones": "Strictly increasing epochs, each < `train.epochs`; required for `multistep`.",
    "train.lr_schedule.warmup_epochs": "`warmup-cosine` only; < `train.epochs`.",
    "train.lr_schedule.min_lr": "`cosine`, `linear`, `warmup-cosine`; at most the scaled `train.lr`.",
    "ordering.name": "One of the [orderings](orderings.md): `with-replacement`, `rr`, `so`, `flipflop`, "
    "`grab`, `pair-balance`, `cd-grab` (`orderlab.orderings.ORDERINGS`).",
    "ordering.first_epoch": "Epoch 0's orders: a seeded permutation per worker, or the identity.",
    "ordering.balance": "The balancing sign: deterministic, or the self-balancing walk with constant `balance_c`.",
    "ordering.balance_c": "The probabilistic walk's constant c.",
    "ordering.transport": "`ray-train` only.",
    "ordering.ring_directory": "The directory must allow named pipes for the rings' doorbells (else "
    "the server polls). `ray-train` only.",
    "ordering.message_steps": "`ray-train` only.",
    "ordering.max_in_flight": "`ray-train` only; a shared-memory ring has `max_in_flight` + 1 slots.",
    "ordering.server_threads": "With `simulated`: the balancing threads in the trial's process.",
    "resources.cpus_per_worker": "Ray CPUs each Ray Train worker reserves (a scheduling token: torch runs "
    "`num_threads` threads).",
    "resources.gpus_per_worker": "`ray-train` only; > 0 puts workers on GPUs and all-reduces with NCCL.",
    "resources.max_concurrent_trials": "The default is as many trials as the cluster's CPUs and GPUs fit, "
    "so no trial waits forever for its workers.",
    "resources.placement_strategy": "Ray's placement-group strategy; `STRICT_SPREAD` puts each worker on "
    "its own node.",
    "metrics.herding_units": "Default: every unit.",
    "faults.exit_worker": "That worker process calls `os._exit(1)`.",
    "faults.kill_order_server": "The given rank kills the trial's order server (`ray.kill`); `ray-train` only.",
}

INTRO = """\
# Configuration reference

<!-- Generated by docs/gen_configuration.py from platform/orderlab/config.py; do not edit by hand:
     python docs/gen_configuration.py > docs/configuration.md -->

An experiment is one YAML file (`configs/demo.yaml` is a short one), checked once, before anything
runs, by the pydantic models of `platform/orderlab/config.py`. This page is generated from them.

- Unknown keys are errors that list the valid keys at that level; a misspelt name gets a suggestion.
- Numbers are strict: `true` or `"3"` is not an epoch count (an integer is accepted where a float is).
  `1e-3` is a float, as YAML 1.2 reads it.
- Every problem comes back as one `OrderlabError` line, `{file}: {dotted.key}={value}: {reason}`; the
  CLI prints them without a traceback and exits with status 2.

Override any key on the command line with a dotted name and a YAML value, and sweep any key
(`sweep.<key>`): the trials are the cartesian product of the sweep axes.

```
orderlab sweep configs/demo.yaml --set train.lr=0.05 --set 'sweep.seed=[0,1,2]'
orderlab sweep configs/demo.yaml --set 'sweep.train=[{num_workers: 4, batch_size: 4}, {num_workers: 8, batch_size: 8}]'
```

From Python, `orderlab.config.load_config(path, overrides)` returns the validated `ExperimentConfig`,
and `orderlab.sweep(path, overrides=..., param_space=...)` takes Tune search spaces as well as lists.

**Data.** Tasks read their files from one data directory: `task.data_dir`, else `ORDERLAB_DATA`, else
`~/.cache/orderlab/data`. Each file is checked against its sha256 on use; a missing or corrupt file
is an error naming the file, its checksum and where to get it (`orderlab data fetch TASK`).
MNIST-1D needs no file: it is generated offline by the `mnist1d` package.
"""


def source_comments(module: types.ModuleType) -> dict[tuple[str, str], str]:
    """The comment of each model field in ``module``'s source, by (class name, field name): the
    comment lines right above the field and the comment at the end of its statement, joined."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            text = " ".join(above + beside)
            if text:
                first = text.split(" ", 1)[0]
                code_like = "_" in first or first.endswith(":")  # a name or a value, e.g. "ray-train:"
                text = text if code_like else text[0].upper() + text[1:]
                found[(node.name, stmt.target.id)] = text if text.endswith(".") else text + "."
    return found


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (alone or with None), else None."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else None


def constraints(metadata: list[Any]) -> list[str]:
    """Bounds and patterns from pydantic/annotated-types metadata, e.g. ``≥ 1``, ``< 1``."""
    out: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += constraints(item.metadata)
        elif isinstance(item, annotated_types.Ge):
            out.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            out.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            out.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            out.append(f"< {'2⁶³' if item.lt == 2**63 else item.lt}")
        elif isinstance(item, annotated_types.MinLen):
            out.append(f"at least {item.min_length} character")
        elif getattr(item, "pattern", None):
            out.append(f"matches `{item.pattern}`")
    return out


def describe_type(annotation: Any) -> tuple[str, list[str]]:
    """A reader's name for ``annotation`` and the constraints it carries itself."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        name, inner = describe_type(args[0])
        return name, inner + constraints(list(args[1:]))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        name = " or ".join(p[0] for p in parts)
        return (name + " or null" if type(None) in args else name), [c for p in parts for c in p[1]]
    if origin is Literal:
        return "string", []
    if origin is tuple:
        parts = [describe_type(a) for a in args]
        bounds = list(dict.fromkeys(c for p in parts for c in p[1]))
        return "[" + ", ".join(p[0] for p in parts) + "]", (
            [f"each {' and '.join(bounds)}"] if bounds else []
        )
    if origin is list:
        name, inner = describe_type(args[0])
        return f"list of {name}", ([f"each {' and '.join(inner)}"] if inner else [])
    if origin is dict:
        return "mapping", []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping", []
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(annotation, str(annotation)), []


def yaml_value(value: Any) -> str:
    """``value`` as it would be written in the YAML file."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def cell(text: str) -> str:
    """``text`` fit for one table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def summary(model: type[BaseModel]) -> str:
    """The first paragraph of ``model``'s docstring, on one line, in Markdown."""
    return inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ").replace("``", "`")


def key_rows(
    model: type[BaseModel], prefix: str, comments: dict[tuple[str, str], str], anchors: dict[str, str]
) -> Iterator[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed values, description) of each field of ``model``; ``anchors``:
    the heading anchor of each section key."""
    for name, field in model.model_fields.items():
        key = prefix + name
        type_name, bounds = describe_type(field.annotation)
        bounds += constraints(field.metadata)
        allowed = (
            ", ".join(f"`{a}`" for a in get_args(field.annotation))
            if get_origin(field.annotation) is Literal
            else ""
        )
        sub = section_model(field.annotation)
        if sub is not None:
            type_name = f"mapping ([below](#{anchors[key]}))" + (" or null" if "null" in type_name else "")
        if field.default is PydanticUndefined:
            default = "required"
        elif isinstance(field.default, BaseModel):
            default = "see its section"
        else:
            default = yaml_value(field.default)
        comment = comments.get((model.__name__, name), "") or (summary(sub) if sub is not None else "")
        description = " ".join(t for t in (comment, NOTES.get(key, "")) if t)
        yield key, type_name, default, allowed or ", ".join(bounds), description


def slug(title: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub both give a heading ``title``."""
    text = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel], list[str]]]:
    """(dotted prefix, model, keys sharing it) of ``model`` and every section below it, depth first;
    a model used by several keys (a fault point) appears once, under all of them."""
    seen: dict[type[BaseModel], list[str]] = {}
    order: list[tuple[str, type[BaseModel]]] = []

    def walk(current: type[BaseModel], at: str) -> None:
        for name, field in current.model_fields.items():
            sub = section_model(field.annotation)
            if sub is None:
                continue
            key = at + name
            if sub in seen:
                seen[sub].append(key)
                continue
            seen[sub] = [key]
            order.append((key, sub))
            walk(sub, key + ".")

    walk(model, prefix)
    yield "", model, []
    for key, sub in order:
        yield key, sub, seen[sub]


def render() -> str:
    """The whole page.

    Raises:
        ValueError: ``NOTES`` names a key that the models do not have.
    """
    comments = source_comments(config)
    parts = list(sections(config.ExperimentConfig))
    titles = {key: ("Top level" if not key else ", ".join(f"`{k}`" for k in keys)) for key, _, keys in parts}
    anchors = {k: slug(titles[key]) for key, _, keys in parts for k in keys}
    known: set[str] = set()
    out = [INTRO]
    for key, model, keys in parts:
        out += [
            f"## {titles[key]}\n",
            f"{summary(model)}\n",
            "| key | type | default | allowed | description |",
            "|---|---|---|---|---|",
        ]
        prefix = "" if not key else (key if len(keys) == 1 else key.rsplit(".", 1)[0] + ".*") + "."
        for row in key_rows(model, prefix, comments, anchors):
            out.append("| " + " | ".join([f"`{row[0]}`", *map(cell, row[1:])]) + " |")
            known.update(other + row[0][len(prefix) - 1 :] if other else row[0] for other in keys or [""])
        out.append("")
    stale = sorted(set(NOTES) - known - set(anchors))
    if stale:
        raise ValueError(f"NOTES names keys that config.py does not have: {', '.join(stale)}")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    page = render()
    if not args.check:
        sys.stdout.write(page)
        return 0
    if PAGE.read_text(encoding="utf-8") != page:
        print(
            f"{PAGE} is stale: run python docs/gen_configuration.py > docs/configuration.md", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
