from dreamjax.models.registry import (
    Backbone,
    BackboneSpec,
    available_backbones,
    get_spec,
    load_backbone,
)

__all__ = ["Backbone", "BackboneSpec", "available_backbones", "get_spec", "load_backbone"]
