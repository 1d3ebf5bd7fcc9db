"""requirements/constraints.txt, which every `make` install takes: exact pins only, none of them
orderlab itself (a `orderlab @ file:///...` line names the locking machine's checkout and makes
pip's resolution impossible on any other clone), and a pin for every package pyproject.toml asks
for, inside pyproject.toml's range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)$")


def requirement_lines() -> list[str]:
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pins() -> dict[str, str]:
    return {canonicalize_name(m["name"]): m["version"] for m in map(PIN.match, requirement_lines()) if m}


def test_every_line_is_an_exact_pin_of_another_package():
    bad = [line for line in requirement_lines() if not PIN.match(line)]
    assert not bad, f"not of the form name==version: {bad}"
    assert "orderlab" not in pins()


def test_every_pyproject_requirement_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("search", "tracking", "test"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pinned = pins()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} has no pin: run `make lock LOCK_ARGS=`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{requirement.name}=={pinned[name]} is outside pyproject.toml's {requirement.specifier}"
        )
