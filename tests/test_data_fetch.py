"""fetch_svhn against a local HTTP server (127.0.0.1 only) that honours Range requests."""

from __future__ import annotations

import io
import re
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from lipdet.data.digitstruct import read_digitstruct
from lipdet.data.fetch import fetch_svhn
from lipdet.data.synth import synthesize
from lipdet.errors import LipdetError


class Server:
    """Serves ``files`` (name -> bytes); records the Range header of every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                start = 0
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1)) if m else 0
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
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/housenumbers"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A tiny train.tar.gz in the official layout (train/1.png ... train/digitStruct.mat)."""
    root = tmp_path_factory.mktemp("src")
    synthesize(root, 6, 0, seed=2, progress=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root / "train", arcname="train")
    return buf.getvalue()


def test_full_download(tmp_path: Path, server: Server, archive: bytes) -> None:
    server.files["train.tar.gz"] = archive
    dest = tmp_path / "svhn"
    assert fetch_svhn(dest, ["train"], base_url=server.url, progress=False) == dest
    assert len(read_digitstruct(dest / "train" / "digitStruct.mat")) == 6
    assert sorted(p.name for p in dest.iterdir()) == ["train"]  # archive and temp folders removed
    assert server.ranges == [None]
    # already present: nothing downloaded again
    fetch_svhn(dest, ["train"], base_url=server.url, progress=False)
    assert len(server.ranges) == 1


def test_resume_from_part(tmp_path: Path, server: Server, archive: bytes) -> None:
    server.files["train.tar.gz"] = archive
    dest = tmp_path / "svhn"
    dest.mkdir()
    half = len(archive) // 2
    (dest / "train.tar.gz.part").write_bytes(archive[:half])
    fetch_svhn(dest, ["train"], base_url=server.url, progress=False)
    assert server.ranges == [f"bytes={half}-"]
    assert len(read_digitstruct(dest / "train" / "digitStruct.mat")) == 6


def test_complete_part_gets_416(tmp_path: Path, server: Server, archive: bytes) -> None:
    server.files["train.tar.gz"] = archive
    dest = tmp_path / "svhn"
    dest.mkdir()
    (dest / "train.tar.gz.part").write_bytes(archive)
    fetch_svhn(dest, ["train"], base_url=server.url, progress=False)
    assert (dest / "train" / "digitStruct.mat").is_file()


def test_env_url(tmp_path: Path, server: Server, archive: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["train.tar.gz"] = archive
    monkeypatch.setenv("LIPDET_SVHN_URL", server.url)
    fetch_svhn(tmp_path, ["train"], progress=False)
    assert (tmp_path / "train" / "digitStruct.mat").is_file()


def test_corrupt_archive(tmp_path: Path, server: Server) -> None:
    server.files["train.tar.gz"] = np.random.default_rng(0).bytes(5000)
    with pytest.raises(LipdetError) as e:
        fetch_svhn(tmp_path, ["train"], base_url=server.url, progress=False)
    part = tmp_path / "train.tar.gz.part"
    assert str(part) in e.value.message and "corrupt" in e.value.message and e.value.exit_code == 2
    assert not part.exists() and not (tmp_path / "train").exists()  # deleted, so a rerun starts afresh


def test_truncated_gzip_is_corrupt(tmp_path: Path, server: Server, archive: bytes) -> None:
    server.files["train.tar.gz"] = archive[: len(archive) - 40]
    with pytest.raises(LipdetError, match="corrupt"):
        fetch_svhn(tmp_path, ["train"], base_url=server.url, progress=False)


def test_archive_without_digitstruct(tmp_path: Path, server: Server) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("train/1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    server.files["train.tar.gz"] = buf.getvalue()
    with pytest.raises(LipdetError, match="no train/digitStruct.mat"):
        fetch_svhn(tmp_path, ["train"], base_url=server.url, progress=False)


def test_path_traversal_refused(tmp_path: Path, server: Server) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("train/digitStruct.mat", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    server.files["train.tar.gz"] = buf.getvalue()
    dest = tmp_path / "svhn"
    with pytest.raises(LipdetError, match="unsafe archive member"):
        fetch_svhn(dest, ["train"], base_url=server.url, progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_http_404(tmp_path: Path, server: Server) -> None:
    with pytest.raises(LipdetError, match=r"test\.tar\.gz: download failed \(HTTP 404") as e:
        fetch_svhn(tmp_path, ["test"], base_url=server.url, progress=False)
    assert "\n" not in e.value.message


def test_connection_refused(tmp_path: Path) -> None:
    s = Server()
    url = s.url
    s.close()  # nothing listens there any more
    with pytest.raises(LipdetError, match="download failed") as e:
        fetch_svhn(tmp_path, ["train"], base_url=url, progress=False)
    assert url in e.value.message


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(LipdetError, match="unknown SVHN split"):
        fetch_svhn(tmp_path, ["valid"], base_url="http://127.0.0.1:9", progress=False)
