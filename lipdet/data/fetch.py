"""Download and unpack the official SVHN format-1 archives (``train.tar.gz``, ``test.tar.gz``, ...).

Downloads go to ``dest/<split>.tar.gz.part`` and resume from its size with an HTTP ``Range``
request when run again. A finished archive is checked (gzip CRC and tar structure, by reading it
through, and that it holds ``<split>/digitStruct.mat``), unpacked into a temporary folder beside
``dest/<split>`` with every member path checked to stay inside it, renamed into place, and deleted.
The base URL comes from the ``base_url`` argument, else ``$LIPDET_SVHN_URL``, else the official site.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lipdet.errors import LipdetError

__all__ = ["DEFAULT_URL", "SPLITS", "fetch_svhn"]

DEFAULT_URL = "http://ufldl.stanford.edu/housenumbers"
SPLITS = ("train", "test", "extra")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("LIPDET_SVHN_URL") or DEFAULT_URL).rstrip("/")


def fetch_svhn(
    dest: Path,
    splits: Sequence[str] = ("train", "test"),
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download SVHN format 1 into ``dest/<split>/`` (PNGs + ``digitStruct.mat``).

    Splits already unpacked are skipped; an interrupted download resumes.

    Args:
        dest: folder to fill (created).
        splits: any of ``train``, ``test``, ``extra``.
        base_url: where ``<split>.tar.gz`` live (default ``$LIPDET_SVHN_URL`` or the official site).
        progress: show a tqdm bar per download on stderr.

    Returns:
        ``dest``.

    Raises:
        LipdetError: unknown split, network failure, corrupt or unexpected archive.
    """
    dest = Path(dest)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise LipdetError(f"unknown SVHN split(s) {','.join(bad) or '(none)'}: choose from {','.join(SPLITS)}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LipdetError(f"{dest}: cannot create folder ({exc.strerror})") from None
    url = _base_url(base_url)
    for split in splits:
        if (dest / split / "digitStruct.mat").is_file():
            if progress:
                print(f"{dest / split}: already present, skipping", file=sys.stderr)
            continue
        archive = dest / f"{split}.tar.gz"
        if not archive.is_file():
            part = dest / f"{split}.tar.gz.part"
            _download(f"{url}/{split}.tar.gz", part, progress)
            _verify(part, split)
            os.replace(part, archive)
        else:
            _verify(archive, split)
        _extract(archive, dest, split)
        archive.unlink()
    return dest


# ---------------------------------------------------------------------------------------------
# download


def _download(url: str, part: Path, progress: bool) -> None:
    """Fetch ``url`` into ``part``, continuing from its current size if it exists."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "lipdet"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as resp:
            status = resp.status
            if offset and status != 206:  # the server ignored the range: start over
                offset = 0
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            mode = "ab" if offset else "wb"
            with (
                open(part, mode) as fh,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    file=sys.stderr,
                    disable=not progress,
                ) as bar,
            ):
                while block := resp.read(_CHUNK):
                    fh.write(block)
                    bar.update(len(block))
        size = part.stat().st_size
        if total is not None and size != total:
            raise LipdetError(f"{url}: download ended early ({size} of {total} bytes); run again to resume")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the .part file is complete
            return
        raise LipdetError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise LipdetError(f"{url}: download failed ({reason}); run again to resume") from None


# ---------------------------------------------------------------------------------------------
# checking and unpacking


def _corrupt(path: Path, why: str) -> LipdetError:
    with contextlib.suppress(OSError):
        path.unlink()
    return LipdetError(f"{path}: corrupt SVHN archive ({why}); it was deleted, run again to download it anew")


def _verify(path: Path, split: str) -> None:
    """Read the whole archive (checks gzip CRC and tar headers); require ``<split>/digitStruct.mat``."""
    wanted = f"{split}/digitStruct.mat"
    found = False
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name.lstrip("./") == wanted and member.isfile():
                    found = True
                if member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        while fh.read(_CHUNK):
                            pass
            # tar stops at its end marker; drain the gzip stream so its CRC and length get checked
            while tar.fileobj is not None and tar.fileobj.read(_CHUNK):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    if not found:
        raise _corrupt(path, f"no {wanted} inside")


def _safe_members(tar: tarfile.TarFile, root: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders whose paths stay inside ``root``; anything else is refused."""
    members = []
    base = root.resolve()
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise LipdetError(f"{tar.name}: unsafe archive member {m.name!r} (links and paths outside are refused)")
        if not (base / p).resolve().is_relative_to(base):
            raise LipdetError(f"{tar.name}: unsafe archive member {m.name!r}")
        members.append(m)
    return members


def _extract(archive: Path, dest: Path, split: str) -> None:
    """Unpack ``archive`` so that ``dest/<split>/`` appears complete or not at all."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", suffix=".extract", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, tmp)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: belt and braces
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise _corrupt(archive, f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise LipdetError(f"{dest}: cannot unpack {archive.name} ({exc.strerror or exc})") from None
        src = tmp / split
        if not (src / "digitStruct.mat").is_file():
            raise _corrupt(archive, f"no {split}/digitStruct.mat inside")
        target = dest / split
        if target.exists():  # a partial folder from an earlier, interrupted run
            shutil.rmtree(target)
        os.replace(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
