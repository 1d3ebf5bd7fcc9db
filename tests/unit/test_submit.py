"""orderlab.submit without a cluster: addresses, the token lookup, the shipped package, the entrypoint,
and the errors a user gets for an unreachable address or a bad command line."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orderlab import submit
from orderlab.errors import OrderlabError
from orderlab.source import COMMIT_FILE, source_commit

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_jobs_address_adds_http_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv(submit.ADDRESS_ENV, raising=False)
    assert submit.jobs_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    assert submit.jobs_address("https://ray.example.org") == "https://ray.example.org"
    with pytest.raises(OrderlabError, match="--address http://127.0.0.1:8265"):
        submit.jobs_address(None)
    with pytest.raises(OrderlabError, match="Ray Client address"):
        submit.jobs_address("ray://head:10001")
    monkeypatch.setenv(submit.ADDRESS_ENV, "http://head:8265")
    assert submit.jobs_address(None) == "http://head:8265"


def test_only_loopback_addresses_count_as_this_machine():
    for url in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "http://127.1.2.3"):
        assert submit.is_loopback(url), url
    for url in ("http://10.0.0.5:8265", "https://ray.example.org", "http://127.example.org:8265"):
        assert not submit.is_loopback(url), url


def test_auth_token_follows_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default-file\n")
    assert submit.auth_token() == "from-default-file"
    (tmp_path / "token").write_text("from-path-env")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert submit.auth_token() == "from-path-env"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(OrderlabError, match="RAY_AUTH_TOKEN_PATH"):
        submit.auth_token()


def test_staged_package_holds_orderlab_and_its_tasks(tmp_path):
    package = submit.stage_package(tmp_path)
    assert package == tmp_path / "orderlab"
    for module in ("__init__.py", "__main__.py", "cli.py", "sweep.py", "worker.py", "submit.py"):
        assert (package / module).is_file(), module
    assert (package / "orderings" / "__init__.py").is_file()
    assert (package / "tasks" / "__init__.py").is_file() and (package / "tasks" / "digits.py").is_file()
    assert not list(package.rglob("__pycache__"))


def test_staged_package_records_the_commit_it_was_copied_from(tmp_path):
    """The Ray Job imports the staged copy, which is no git checkout: its trials table gets the
    commit from the file staged with it (it recorded None before)."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert source_commit() == head  # this checkout
    package = submit.stage_package(tmp_path)
    assert (package / COMMIT_FILE).read_text() == head + "\n"
    assert source_commit(package) == head
    (package / COMMIT_FILE).unlink()
    assert source_commit(package) is None  # a copy outside any checkout, without the file


def test_a_package_inside_another_repository_has_no_commit(tmp_path):
    """A virtual environment inside a project's checkout holds orderlab in that project's git tree:
    its commit is the project's, not orderlab's."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
         "--allow-empty", "-m", "project"],
        check=True,
    )  # fmt: skip
    package = tmp_path / ".venv" / "lib" / "site-packages" / "orderlab"
    package.mkdir(parents=True)
    assert source_commit(package) is None


def test_entrypoint_quotes_overrides():
    command = submit.entrypoint("tiny.yaml", ["sweep.seed=[0, 1]", "train.lr=0.05"])
    assert shlex.split(command) == [
        "python", "-m", "orderlab", "sweep", "tiny.yaml",
        "--set", "sweep.seed=[0, 1]", "--set", "train.lr=0.05",
    ]  # fmt: skip


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_address_names_it_and_the_fix():
    address = f"http://127.0.0.1:{unused_port()}"
    with pytest.raises(
        OrderlabError, match=rf"cannot reach the Ray Jobs API at {address}.*cluster/local.sh up"
    ):
        submit.job_status(address, "orderlab-tiny-0")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orderlab", "submit", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_needs_exactly_one_of_config_status_logs_stop():
    for args in ([], [str(TINY), "--status", "job"], ["--logs", "a", "--stop", "b"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "exactly one of --status/--logs/--stop" in result.stderr


def test_cli_rejects_a_bad_config_before_contacting_any_cluster():
    result = run_cli(str(TINY), "--address", f"http://127.0.0.1:{unused_port()}", "--set", "train.lr=-1")
    assert result.returncode == 2
    assert "train.lr" in result.stderr and "Traceback" not in result.stderr
