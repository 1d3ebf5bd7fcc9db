"""`storage: s3://...` end to end against an S3-compatible server on loopback (moto in server mode):
Tune's state, Train's checkpoints and our Parquet tables all land in the bucket, and the results
are queried from there.

The URI carries the endpoint in its query string, as any pyarrow S3 option may
(``s3://bucket/prefix?endpoint_override=127.0.0.1:PORT&scheme=http``). The run happens in a
subprocess with its own embedded Ray, so that every Ray worker inherits the AWS_* credentials
(as every node of a cloud cluster has its instance credentials).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from orderlab import results
from orderlab.sweep import storage_location

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
BUCKET = "orderlab"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service for credentials
}


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A fresh S3 server on 127.0.0.1 with one empty bucket; yields ``host:port``."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    try:
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(
            BUCKET
        )
        yield endpoint
    finally:
        server.stop()


def test_storage_location_keeps_uri_options_out_of_paths():
    filesystem, path = storage_location(f"s3://{BUCKET}/runs/?endpoint_override=127.0.0.1:9&scheme=http")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == f"{BUCKET}/runs"
    local_filesystem, local_path = storage_location("results/x")
    assert local_filesystem is None and local_path == str(Path("results/x").resolve())


def test_run_on_s3_storage_writes_and_queries_results(s3_endpoint, tmp_path):
    storage = f"s3://{BUCKET}/runs?endpoint_override={s3_endpoint}&scheme=http"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    run = subprocess.run(
        [
            sys.executable, "-m", "orderlab", "run", str(TINY),
            "--set", f"storage={storage}", "--set", "ordering.name=cd-grab", "--set", "train.epochs=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing went to the local disk instead

    con = results.connect(storage)
    trials = con.sql("SELECT ordering, status, num_workers FROM trials").df()
    assert trials.to_dict("records") == [{"ordering": "cd-grab", "status": "completed", "num_workers": 2}]
    assert con.sql("SELECT count(*) FROM epochs").fetchall() == [(2,)]

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    files = [
        info.path
        for info in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs", recursive=True))
        if info.type == pafs.FileType.File
    ]
    assert any(path.startswith(f"{BUCKET}/runs/_tune/tiny/") for path in files)  # Tune's state
    checkpoints = [path for path in files if path.startswith(f"{BUCKET}/runs/_train/tiny/")]
    assert any(path.endswith("/checkpoint.pt") for path in checkpoints)  # Train's checkpoints
    # The sweep's end compacted the results in the bucket: one part per table, no row files left.
    tables = [path for path in files if "/_tune/" not in path and "/_train/" not in path]
    assert sorted(path.split("/")[3] for path in tables if path.endswith(".parquet")) == ["epochs", "trials"]
    assert all(path.startswith(f"{BUCKET}/runs/compacted/") for path in tables if path.endswith(".parquet"))
    # A rewritten epoch after compaction wins over the part; compacting again keeps one row per key.
    results.write_epoch(storage, {"trial_id": trials_id(con), "sweep": "tiny", "epoch": 1, "train_loss": 9.0})
    assert results.connect(storage).sql(
        "SELECT epoch, train_loss = 9.0 FROM epochs ORDER BY 1"
    ).fetchall() == [
        (0, False),
        (1, True),
    ]
    assert results.compact(storage).rows == {"trials": 0, "epochs": 2}  # trials: already one part
    assert results.connect(storage).sql("SELECT count(*), max(train_loss) FROM epochs").fetchall() == [
        (2, 9.0)
    ]


def trials_id(con) -> str:
    return con.sql("SELECT trial_id FROM trials").fetchall()[0][0]
