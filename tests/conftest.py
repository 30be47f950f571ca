"""Test setup: a persistent JAX compilation cache outside the clone, small shared fixtures."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
_CACHE = os.environ.get("DREAMJAX_JAX_CACHE", str(Path.home() / ".cache" / "dreamjax" / "jax-cache-tests"))

import dreamjax  # noqa: E402

dreamjax.configure_cpu()  # what dreamjax's entry points do, before JAX starts a backend

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every program is kept, the small ones too: a test's reference computations and helpers are
# many programs of 20-300 ms each, recompiled on every run below the default threshold
# (tests/test_objectives.py + tests/test_ops.py, warm: 61 -> 24 s).
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from tests.helpers import PAINTINGS, REPO, cli  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_backbone():
    from dreamjax import load_backbone

    return load_backbone("tiny", include_top=True)


@pytest.fixture(scope="session")
def paintings_dir():
    return PAINTINGS


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted tiny sweep that resume, SLURM and multi-device runs are compared with."""
    d = tmp_path_factory.mktemp("ref") / "sw"
    cli(d)
    return d
