"""Where InceptionV3 weights come from: explicit path -> cache -> download.

Downloads go through ``pooch.retrieve``: the file streams into a temporary file
inside the cache directory, its md5 (the hash Keras publishes) is checked, and
only then is it renamed into place; on a hash mismatch or a dropped connection
the temporary file is deleted, so the cache never holds a file a later run
would trust. Converted variables are cached too (msgpack, keyed by the sha256 of
the source file and the converter version), so conversion runs once per file.

``weights_id`` is always the sha256 of the source ``.h5`` file.
"""
from __future__ import annotations

import os
from pathlib import Path

from dreamjax.weights.keras_h5 import WeightsError, load_keras_h5

KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
URL_ENV = "DREAMJAX_WEIGHTS_URL"  # overrides the base URL (a mirror, or a test server)
# From keras/src/applications/inception_v3.py (WEIGHTS_PATH, WEIGHTS_PATH_NO_TOP and their file_hash).
FILES = {
    True: ("inception_v3_weights_tf_dim_ordering_tf_kernels.h5", "md5:9a0d58056eeedaa3f26cb7ebd46da564"),
    False: ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5:bcbd6486424b2319ff4ef7d526e38f63"),
}
CONVERTER_VERSION = 1  # bump when the conversion changes, to invalidate converted caches


def cache_dir() -> Path:
    """``$DREAMJAX_HOME`` or ``~/.cache/dreamjax`` (not created here)."""
    return Path(os.environ.get("DREAMJAX_HOME") or Path.home() / ".cache" / "dreamjax")


def weights_dir() -> Path:
    return cache_dir() / "weights"


def weights_url(include_top: bool) -> str:
    base = os.environ.get(URL_ENV) or KERAS_BASE_URL
    return base.rstrip("/") + "/" + FILES[include_top][0]


def sha256_file(path) -> str:
    from dreamjax.files import file_sha256

    return file_sha256(path)


def _offline_help() -> str:
    return (f"remedies: run `dreamjax-weights fetch --all` where there is network and copy {cache_dir()} "
            f"here (or set DREAMJAX_HOME to the copy); or pass an explicit weights path to an InceptionV3 .h5; "
            f"or use the offline backbone 'efficientnet_lite0'")


def fetch(include_top: bool = False) -> Path:
    """Download (or reuse, after an md5 check) the official Keras file into the cache."""
    import pooch
    import requests

    fname, known_hash = FILES[include_top]
    url = weights_url(include_top)
    try:
        return Path(pooch.retrieve(url, known_hash, fname=fname, path=weights_dir(),
                                   downloader=pooch.HTTPDownloader(progressbar=True, timeout=60)))
    except requests.exceptions.RequestException as e:
        reason = str(e).splitlines()[0][:200]
        raise WeightsError(f"{url}: download failed ({type(e).__name__}: {reason}); nothing was cached; "
                           f"{_offline_help()}") from None
    except ValueError as e:  # pooch's hash check; it has already deleted the download
        reason = " ".join(str(e).split())[:300]
        raise WeightsError(f"{url}: downloaded file rejected, nothing was cached ({reason})") from None


def cached_source(include_top: bool) -> Path | None:
    """A file already in the cache that serves ``include_top`` (the full file also serves no-top)."""
    for top in ((True,) if include_top else (False, True)):
        path = weights_dir() / FILES[top][0]
        if path.is_file():
            return path
    return None


def converted_path(sha256: str, include_top: bool) -> Path:
    top = "top" if include_top else "notop"
    return cache_dir() / "converted" / f"inception_v3-{top}-{sha256[:32]}-v{CONVERTER_VERSION}.msgpack"


def save_variables(variables, path) -> None:
    from flax import serialization

    from dreamjax.files import atomic_write_bytes

    atomic_write_bytes(Path(path), serialization.msgpack_serialize(variables))


def load_variables(path) -> dict:
    from flax import serialization

    return serialization.msgpack_restore(Path(path).read_bytes())


def load_converted(path, include_top: bool) -> tuple[dict, str]:
    """Variables for an ``.h5`` file, converted once and cached by its sha256."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such weights file")
    sha = sha256_file(path)
    cached = converted_path(sha, include_top)
    if cached.is_file():
        try:
            return load_variables(cached), sha
        except Exception:  # unreadable cache entry: convert again and overwrite it
            pass
    variables = load_keras_h5(path, include_top)
    save_variables(variables, cached)
    return variables, sha


def resolve_weights(weights, include_top: bool) -> tuple[dict, str]:
    """``"auto"``: cache, then download; anything else: a path to a Keras ``.h5`` file."""
    if weights in ("auto", None):
        path = cached_source(include_top)
        if path is not None:
            path = fetch(include_top=path.name == FILES[True][0])  # md5-checked reuse, no request
        else:
            path = fetch(include_top)
        return load_converted(path, include_top)
    return load_converted(weights, include_top)
