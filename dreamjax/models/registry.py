"""Backbone registry: name -> how to build, preprocess, tap and load a network.

Every backbone is a Flax linen module whose ``__call__(x, taps=None)`` returns
``(logits | None, {tap_name: activation})``. When ``taps`` is given the forward
pass stops after the deepest requested tap (a dream on mixed4..mixed7 never pays
for mixed8..mixed10) and logits are ``None``; with ``taps=None`` every tap is
returned and the logits too when the module was built with ``include_top``.

``load_backbone`` is the one public entry point; it returns a :class:`Backbone`
holding the module, its variables ``{"params", "batch_stats"}`` and the facts
the dream engine needs (tap names and strides, minimum input size, value range).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Static description of a registered backbone (no arrays)."""

    name: str
    # build(include_top, dtype, dream) -> flax module. ``dream=True`` selects the
    # dream-path variant (e.g. straight-through ReLU6); parameters are identical.
    build: Callable[..., Any]
    taps: tuple[str, ...]  # ordered from shallow to deep
    tap_strides: Mapping[str, int]
    min_size: int  # smallest input side the network accepts
    value_range: tuple[float, float]  # range of preprocessed inputs
    preprocess: Callable[[Any], Any]  # float/uint8 pixels in [0, 255] -> network input
    deprocess: Callable[[Any], Any]  # network input -> float pixels in [0, 255]
    # load(weights, include_top) -> (variables, weights_id). weights: "auto", "random" or a path.
    load: Callable[[Any, bool], tuple[Variables, str]]
    description: str = ""
    num_classes: int = 1000


_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register(name: str):
    """Register a zero-argument factory returning the :class:`BackboneSpec` (imported lazily)."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


@functools.lru_cache(maxsize=None)
def get_spec(name: str) -> BackboneSpec:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _ensure_builtin():
    # Importing the model modules registers them; kept lazy so `import dreamjax` stays cheap.
    from dreamjax.models import (
        efficientnet_lite,  # noqa: F401
        inception_v3,  # noqa: F401
        tiny,  # noqa: F401
    )


def keras_preprocess(x):
    """Keras' InceptionV3 preprocessing: pixels in [0, 255] -> [-1, 1]."""
    return x / 127.5 - 1.0


def keras_deprocess(x):
    return (x + 1.0) * 127.5


class Backbone:
    """A network with loaded variables, ready for features, logits and dreams."""

    def __init__(self, spec: BackboneSpec, variables: Variables, weights_id: str,
                 include_top: bool, dtype=jnp.float32):
        self.spec = spec
        self.variables = variables
        self.weights_id = weights_id
        self.include_top = include_top
        self.dtype = jnp.dtype(dtype)
        self.module = spec.build(include_top=include_top, dtype=self.dtype, dream=False)
        self._jitted: dict = {}
        self._dream_variables = None

    # --- facts -----------------------------------------------------------------------------
    name = property(lambda self: self.spec.name)
    taps = property(lambda self: self.spec.taps)
    tap_strides = property(lambda self: dict(self.spec.tap_strides))
    min_size = property(lambda self: self.spec.min_size)
    value_range = property(lambda self: self.spec.value_range)

    def preprocess(self, pixels):
        """uint8 or float pixels in [0, 255], NHWC -> network input (float32)."""
        return self.spec.preprocess(jnp.asarray(pixels, jnp.float32))

    def deprocess(self, x):
        """network input -> float pixels in [0, 255] (not clipped, not rounded)."""
        return self.spec.deprocess(x)

    def check_taps(self, taps: Sequence[str]) -> tuple[str, ...]:
        taps = tuple(taps)
        unknown = [t for t in taps if t not in self.spec.taps]
        if unknown:
            raise ValueError(f"unknown tap(s) {unknown} for backbone {self.name!r}; "
                             f"allowed: {', '.join(self.spec.taps)}")
        return taps

    @property
    def dream_variables(self):
        """``variables`` plus what the dream path precomputes once per backbone (the backward
        kernels of :mod:`dreamjax.models.ops`); made on first use, ~1 s for InceptionV3."""
        if self._dream_variables is None:
            from dreamjax.models.ops import prepare_dream_variables

            module = self.spec.build(include_top=False, dtype=jnp.float32, dream=True)
            size = self.spec.min_size
            self._dream_variables = prepare_dream_variables(module, self.variables, (1, size, size, 3))
        return self._dream_variables

    def param_count(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.variables["params"])))

    def tap_shapes(self, height: int, width: int, taps: Sequence[str] | None = None) -> dict:
        taps = self.check_taps(taps or self.spec.taps)
        x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        out = jax.eval_shape(lambda v, x: self.module.apply(v, x, taps=taps)[1], self.variables, x)
        return {k: tuple(v.shape[1:]) for k, v in out.items()}

    # --- pure functions for the dream engine ---------------------------------------------------
    def feature_fn(self, taps: Sequence[str], *, dream: bool = True, dtype=None, logits: bool = False):
        """Pure ``f(variables, x) -> {tap: act}``; ``dream=True`` picks the dream-path module.

        ``logits=True`` runs the whole network with its classifier top and adds the logits under
        the key ``"logits"`` (needs a backbone loaded with ``include_top=True``)."""
        taps = self.check_taps(taps)
        if logits and not self.include_top:
            raise ValueError(f"backbone {self.name!r} was loaded without its classifier top; "
                             "use load_backbone(..., include_top=True) for logits")
        module = self.spec.build(include_top=logits, dtype=jnp.dtype(dtype or self.dtype), dream=dream)

        def f(variables, x):
            return module.apply(variables, x, taps=taps)[1]

        def f_logits(variables, x):
            out, acts = module.apply(variables, x)
            return {**{t: acts[t] for t in taps}, "logits": out}

        return f_logits if logits else f

    # --- conveniences --------------------------------------------------------------------------
    def features(self, x, taps: Sequence[str]) -> dict:
        taps = self.check_taps(taps)
        key = ("features", taps)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(lambda v, x: self.module.apply(v, x, taps=taps)[1])
        return self._jitted[key](self.variables, x)

    def logits(self, x):
        if not self.include_top:
            raise ValueError(f"backbone {self.name!r} was loaded without its classifier top; "
                             "use load_backbone(..., include_top=True)")
        if "logits" not in self._jitted:
            self._jitted["logits"] = jax.jit(lambda v, x: self.module.apply(v, x)[0])
        return self._jitted["logits"](self.variables, x)

    def __repr__(self):
        return (f"Backbone({self.name!r}, include_top={self.include_top}, "
                f"params={self.param_count():,}, weights={self.weights_id[:12]})")


def load_backbone(name: str, weights: Any = "auto", include_top: bool = False,
                  dtype=jnp.float32) -> Backbone:
    """Build a registered backbone and load its weights.

    weights: ``"auto"`` (cache, then download / the installed package), ``"random"``
    (seeded random init, for tests and benchmarks), or a path to a weight file.
    """
    spec = get_spec(name)
    variables, weights_id = spec.load(weights, include_top)
    return Backbone(spec, variables, weights_id, include_top, dtype)
