"""orderlab.data and `orderlab data`: downloads against a loopback HTTP server (never the internet).

The server serves files from tmp_path, honours (or, when told, ignores) ``Range: bytes=N-``, can cut a
body short, and records every request's path and Range header.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orderlab.cli import main
from orderlab.data import (
    PART_SUFFIX,
    DataFile,
    check_files,
    download_file,
    fetch_files,
    format_status_table,
    git_blob_sha1,
    verify_file,
)
from orderlab.errors import OrderlabError
from orderlab.tasks.files import FILES

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: _LoopbackServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        body, start = path.read_bytes(), 0
        wanted = self.headers.get("Range")
        if wanted and self.server.honor_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        cut = self.server.cut_after.pop(self.path, None)
        self.wfile.write(rest if cut is None else rest[:cut])  # HTTP/1.0: the connection closes after

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


class _LoopbackServer(ThreadingHTTPServer):
    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.honor_range = True
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection closes (once)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "payload.bin").write_bytes(PAYLOAD)
    loopback = _LoopbackServer(root)
    thread = threading.Thread(target=loopback.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield loopback
    loopback.shutdown()
    loopback.server_close()
    thread.join()


def payload_file(server: _LoopbackServer, *urls: str) -> DataFile:
    return DataFile(
        "demo/payload.bin",
        PAYLOAD_SHA256,
        urls or (server.url("payload.bin"),),
        "the demo mirror (example.org)",
    )


def quiet(_: str) -> None:
    pass


def test_download_verifies_and_renames_atomically(server, tmp_path):
    data_dir = tmp_path / "data"
    path = download_file(payload_file(server), data_dir, log=quiet)
    assert path == data_dir / "demo/payload.bin" and path.read_bytes() == PAYLOAD
    assert not (data_dir / ("demo/payload.bin" + PART_SUFFIX)).exists()
    assert server.requests == [("/payload.bin", None)]


def test_a_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    data_dir = tmp_path / "data"
    part = data_dir / ("demo/payload.bin" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:40_000])
    download_file(payload_file(server), data_dir, log=quiet)
    assert server.requests == [("/payload.bin", "bytes=40000-")]
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD and not part.exists()


def test_a_server_ignoring_range_restarts_the_download(server, tmp_path):
    server.honor_range = False
    data_dir = tmp_path / "data"
    part = data_dir / ("demo/payload.bin" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:40_000])
    download_file(payload_file(server), data_dir, log=quiet)
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD  # 200: rewritten, not appended


def test_an_interrupted_download_leaves_no_final_file_and_resumes_next_time(server, tmp_path):
    data_dir = tmp_path / "data"
    server.cut_after["/payload.bin"] = 30_000
    with pytest.raises(OrderlabError, match="payload.bin") as failure:
        download_file(payload_file(server), data_dir, log=quiet)
    assert "30000 of 102400 bytes" in str(failure.value) and PAYLOAD_SHA256 in str(failure.value)
    final, part = data_dir / "demo/payload.bin", data_dir / ("demo/payload.bin" + PART_SUFFIX)
    assert not final.exists() and part.read_bytes() == PAYLOAD[:30_000]
    download_file(payload_file(server), data_dir, log=quiet)
    assert server.requests[-1] == ("/payload.bin", "bytes=30000-")
    assert final.read_bytes() == PAYLOAD and not part.exists()


def test_a_complete_part_answered_416_is_verified_and_kept(server, tmp_path):
    data_dir = tmp_path / "data"
    part = data_dir / ("demo/payload.bin" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    download_file(payload_file(server), data_dir, log=quiet)
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD


def test_a_corrupt_resumed_part_is_downloaded_again_from_scratch(server, tmp_path):
    data_dir = tmp_path / "data"
    part = data_dir / ("demo/payload.bin" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # wrong bytes: the resumed file fails its checksum
    download_file(payload_file(server), data_dir, log=quiet)
    assert [header for _, header in server.requests] == ["bytes=1000-", None]
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_names_file_checksum_and_source_and_leaves_nothing(server, tmp_path):
    (server.root / "payload.bin").write_bytes(PAYLOAD[:-1] + b"!")
    data_dir = tmp_path / "data"
    with pytest.raises(OrderlabError) as failure:
        download_file(payload_file(server), data_dir, log=quiet)
    message = str(failure.value)
    assert "demo/payload.bin" in message and PAYLOAD_SHA256 in message and "corrupt" in message
    assert "example.org" in message and server.url("payload.bin") in message
    assert not (data_dir / "demo/payload.bin").exists()
    assert not (data_dir / ("demo/payload.bin" + PART_SUFFIX)).exists()


def test_404_names_the_url_and_the_next_mirror_is_tried(server, tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(OrderlabError) as failure:
        download_file(payload_file(server, server.url("absent.bin")), data_dir, log=quiet)
    message = str(failure.value)
    assert "HTTP 404" in message and server.url("absent.bin") in message and PAYLOAD_SHA256 in message
    assert "example.org" in message and not (data_dir / "demo/payload.bin").exists()
    download_file(
        payload_file(server, server.url("absent.bin"), server.url("payload.bin")), data_dir, log=quiet
    )
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD


def test_unreachable_host_is_a_clean_error(tmp_path):
    closed = DataFile("demo/x.bin", PAYLOAD_SHA256, ("http://127.0.0.1:9/x.bin",), "somewhere")
    with pytest.raises(OrderlabError, match="network error|ConnectionRefused"):
        download_file(closed, tmp_path, timeout_seconds=5, log=quiet)


def test_fetch_skips_verified_files_replaces_corrupt_ones_and_honours_alternatives(server, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "demo").mkdir(parents=True)
    (data_dir / "demo/payload.bin").write_bytes(b"corrupt")
    (data_dir / "demo/labels.npz").write_bytes(b"labels")
    labels = DataFile("demo/labels.npz", hashlib.sha256(b"labels").hexdigest(), (), "shared data")
    labels_pt = replace(payload_file(server), relative="demo/labels.pt", alternative_to="demo/labels.npz")
    optional = DataFile("demo/optional.npz", None, (), "generated offline", optional=True)
    lines: list[str] = []
    paths = fetch_files([payload_file(server), labels, labels_pt, optional], data_dir, log=lines.append)
    assert paths == [data_dir / "demo/payload.bin", data_dir / "demo/labels.npz"]
    assert (data_dir / "demo/payload.bin").read_bytes() == PAYLOAD  # the corrupt copy was replaced
    assert not (data_dir / "demo/labels.pt").exists()  # its alternative was already there
    assert len(server.requests) == 1 and any("skipped" in line for line in lines)
    fetch_files([payload_file(server)], data_dir, log=quiet)
    assert len(server.requests) == 1  # verified: nothing downloaded again


def test_fetch_reports_what_cannot_be_downloaded_after_fetching_the_rest(server, tmp_path):
    features = DataFile("demo/features.npz", None, (), "there is no public copy; provide your own")
    with pytest.raises(OrderlabError, match="features.npz: not downloadable; there is no public copy"):
        fetch_files([features, payload_file(server)], tmp_path, log=quiet)
    assert (tmp_path / "demo/payload.bin").read_bytes() == PAYLOAD


def test_verify_and_check_statuses(tmp_path):
    good = DataFile("a.bin", hashlib.sha256(b"a").hexdigest(), (), "the a mirror")
    blob = DataFile("b.pt", None, (), "the b repo", git_blob_sha1=hashlib.sha1(b"blob 1\0b").hexdigest())
    loose = DataFile("c.npz", None, (), "the user")
    missing = DataFile(
        "d.bin", hashlib.sha256(b"d").hexdigest(), ("http://example.org/d.bin",), "example.org"
    )
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "b.pt").write_bytes(b"b")
    (tmp_path / "c.npz").write_bytes(b"c")
    assert git_blob_sha1(tmp_path / "b.pt") == blob.git_blob_sha1
    rows = check_files([good, blob, loose, missing], tmp_path)
    assert [status for _, status in rows] == ["ok", "ok", "unverified", "missing"]
    (tmp_path / "a.bin").write_bytes(b"not a")
    assert check_files([good], tmp_path)[0][1] == "corrupt"
    table = format_status_table(check_files([good, missing], tmp_path), {"a.bin": ["task-x"]})
    assert table.splitlines()[0].split() == ["file", "status", "tasks"]
    assert table.splitlines()[1].split() == ["a.bin", "corrupt", "task-x"]
    with pytest.raises(OrderlabError, match=r"corrupt: sha256 .* != expected") as corrupt:
        verify_file(tmp_path, good)
    assert "the a mirror" in str(corrupt.value)
    with pytest.raises(OrderlabError) as absent:
        verify_file(tmp_path, missing)
    message = str(absent.value)
    assert "d.bin" in message and missing.sha256 in message and "example.org" in message
    assert "orderlab data fetch" in message


def test_every_table_entry_has_a_checksum_or_says_why_not():
    for file in FILES.values():
        assert file.sha256 or file.git_blob_sha1 or not file.urls, file.relative
        assert file.source, file.relative
        assert all(url.startswith(("https://", "http://")) for url in file.urls)


def test_cli_data_fetch_and_check_with_a_loopback_mirror(server, tmp_path, monkeypatch, capsys, data_dir):
    digits = FILES["sklearn/digits.csv.gz"]
    shutil.copy(data_dir / digits.relative, server.root / "digits.csv.gz")
    monkeypatch.setitem(FILES, digits.relative, replace(digits, urls=(server.url("digits.csv.gz"),)))
    target = tmp_path / "data"
    assert main(["data", "fetch", "digits-logreg", "--data-dir", str(target)]) == 0
    assert (target / digits.relative).is_file() and server.requests == [("/digits.csv.gz", None)]
    assert main(["data", "check", "digits-logreg", "--data-dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert "sklearn/digits.csv.gz" in out and " ok " in out
    (target / digits.relative).write_bytes(b"garbage")
    assert main(["data", "check", "--data-dir", str(target)]) == 2
    captured = capsys.readouterr()
    assert "corrupt" in captured.out and str(target / digits.relative) in captured.err


def test_cli_data_errors_exit_2(tmp_path, capsys, data_dir):
    assert main(["data", "fetch", "no-such-task", "--data-dir", str(tmp_path)]) == 2
    assert "mnist-logreg" in capsys.readouterr().err
    labels = "hmda/targets-processed-NY-2017.npz"  # present, so no download is attempted
    (tmp_path / "hmda").mkdir()
    shutil.copy(data_dir / labels, tmp_path / labels)
    assert main(["data", "fetch", "hmda-logreg", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "features-processed-NY-2017.npz" in err and "no public copy" in err and "Traceback" not in err


def known_file(monkeypatch, data_dir: Path, relative: str) -> Path:
    """Write PAYLOAD as table entry ``relative``, whose checksum becomes PAYLOAD's (for this test)."""
    monkeypatch.setitem(FILES, relative, replace(FILES[relative], sha256=PAYLOAD_SHA256, also_accepted=()))
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / relative).write_bytes(PAYLOAD)
    return data_dir / relative


def statuses(out: str) -> dict[str, str]:
    """File -> status from the table `orderlab data check` prints after its data-directory line."""
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}


def test_data_check_of_a_task_fails_when_a_file_it_needs_is_missing(tmp_path, monkeypatch, capsys):
    assert main(["data", "check", "digits-logreg", "--data-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert statuses(captured.out) == {"sklearn/digits.csv.gz": "missing"}
    assert "task digits-logreg needs data files that are missing" in captured.err
    assert str(tmp_path / "sklearn/digits.csv.gz") in captured.err and "orderlab data fetch" in captured.err
    known_file(monkeypatch, tmp_path, "sklearn/digits.csv.gz")
    assert main(["data", "check", "digits-logreg", "--data-dir", str(tmp_path)]) == 0
    assert statuses(capsys.readouterr().out) == {"sklearn/digits.csv.gz": "ok"}


def test_data_check_of_a_task_fails_on_a_corrupt_file(tmp_path, capsys):
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn/digits.csv.gz").write_bytes(b"garbage")
    assert main(["data", "check", "digits-logreg", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "corrupt data files" in err and "missing" not in err


def test_data_check_of_a_task_accepts_alternatives_and_skips_optional_files(tmp_path, monkeypatch, capsys):
    assert main(["data", "check", "mnist1d-logreg", "--data-dir", str(tmp_path)]) == 0  # generated offline
    assert statuses(capsys.readouterr().out) == {"mnist1d/mnist1d_data.npz": "missing"}
    known_file(monkeypatch, tmp_path, "hmda/targets-processed-NY-2017.pt")  # the .npz's alternative
    assert main(["data", "check", "hmda-logreg", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    features = f"{tmp_path / 'hmda/features-processed-NY-2017.npz'} or {tmp_path / 'hmda/features-processed-NY-2017.pt'}"
    assert f"missing: {features};" in err and "targets" not in err
    (tmp_path / "hmda/features-processed-NY-2017.npz").write_bytes(b"no checksum known: unverified")
    assert main(["data", "check", "hmda-logreg", "--data-dir", str(tmp_path)]) == 0


def test_data_check_of_every_file_fails_only_on_corrupt_ones(tmp_path, capsys):
    assert main(["data", "check", "--data-dir", str(tmp_path)]) == 0
    assert statuses(capsys.readouterr().out) == dict.fromkeys(FILES, "missing")
    (tmp_path / "m4").mkdir()
    (tmp_path / "m4/Weekly-test.csv").write_text("garbage")
    assert main(["data", "check", "--data-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "m4/Weekly-test.csv") in capsys.readouterr().err


def test_data_check_exit_status_reaches_the_shell(tmp_path):
    command = [sys.executable, "-m", "orderlab", "data", "check"]
    missing = subprocess.run(
        [*command, "m4-mlp", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith("orderlab: error: task m4-mlp needs")
    assert "Traceback" not in missing.stderr
    everything = subprocess.run([*command, "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert everything.returncode == 0, everything.stderr


@pytest.mark.parametrize("command", ["fetch", "check"])
def test_data_help_shows_an_example(command, capsys):
    assert main(["data", command, "--help"]) == 0
    assert "Example: orderlab data" in capsys.readouterr().out
