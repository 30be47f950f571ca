"""XLA:CPU tuning that dreamjax's entry points apply before JAX starts a backend.

Importing this module changes nothing; :func:`configure` (also ``dreamjax.configure_cpu()``, for
library users, called before the first JAX array is made) sets the flags.

Convolutions decide a dream's speed. jaxlib 0.10 sends them to YNNPACK by default; the
XNNPACK path (also in XLA:CPU, behind an experimental flag) ran the InceptionV3 dream
gradient 1.2-1.3x faster on this project's CPUs at the same float32 accuracy (max relative
error of a convolution vs float64: 5.1e-7 XNNPACK, 6.2e-7 YNNPACK; numbers and commands in
``results/bench/README.md``). The flag only touches CPU programs.

``DREAMJAX_XLA_CPU_CONV`` chooses: ``xnnpack`` (default on jaxlib versions where the flags were
checked to exist), ``default`` (leave XLA alone). A flag XLA does not know aborts the process,
so on other jaxlib versions nothing is set unless ``xnnpack`` is asked for explicitly. Flags the
user already put in ``XLA_FLAGS`` win: nothing is added for a flag already named there.
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

ENV = "DREAMJAX_XLA_CPU_CONV"
XNNPACK_FLAGS = (
    # Individual convolutions and dots to XNNPACK instead of YNNPACK.
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
)
CHECKED_JAXLIB = ((0, 10), (0, 11))  # [from, to): versions whose XLA has these flags

applied: tuple[str, ...] = ()


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


def _backends_started() -> bool:
    try:  # lazy: a private JAX API, imported here so that a move in a new jax version is caught below
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API moved: assume not started (setting the env var is harmless)
        return False


def configure(environ=os.environ) -> tuple[str, ...]:
    """Add the chosen flags to ``XLA_FLAGS``; returns the flags added (empty if none)."""
    global applied
    choice = environ.get(ENV, "auto").strip().lower()
    if choice in ("default", "ynnpack", "off", "0", "false"):
        return ()
    if choice not in ("auto", "xnnpack"):
        raise ValueError(f"{ENV}={environ[ENV]!r}: expected 'xnnpack' or 'default'")
    lo, hi = CHECKED_JAXLIB
    if choice == "auto" and not lo <= _jaxlib_version() < hi:
        return ()
    current = environ.get("XLA_FLAGS", "")
    added = tuple(f for f in XNNPACK_FLAGS if f.split("=", 1)[0] not in current)
    if not added:
        return ()
    if _backends_started():
        log.warning("JAX's backend was started before dreamjax.configure_cpu(): XLA:CPU convolution "
                    "flags not applied (call dreamjax.configure_cpu() before using JAX, or set XLA_FLAGS yourself)")
        return ()
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    applied = added
    return added
