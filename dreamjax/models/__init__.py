"""Backbones: the registry, and the built-in models (each registers itself when imported here).

Import order matters only in one direction: ``registry`` imports no model module; every model
module imports ``registry`` to register itself. Your own backbone: :func:`register_backbone`.
"""
# The built-in backbones, registered on import.
from dreamjax.models import efficientnet_lite, inception_v3, resnet50, tiny, vgg16  # noqa: F401
from dreamjax.models.registry import (
    Backbone,
    BackboneSpec,
    available_backbones,
    get_spec,
    load_backbone,
    register_backbone,
)

BUILTIN_BACKBONES = tuple(available_backbones())  # before any user registration

__all__ = ["BUILTIN_BACKBONES", "Backbone", "BackboneSpec", "available_backbones", "get_spec", "load_backbone",
           "register_backbone"]
