"""dreamjax: DeepDream experiments at scale in JAX."""
__version__ = "0.1.0"

from dreamjax import xla_cpu as _xla_cpu

_xla_cpu.configure()  # before any JAX backend starts: XLA:CPU convolution library (see xla_cpu.py)

from dreamjax.models.registry import Backbone, available_backbones, load_backbone  # noqa: E402

__all__ = ["Backbone", "available_backbones", "load_backbone", "__version__"]
