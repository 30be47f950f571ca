"""dreamjax: DeepDream experiments at scale in JAX.

Importing dreamjax has no side effects: it does not import JAX and changes no other library's
settings. The XLA:CPU tuning (see :mod:`dreamjax.engine.xla_cpu`) is applied by dreamjax's own
entry points and by the engine; a library user who wants it calls :func:`configure_cpu` before
JAX starts a backend (before the first array is made).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Backbone", "available_backbones", "load_backbone", "configure_cpu", "config_dir",
           "__version__"]

_LAZY = {"Backbone", "available_backbones", "load_backbone"}


def configure_cpu() -> tuple[str, ...]:
    """Apply dreamjax's XLA:CPU flags (XNNPACK convolutions) if no JAX backend has started yet."""
    from dreamjax.engine import (
        xla_cpu,  # stdlib-only module; imported here so `import dreamjax` stays bare
    )

    return xla_cpu.configure()


def config_dir() -> str:
    """The Hydra config folder: ``conf/`` of a source checkout, else the installed ``dreamjax.conf``."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    source = here.parent / "conf"
    if (source / "config.yaml").is_file() and (here.parent / "pyproject.toml").is_file():
        return str(source)
    return str(here / "conf")  # the wheel maps conf/ to the package folder dreamjax/conf


def __getattr__(name: str):
    # The model registry imports JAX; load it only when asked for (keeps `import dreamjax` cheap).
    if name in _LAZY:
        from dreamjax.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'dreamjax' has no attribute {name!r}")
