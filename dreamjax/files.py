"""Atomic file writes and content hashes: the small I/O layer every other module may use.

Every output dreamjax writes goes through :func:`atomic_open` (temp file beside the target,
fsync, rename), so a killed run never leaves a half-written file that a later run would
trust; :func:`file_sha256` is the content hash records and weight caches are keyed by.
No JAX, no PIL.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike


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
    return atomic_write_bytes(path, text.encode(encoding))


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
    return atomic_write_text(path, text + "\n")
