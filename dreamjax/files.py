"""Files everything may use: atomic writes, content hashes, an exclusive folder lock.

The bottom layer of dreamjax (standard library and numpy only). Every output dreamjax writes goes
through :func:`atomic_open` (temp file ``.<name>.<random>.tmp`` in the same folder, fsync,
``os.replace``), so a killed run never leaves a half-written file under its final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# What the package ships: bundled paintings (with SOURCES.md) and the ImageNet labels.
DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_PAINTINGS = DATA_DIR / "paintings"
IMAGENET_LABELS = DATA_DIR / "imagenet_classes.txt"


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
