"""The docs stay true: the site builds with `mkdocs build --strict` (no broken link or anchor), every
relative link of README.md and docs/*.md resolves as GitHub resolves it, docs/configuration.md is what
docs/gen_configuration.py writes from the config models, and docs/results.md lists exactly the
columns of the result schemas."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_configuration", DOCS / "gen_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces as '-'."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {github_anchor(heading) for heading in HEADING.findall(text)}


def relative_links(path: Path) -> list[str]:
    """The link targets of ``path`` outside code, without URLs."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_on_github(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with anchor #{anchor} in {resolved.name})")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: " + "; ".join(broken)


def test_readme_links_into_every_docs_page() -> None:
    linked = {Path(t.partition("#")[0]).name for t in relative_links(ROOT / "README.md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[test]' (make test does)")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_configuration_reference_is_current() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == load_generator().render(), (
        "docs/configuration.md is stale: run python docs/gen_configuration.py > docs/configuration.md"
    )


def test_configuration_reference_has_every_key() -> None:
    from orderlab.config import leaf_keys

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", page, re.MULTILINE))
    missing = sorted(set(leaf_keys()) - documented)
    assert not missing, f"docs/configuration.md has no row for {missing}"


@pytest.mark.parametrize("table", ["trials", "epochs"])
def test_results_page_lists_every_column(table: str) -> None:
    from orderlab.results import TABLES

    page = (DOCS / "results.md").read_text(encoding="utf-8")
    section = page.split(f"## `{table}`\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)
    assert documented == TABLES[table].names, (
        f"docs/results.md's `{table}` table lists {documented}; the schema has {TABLES[table].names}"
    )
