"""Where Keras application weights come from: explicit path -> cache -> download.

Generic over architectures: the caller (a model module) passes its :class:`KerasArch`, which
names the official files, their published md5 hashes and Keras' download URL.

Downloads go through ``pooch.retrieve``: the file streams into a temporary file inside the
cache directory, its md5 (the hash Keras publishes) is checked, and only then is it renamed
into place; on a hash mismatch or a dropped connection the temporary file is deleted, so the
cache never holds a file a later run would trust. Converted variables are cached too (msgpack,
keyed by the architecture, the sha256 of the source file and the converter version), so
conversion runs once per file.

``weights_id`` is always the sha256 of the source ``.h5`` file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flax import serialization

from dreamjax.files import atomic_write_bytes, file_sha256
from dreamjax.weights.keras_h5 import KerasArch, WeightsError, load_keras_h5

URL_ENV = "DREAMJAX_WEIGHTS_URL"  # overrides every base URL (a flat mirror of the files, or a test server)
CONVERTER_VERSION = 1  # bump when the conversion changes, to invalidate converted caches


def cache_dir() -> Path:
    """``$DREAMJAX_HOME`` or ``~/.cache/dreamjax`` (not created here)."""
    return Path(os.environ.get("DREAMJAX_HOME") or Path.home() / ".cache" / "dreamjax")


def weights_dir() -> Path:
    return cache_dir() / "weights"


def weights_url(arch: KerasArch, include_top: bool) -> str:
    base = os.environ.get(URL_ENV) or arch.base_url
    return base.rstrip("/") + "/" + arch.files[include_top][0]


def sha256_file(path) -> str:
    return file_sha256(path)


def _offline_help(arch: KerasArch) -> str:
    return (f"remedies: run `dreamjax-weights fetch --model {arch.key} --all` where there is network and copy "
            f"{cache_dir()} here (or set DREAMJAX_HOME to the copy); or pass an explicit weights path to a "
            f"{arch.name} .h5 ({arch.files[False][0]}); or use the offline backbone 'efficientnet_lite0'")


def fetch(arch: KerasArch, include_top: bool = False) -> Path:
    """Download (or reuse, after an md5 check) the official Keras file into the cache."""
    import pooch  # lazy: with requests ~0.12 s of every start-up, and only a download needs them
    import requests  # lazy: as pooch

    fname, known_hash = arch.files[include_top]
    url = weights_url(arch, include_top)
    try:
        return Path(pooch.retrieve(url, known_hash, fname=fname, path=weights_dir(),
                                   downloader=pooch.HTTPDownloader(progressbar=True, timeout=60)))
    except requests.exceptions.RequestException as e:
        reason = str(e).splitlines()[0][:200]
        raise WeightsError(f"{url}: download failed ({type(e).__name__}: {reason}); nothing was cached; "
                           f"{_offline_help(arch)}") from None
    except ValueError as e:  # pooch's hash check; it has already deleted the download
        reason = " ".join(str(e).split())[:300]
        raise WeightsError(f"{url}: downloaded file rejected, nothing was cached ({reason})") from None


def cached_source(arch: KerasArch, include_top: bool) -> Path | None:
    """A file already in the cache that serves ``include_top`` (the full file also serves no-top)."""
    for top in ((True,) if include_top else (False, True)):
        path = weights_dir() / arch.files[top][0]
        if path.is_file():
            return path
    return None


def converted_path(arch: KerasArch, sha256: str, include_top: bool) -> Path:
    top = "top" if include_top else "notop"
    return cache_dir() / "converted" / f"{arch.key}-{top}-{sha256[:32]}-v{CONVERTER_VERSION}.msgpack"


def save_variables(variables, path) -> None:
    atomic_write_bytes(Path(path), serialization.msgpack_serialize(variables))


def load_variables(path) -> dict:
    return serialization.msgpack_restore(Path(path).read_bytes())


def load_converted(arch: KerasArch, path, include_top: bool, others: Sequence[KerasArch] = ()) -> tuple[dict, str]:
    """Variables for an ``.h5`` file, converted once and cached by its sha256.

    ``others``: architectures to name when the file turns out to be one of theirs.
    """
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such weights file")
    sha = sha256_file(path)
    cached = converted_path(arch, sha, include_top)
    variables = None
    if cached.is_file():
        try:
            return load_variables(cached), sha
        except Exception:  # noqa: BLE001 - an unreadable cache entry is converted again and overwritten
            variables = None
    variables = load_keras_h5(path, arch, include_top, others=others)
    save_variables(variables, cached)
    return variables, sha


def resolve_weights(arch: KerasArch, weights, include_top: bool,
                    others: Sequence[KerasArch] = ()) -> tuple[dict, str]:
    """``"auto"``: cache, then download; anything else: a path to a Keras ``.h5`` file."""
    if weights in ("auto", None):
        path = cached_source(arch, include_top)
        if path is not None:
            path = fetch(arch, include_top=path.name == arch.files[True][0])  # md5-checked reuse, no request
        else:
            path = fetch(arch, include_top)
        return load_converted(arch, path, include_top, others)
    return load_converted(arch, weights, include_top, others)
