"""The ``lipdet data`` typer sub-app: synth, show, fetch svhn; bad input -> LipdetError, exit 2."""

from __future__ import annotations

import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lipdet.data.cli import app
from lipdet.data.digitstruct import read_digitstruct
from lipdet.errors import LipdetError

runner = CliRunner()


def invoke(args: list[str]) -> tuple[int, str, BaseException | None]:
    """Run the sub-app the way the top-level ``lipdet`` does: a LipdetError becomes its exit code."""
    result = runner.invoke(app, [str(a) for a in args])
    if isinstance(result.exception, LipdetError):
        return result.exception.exit_code, result.exception.message, result.exception
    return result.exit_code, result.output, result.exception


@pytest.fixture(autouse=True)
def _cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPDET_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    code, output, exc = invoke(["synth", out, "--train", 8, "--test", 6, "--seed", 4])
    assert code == 0, (output, exc)
    return out


def test_synth(synth_dir: Path) -> None:
    assert len(read_digitstruct(synth_dir / "train" / "digitStruct.mat")) == 8
    assert len(read_digitstruct(synth_dir / "test" / "digitStruct.mat")) == 6


def test_synth_output_names_folders(tmp_path: Path) -> None:
    code, output, _ = invoke(["synth", tmp_path / "s", "--train", 2, "--test", 0])
    assert code == 0 and f"{tmp_path / 's' / 'train'}: 2 images" in output
    assert not (tmp_path / "s" / "test").exists()


def test_synth_bad_input(tmp_path: Path) -> None:
    code, msg, _ = invoke(["synth", tmp_path / "s", "--train", 0, "--test", 0])
    assert code == 2 and str(tmp_path / "s") in msg
    afile = tmp_path / "file"
    afile.write_text("x")
    code, msg, _ = invoke(["synth", afile, "--train", 1])
    assert code == 2 and str(afile) in msg
    code, _, _ = invoke(["synth", tmp_path / "s", "--train", -3])
    assert code == 2  # click's own usage error


def test_show_writes_png(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    code, output, exc = invoke(["show", synth_dir, "--split", "test", "--n", 4, "--out", out, "--input-size", 40])
    assert code == 0, (output, exc)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * (80 + 4) + 4, 2 * (80 + 4) + 4)


@pytest.mark.parametrize(
    "breakage",
    ["missing folder", "not svhn", "missing split", "corrupt mat", "missing image", "unreadable image"],
)
def test_show_bad_input(synth_dir: Path, tmp_path: Path, breakage: str) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    split = "test"
    if breakage == "missing folder":
        culprit = tmp_path / "absent"
        data = culprit
    elif breakage == "not svhn":
        culprit = tmp_path / "plain"
        culprit.mkdir()
        data = culprit
    elif breakage == "missing split":
        split = "extra"
        culprit = data / "extra"
    elif breakage == "corrupt mat":
        culprit = data / "test" / "digitStruct.mat"
        culprit.write_bytes(np.random.default_rng(0).bytes(3000))
    elif breakage == "missing image":
        culprit = data / "test" / "3.png"
        culprit.unlink()
    else:
        culprit = data / "test" / "3.png"
        culprit.write_bytes(b"\x89PNG garbage")
    code, msg, exc = invoke(["show", data, "--split", split, "--out", tmp_path / "g.png"])
    assert isinstance(exc, LipdetError) and code == 2
    assert str(culprit) in msg and "\n" not in msg
    assert not (tmp_path / "g.png").exists()


def test_fetch_svhn(synth_dir: Path, tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    with tarfile.open(served / "test.tar.gz", "w:gz") as tar:
        tar.add(synth_dir / "test", arcname="test")
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        dest = tmp_path / "svhn"
        code, output, exc = invoke(["fetch", "svhn", dest, "--splits", "test", "--url", url])
        assert code == 0, (output, exc)
        assert len(read_digitstruct(dest / "test" / "digitStruct.mat")) == 6
        code, msg, _ = invoke(["fetch", "svhn", dest, "--splits", "train", "--url", url])
        assert code == 2 and "train.tar.gz" in msg and "404" in msg
        code, msg, _ = invoke(["fetch", "svhn", dest, "--splits", "bogus", "--url", url])
        assert code == 2 and "bogus" in msg
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_help_has_examples() -> None:
    for cmd in (["synth"], ["show"], ["fetch", "svhn"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0 and "Example" in result.output and "lipdet data" in result.output


def test_top_level_wrapper_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the lead's ``lipdet`` entry point, if present: one ``error:`` line, exit 2."""
    cli = pytest.importorskip("lipdet.cli")
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "show", str(tmp_path / "absent"), "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'absent'}: data folder not found"]
