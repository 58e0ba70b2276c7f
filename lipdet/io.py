"""Small file helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from lipdet.errors import LipdetError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file keeps ``path``'s suffix (so libraries that look at the extension still
    work). If the body raises, the temporary file is removed and ``path`` is left untouched, so a
    failed write never leaves a half-written artifact behind.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise LipdetError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise LipdetError(f"output folder is not writable: {parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished artifacts get normal permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


CACHE_ENV = "LIPDET_CACHE"


def cache_root() -> Path:
    """The cache folder's path (``$LIPDET_CACHE`` or ``~/.cache/lipdet``), without creating it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lipdet")


def portable_path(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """``path`` as a result file should name it: no absolute path of the machine that wrote it.

    Relative to ``base`` (the folder the result file is written into, or a folder above it)
    when ``path`` lies under ``base``'s parent; ``$LIPDET_CACHE/...`` when it lies in lipdet's
    cache (the built-in synthetic SVHN); else as given.
    """
    if "://" in str(path):  # a URL (a served model): not a path of this machine
        return str(path)
    p = Path(os.path.abspath(path))
    base = Path(os.path.abspath(base))
    for anchor, label in ((base, None), (base.parent, None), (Path(os.path.abspath(cache_root())), "$" + CACHE_ENV)):
        if p == anchor or anchor in p.parents:
            rel = os.path.relpath(p, base) if label is None else str(Path(label) / p.relative_to(anchor))
            return rel.replace(os.sep, "/")
    return str(path)


def cache_dir() -> Path:
    """lipdet's cache folder: ``$LIPDET_CACHE`` or ``~/.cache/lipdet`` (created on demand)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root
