"""``orderlab submit``: run a sweep on a Ray cluster as a Ray Job, through the head's Jobs API.

The job's ``runtime_env`` carries everything the cluster needs from this machine:

- ``py_modules``: the orderlab package as this client imports it, with ``orderlab.tasks`` inside
  (copied into a temporary directory; Ray zips and uploads it, and puts it first on every job
  process's ``PYTHONPATH``, so it wins over an orderlab installed on the nodes);
- ``working_dir``: a temporary directory holding only the experiment YAML;
- ``env_vars``: ``ORDERLAB_DATA`` when it is set here and the cluster runs on this machine.

The entrypoint is ``python -m orderlab sweep <config> --set ...`` and runs on the head in the
head's environment, whose Python must have orderlab's dependencies (torch, ray, pydantic, ...).

Why not a wheel in ``py_modules``: Ray installs a py_modules wheel with ``pip install --target``
*with* its dependencies, which would put a second ray and torch (about 80 packages) in front of the
cluster's own on every node.

Token authentication: every request carries ``Authorization: Bearer <token>``, the token found the
way Ray finds it (``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``). Ray's own client adds it only when ``RAY_AUTH_MODE=token`` is set here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from orderlab.config import Overrides, load_config, validate_grid
from orderlab.errors import OrderlabError
from orderlab.source import COMMIT_FILE, source_commit

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

#: job states after which nothing changes (ray.job_submission.JobStatus)
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
#: the environment variable that gives the Jobs API address when --address is not given
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
_FIX_ADDRESS = (
    "start a cluster (cluster/local.sh up) or pass the head's dashboard address, "
    "e.g. --address http://127.0.0.1:8265 (on a cloud cluster: `ray dashboard cluster/aws.yaml` first)"
)


@dataclass(frozen=True)
class Submission:
    """A submitted sweep job.

    Attributes:
        job_id: the Ray Jobs submission id. address: the Jobs API it was sent to.
        status: the final state (SUCCEEDED, FAILED, STOPPED) when waited for, else None.
    """

    job_id: str
    address: str
    status: str | None


def jobs_address(address: str | None) -> str:
    """The Jobs API URL: ``address`` (``http://`` added when it has no scheme), else ``RAY_API_SERVER_ADDRESS``.

    Raises:
        OrderlabError: neither is given, or the address is a Ray Client (``ray://``) address.
    """
    chosen = address or os.environ.get(ADDRESS_ENV)
    if not chosen:
        raise OrderlabError(f"no Ray Jobs address; {_FIX_ADDRESS} (or set {ADDRESS_ENV})")
    if chosen.startswith("ray://"):
        raise OrderlabError(f"--address={chosen!r} is a Ray Client address; {_FIX_ADDRESS}")
    return (chosen if "://" in chosen else f"http://{chosen}").rstrip("/")


def is_loopback(url: str) -> bool:
    """Whether the Jobs API ``url`` is on this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or re.fullmatch(r"127(\.\d{1,3}){3}", host) is not None


def auth_token() -> str | None:
    """This client's Ray token, looked up in Ray's order; None when there is none.

    Raises:
        OrderlabError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_env).expanduser() if path_env else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if path_env:
            raise OrderlabError(
                f"RAY_AUTH_TOKEN_PATH={path_env!r} does not exist; point it at the cluster's token file"
            ) from None
        return None
    except OSError as exc:
        raise OrderlabError(
            f"cannot read the Ray token file {str(path)!r} ({exc}); fix its permissions"
        ) from exc


@contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while a client is built: Ray's client prefers them over
    its ``address`` argument, and RAY_ADDRESS usually names a GCS address (``orderlab sweep``)."""
    saved = {name: os.environ.pop(name) for name in ("RAY_ADDRESS", ADDRESS_ENV) if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A Jobs API client for ``address`` (see ``jobs_address``) and the URL it talks to.

    Raises:
        OrderlabError: the address is unreachable or rejects this client's token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=headers), url
    except ConnectionError as exc:
        raise OrderlabError(f"cannot reach the Ray Jobs API at {url} ({exc}); {_FIX_ADDRESS}") from exc
    except AuthenticationError as exc:
        raise OrderlabError(
            f"the Ray cluster at {url} rejected this client's token ({str(exc).splitlines()[0]}); set "
            "RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head, or the KubeRay secret)"
        ) from exc


@contextmanager
def _known_job(url: str, job_id: str) -> Iterator[None]:
    """Turn the Jobs API's 'request failed' errors about ``job_id`` into an OrderlabError."""
    try:
        yield
    except RuntimeError as exc:
        raise OrderlabError(
            f"job {job_id!r} on {url}: {exc}; list the cluster's jobs with `ray job list --address {url}`"
        ) from exc


def job_status(address: str | None, job_id: str) -> str:
    """The job's current state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.

    Raises:
        OrderlabError: unreachable address, rejected token, or a job id the cluster does not know.
    """
    client, url = connect(address)
    with _known_job(url, job_id):
        return str(client.get_job_status(job_id))


def job_logs(address: str | None, job_id: str) -> str:
    """Everything the job's entrypoint has printed so far.

    Raises:
        OrderlabError: unreachable address, rejected token, or a job id the cluster does not know.
    """
    client, url = connect(address)
    with _known_job(url, job_id):
        return client.get_job_logs(job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended.

    Raises:
        OrderlabError: unreachable address, rejected token, or a job id the cluster does not know.
    """
    client, url = connect(address)
    with _known_job(url, job_id):
        return client.stop_job(job_id)


def stage_package(directory: Path) -> Path:
    """Copy the orderlab package this process imports, with ``orderlab.tasks`` inside, to ``directory/orderlab``.

    Works for a source checkout (``tasks/`` mapped to ``orderlab.tasks``) and an installed wheel alike.
    The git commit of the source, when it has one, goes into the copy's ``COMMIT_FILE``.
    """
    import orderlab
    import orderlab.tasks

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    source = Path(orderlab.__path__[0])
    package = directory / "orderlab"
    shutil.copytree(source, package, ignore=ignore)
    shutil.copytree(Path(orderlab.tasks.__path__[0]), package / "tasks", ignore=ignore, dirs_exist_ok=True)
    commit = source_commit(source)
    if commit is not None:  # the trials table of the job's sweep records it (the copy is no checkout)
        (package / COMMIT_FILE).write_text(commit + "\n")
    return package


def entrypoint(config_name: str, overrides: list[str]) -> str:
    """The job's shell command: ``python -m orderlab sweep CONFIG --set K=V ...``, quoted."""
    words = ["python", "-m", "orderlab", "sweep", config_name]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def _override_list(overrides: Overrides | None) -> list[str]:
    """``--set`` strings from a list of ``K=V`` strings or a mapping (values as JSON, which is YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return [overrides] if isinstance(overrides, str) else [str(item) for item in overrides]


def submit(
    config: str | Path,
    overrides: Overrides | None = None,
    *,
    address: str | None = None,
    wait: bool = True,
    out: TextIO | None = None,
) -> Submission:
    """Submit CONFIG's sweep as a Ray Job; with ``wait``, stream its logs to ``out`` until it ends.

    The config and its overrides are validated here first. A ``storage`` that is a local path is
    made absolute here (it must be a directory every node sees: same machine or shared filesystem);
    a URI (``s3://``, ``gs://``) is passed through. Local paths of this machine mean something on
    the cluster only when it runs here too: ``ORDERLAB_DATA`` is passed on to the job only for a
    loopback address (a remote cluster's nodes set their own, see cluster/aws.yaml).

    Args:
        config: the experiment YAML. overrides: dotted ``K=V`` strings or a mapping, as for ``sweep``.
        address: the head's Jobs API, ``http://HOST:8265`` (default ``RAY_API_SERVER_ADDRESS``).
        wait: follow the job until SUCCEEDED, FAILED or STOPPED. out: where logs go (default stdout).

    Returns:
        The job id, the address, and the final state when ``wait`` (else None).

    Raises:
        OrderlabError: an invalid config, an unreachable address or a rejected token.
    """
    out = out or sys.stdout
    path = Path(config)
    cfg = load_config(path, overrides)
    validate_grid(cfg)
    settings = _override_list(overrides)
    local_storage = "://" not in cfg.storage
    if local_storage and not Path(cfg.storage).expanduser().is_absolute():
        settings.append(f"storage={Path(cfg.storage).expanduser().resolve()}")
    client, url = connect(address)
    on_this_machine = is_loopback(url)
    if local_storage and not on_this_machine:
        print(
            f"note: storage={cfg.storage!r} is a local path: every node of the cluster at {url} must see it "
            "(a shared filesystem); use --set storage=s3://... or gs://... otherwise",
            file=out,
        )
    data_dir = os.environ.get("ORDERLAB_DATA")
    env_vars = {"ORDERLAB_DATA": data_dir} if data_dir and on_this_machine else {}
    with tempfile.TemporaryDirectory(prefix="orderlab-submit-") as staging:
        job_dir, modules_dir = Path(staging, "job"), Path(staging, "modules")
        job_dir.mkdir()
        modules_dir.mkdir()
        shutil.copyfile(path, job_dir / path.name)
        runtime_env: dict[str, Any] = {
            "working_dir": str(job_dir),
            "py_modules": [str(stage_package(modules_dir))],
            "env_vars": env_vars,
        }
        job_id = client.submit_job(
            entrypoint=entrypoint(path.name, settings),
            submission_id=f"orderlab-{cfg.name}-{secrets.token_hex(4)}",
            runtime_env=runtime_env,
            metadata={"orderlab_sweep": cfg.name, "orderlab_config": path.name},
        )
    print(f"job {job_id} submitted to {url}", file=out, flush=True)
    if not wait:
        print(
            f"follow it: orderlab submit --logs {job_id} --address {url}   (--status, --stop likewise)",
            file=out,
            flush=True,
        )
        return Submission(job_id, url, None)
    try:
        status = follow(client, job_id, out)
    except KeyboardInterrupt:
        print(
            f"\njob {job_id} keeps running; stop it with: orderlab submit --stop {job_id} --address {url}",
            file=out,
        )
        raise
    print(f"job {job_id} {status}", file=out, flush=True)
    return Submission(job_id, url, status)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO) -> str:
    """Stream the job's logs to ``out`` until the stream closes, then return its final state."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the job ends; its state may be written a moment later.
    while (status := str(client.get_job_status(job_id))) not in TERMINAL_STATES:
        time.sleep(0.5)
    return status
