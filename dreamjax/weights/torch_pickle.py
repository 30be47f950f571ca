"""Read PyTorch checkpoint files (``torch.save`` of a state dict) into numpy, without torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. This
reader uses a restricted :class:`pickle.Unpickler` whose ``find_class`` resolves only what a
state dict needs -- ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter`` and the typed storage classes (``torch.FloatStorage`` ...), each mapped
to a harmless stand-in -- and refuses every other global with :class:`UnsafePickleError`.
The tensor bytes never go through pickle: they are read with numpy.

Both on-disk layouts are supported:

* legacy (``_use_new_zipfile_serialization=False``, torch < 1.6): magic number, protocol
  version and sys-info pickles, then the object pickle, then the list of storage keys, then
  per storage an int64 element count and the raw little-endian bytes;
* zip (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` entry per storage.

Tensors are rebuilt with their storage offset, shape and strides and returned as contiguous
numpy arrays that own their memory, bit-identical to what ``torch.load`` gives.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["load_torch_file", "UnsafePickleError", "TorchFileError"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a readable torch checkpoint (truncated, wrong format ...)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names was called."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self):
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # filled once the bytes are read


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes may not have been read yet (legacy files store them last)."""

    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    storage, base = storage  # persistent_load gives (storage, offset of a legacy storage view)
    return _TensorRef(storage, base + storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, persistent_load=None):
        super().__init__(file)
        self._path = path
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self._path}: refusing to load global {module}.{name} "
                                    "(only tensors and OrderedDict are allowed)") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
        return self._persistent(pid)


def _check_pid(pid, path):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise TorchFileError(f"{path}: unsupported persistent id {pid!r}")


def _materialise(obj, path):
    """Replace every _TensorRef in a (nested) container by a contiguous numpy array."""
    if isinstance(obj, _TensorRef):
        s = obj.storage
        if s.data is None:
            raise TorchFileError(f"{path}: storage {s.key!r} has no data")
        last = obj.offset + sum((n - 1) * st for n, st in zip(obj.shape, obj.stride)) if all(obj.shape) else -1
        if obj.offset < 0 or last >= s.numel:
            raise TorchFileError(f"{path}: tensor runs past the end of storage {s.key!r}")
        view = np.lib.stride_tricks.as_strided(
            s.data[obj.offset:], shape=obj.shape, strides=[st * s.dtype.itemsize for st in obj.stride])
        return np.array(view, order="C")  # own copy: drops strides and the file buffer
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, path) for v in obj)
    return obj


def _read_legacy(f, path):
    def load(**kw):
        return _RestrictedUnpickler(f, path, **kw).load()

    try:
        magic = load()
    except UnsafePickleError:
        raise
    except Exception:
        f.seek(0)
        if pickle.dumps(_LEGACY_MAGIC, protocol=2).startswith(f.read(16)):
            raise TorchFileError(f"{path}: truncated torch file (cut inside the magic number)") from None
        raise TorchFileError(f"{path}: not a torch file (no legacy magic number, not a zip archive)") from None
    if magic != _LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a torch file (bad magic number)")
    try:
        protocol, sys_info = load(), load()
        if protocol != _LEGACY_PROTOCOL:
            raise TorchFileError(f"{path}: unsupported legacy torch protocol {protocol}")
        if not sys_info.get("little_endian", True):
            raise TorchFileError(f"{path}: big-endian torch files are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            _check_pid(pid, path)
            _, stype, key, _location, numel, view = pid
            root = storages.setdefault(key, _Storage(key, stype.dtype, numel))
            if view is None:
                return root, 0
            _view_key, view_offset, _view_size = view  # pre-0.4 storage views: an offset into the root
            return root, view_offset

        obj = load(persistent_load=persistent_load)
        keys = load()
    except (UnsafePickleError, TorchFileError):
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, KeyError) as e:
        raise TorchFileError(f"{path}: truncated or corrupt torch file ({e})") from None
    for key in keys:
        if key not in storages:
            raise TorchFileError(f"{path}: storage {key!r} is listed but used by no tensor")
        s = storages[key]
        head = f.read(8)
        if len(head) < 8:
            raise TorchFileError(f"{path}: truncated torch file (storage {key!r} header missing)")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * s.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) < nbytes:
            raise TorchFileError(f"{path}: truncated torch file (storage {key!r} needs {nbytes} bytes, "
                                 f"{len(raw)} left)")
        s.numel, s.data = numel, np.frombuffer(raw, dtype=s.dtype.newbyteorder("<"))
    return _materialise(obj, path)


def _read_zip(zf: zipfile.ZipFile, path):
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise TorchFileError(f"{path}: zip archive is not a torch file (no <archive>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    names = set(zf.namelist())
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
        raise TorchFileError(f"{path}: big-endian torch files are not supported")

    def persistent_load(pid):
        _check_pid(pid, path)
        _, stype, key, _location, numel = pid[:5]
        s = _Storage(key, stype.dtype, numel)
        try:
            raw = zf.read(f"{prefix}data/{key}")
        except KeyError:
            raise TorchFileError(f"{path}: storage entry data/{key} missing") from None
        if len(raw) < numel * s.dtype.itemsize:
            raise TorchFileError(f"{path}: truncated storage data/{key}")
        s.data = np.frombuffer(raw, dtype=s.dtype.newbyteorder("<"), count=numel)
        return s, 0

    try:
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, persistent_load).load()
    except (UnsafePickleError, TorchFileError):
        raise
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError, KeyError) as e:
        raise TorchFileError(f"{path}: truncated or corrupt torch file ({e})") from None
    return _materialise(obj, path)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load a ``torch.save``'d object of tensors (a state dict) as numpy arrays, safely.

    Raises :class:`UnsafePickleError` if the pickle names any global beyond tensors and
    OrderedDict (nothing is called), :class:`TorchFileError` for truncated or foreign files.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                return _read_zip(zf, path)
        except zipfile.BadZipFile as e:
            raise TorchFileError(f"{path}: truncated or corrupt zip-format torch file ({e})") from None
    with open(path, "rb") as f:
        return _read_legacy(f, path)
