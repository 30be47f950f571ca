"""Files everything may use: atomic writes, content hashes, slugs, an exclusive folder lock.

The bottom layer of dreamjax (standard library and numpy only). Every output dreamjax writes goes
through :func:`atomic_open` (temp file ``.<name>.<random>.tmp`` in the same folder, fsync,
``os.replace``), so a killed run never leaves a half-written file under its final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# What the package ships: bundled paintings (with SOURCES.md) and the ImageNet labels.
DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_PAINTINGS = DATA_DIR / "paintings"
IMAGENET_LABELS = DATA_DIR / "imagenet_classes.txt"


# ---------------------------------------------------------------------------------------------
# A full disk


class DiskFull(RuntimeError):
    """No space left where dreamjax writes: the run stops (its cells are not failed; complete
    ones and committed checkpoints stay), and the same command resumes once there is space."""

    def __init__(self, path: PathLike):
        self.path = str(path)
        super().__init__(f"no space left at {self.path}; free space and rerun the same command")


_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# tensorstore (orbax's writer) reports ENOSPC as "RESOURCE_EXHAUSTED: ... No space left on device
# [os_error_code='28']" in a ValueError.
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, is a full disk or quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic writers


def _fsync_dir(directory: Path) -> None:
    try:  # makes the rename durable on POSIX; not possible on every OS/filesystem
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """Open a temp file ``.<name>.<random>.tmp`` beside ``path``; on success fsync + rename.

    On any exception the temp file is removed and an existing ``path`` is untouched.
    """
    if not any(c in mode for c in "wx") or "+" in mode or "a" in mode:
        raise ValueError(f"atomic_open is for writing a whole file, got mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    # errors="replace": a file name that is not UTF-8 (surrogate escapes) shows as "?" in HTML/CSV/Markdown
    return atomic_write_bytes(path, text.encode(encoding, errors="replace"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "__array__"):  # e.g. a jax.Array, without importing jax
        return np.asarray(o).tolist()
    raise TypeError(f"write_json cannot serialise {type(o).__name__}")


def write_json(path: PathLike, obj: Any, *, sort_keys: bool = True, indent: int = 2) -> Path:
    """Atomic JSON (UTF-8, trailing newline). numpy scalars/arrays, Paths, sets are converted.

    Dict keys are sorted by default (stable diffs); list order (e.g. a manifest's cells) is kept.
    Non-finite floats are written as NaN/Infinity (Python's json reads them back).
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes): \udcXX, read back exactly
        data = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default).encode("ascii")
    return atomic_write_bytes(path, data + b"\n")


# ---------------------------------------------------------------------------------------------
# Names


def slug(name: str | bytes, max_len: int = 100) -> str:
    """A readable, file-name-safe slug of a painting name: Unicode letters and digits kept (NFC),
    anything else becomes ``_``. A name whose bytes are not UTF-8 (e.g. a latin-1 file name) is
    decoded with replacement and gets ``-<8 hex>`` of its bytes, so the slug is stable and unique."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    try:
        text, exact = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        text, exact = raw.decode("utf-8", "replace"), False
    text = unicodedata.normalize("NFC", text)
    s = "".join(ch if (ch.isalnum() or ch in "._-") else "_" for ch in text)
    s = re.sub(r"_+", "_", s).strip("._-")[:max_len] or "painting"
    return s if exact else f"{s}-{short_hash(raw)}"


def short_hash(data: str | bytes, n: int = 8) -> str:
    raw = data if isinstance(data, bytes) else os.fsencode(data)
    return hashlib.sha256(raw).hexdigest()[:n]


def display_path(path: PathLike) -> str:
    """A path for messages: bytes that are not UTF-8 shown with replacement characters."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# An exclusive lock per folder


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock; ``holder`` is what it wrote (pid, host, ...)."""

    def __init__(self, directory: PathLike, holder: dict):
        self.directory, self.holder = os.fspath(directory), holder
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(f"{display_path(directory)} is in use by another dreamjax run: {who}{since}{cmd}; "
                         f"wait for it to finish (or stop it), or choose another name=...")


class FolderLock:
    """``fcntl.flock`` on ``<directory>/.dreamjax.lock``, held until :meth:`release` or the process
    ends (the kernel drops it even after kill -9, so a lock is never stale while no process holds
    it). The file records the owner (pid, host, start time, command); a leftover file from a dead
    owner is simply taken over. flock is per open file: a second FolderLock on the same folder in
    the same process is refused too. (On NFS flock is only as good as the server's lock support.)"""

    NAME = ".dreamjax.lock"

    def __init__(self, directory: PathLike, info: dict | None = None):
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self.info = dict(info or {})
        self._fd: int | None = None
        self.previous: dict = {}

    def acquire(self) -> "FolderLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderLocked(self.directory, holder) from None
            raise
        self.previous = _read_holder(fd)  # a dead owner's record (stale): taken over
        rec = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(sys.argv)} | self.info
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec, ensure_ascii=True) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
