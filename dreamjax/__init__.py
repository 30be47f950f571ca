"""dreamjax: DeepDream experiments at scale in JAX."""
__version__ = "0.1.0"

from dreamjax.models.registry import Backbone, available_backbones, load_backbone  # noqa: E402

__all__ = ["Backbone", "available_backbones", "load_backbone", "__version__"]
