"""Backbone registry: name -> how to build, preprocess, tap and load a network.

Every backbone is a Flax linen module whose ``__call__(x, taps=None)`` returns
``(logits | None, {tap_name: activation})``. When ``taps`` is given the forward
pass stops after the deepest requested tap (a dream on mixed4..mixed7 never pays
for mixed8..mixed10) and logits are ``None``; with ``taps=None`` every tap is
returned and the logits too when the module was built with ``include_top``.

``load_backbone`` is the one public entry point; it returns a :class:`Backbone`
holding the module, its variables ``{"params", "batch_stats"}`` and the facts
the dream engine needs (tap names and strides, minimum input size, value range).
:func:`register_backbone` adds your own backbone from user code (docs/examples/custom_backbone.py).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.models.ops import prepare_dream_variables, resolve_kernels

Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Static description of a registered backbone (no arrays)."""

    name: str
    # build(include_top, dtype, straight_through) -> flax module. ``straight_through=True`` (the
    # model.straight_through setting) selects the dream-path variant (a ReLU6 with a plain-ReLU
    # backward); parameters are identical.
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
    """Register a zero-argument factory returning the :class:`BackboneSpec` (called on first use).

    The built-in model modules use it on import; ``dreamjax.models`` imports them, so this module
    imports no model (no import circle). User code calls :func:`register_backbone` instead.
    """

    def deco(fn):
        _REGISTRY[name] = fn
        get_spec.cache_clear()
        return fn

    return deco


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def _import_hook(name: str) -> str:
    # "pkg.mod:name" imports pkg.mod first (its import registers the backbone), so a user's own
    # backbone can be selected by name alone from any process: the CLI, a launcher, a SLURM task.
    module, sep, short = name.partition(":")
    if sep and short not in _REGISTRY and name not in _REGISTRY:
        importlib.import_module(module)
    return name if name in _REGISTRY else short if sep else name


@functools.cache
def get_spec(name: str) -> BackboneSpec:
    key = _import_hook(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
                         "(your own: dreamjax.models.register_backbone, selected as model.name=NAME "
                         "with model.module=your.module)")
    return _REGISTRY[key]()


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
        self.module = spec.build(include_top=include_top, dtype=self.dtype, straight_through=False)
        self._jitted: dict = {}
        self._dream_variables: dict = {}

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
        return self.dream_variables_for("xla")

    def dream_variables_for(self, kernels: str = "auto", fuse_batchnorm: bool = True):
        """:attr:`dream_variables` for the convolution kernels ``auto|xla|onednn|onednn_f32``
        (``ops.resolve_kernels``); the variables themselves select the kernel that runs.
        ``fuse_batchnorm=False``: oneDNN without BatchNorm folding (benchmark A/B only)."""
        key = (resolve_kernels(kernels), bool(fuse_batchnorm))
        if key not in self._dream_variables:
            module = self.spec.build(include_top=False, dtype=jnp.float32, straight_through=True)
            size = self.spec.min_size
            self._dream_variables[key] = prepare_dream_variables(module, self.variables, (1, size, size, 3),
                                                                 kernels=key[0], fuse_batchnorm=key[1])
        return self._dream_variables[key]

    def param_count(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.variables["params"])))

    def tap_shapes(self, height: int, width: int, taps: Sequence[str] | None = None) -> dict:
        taps = self.check_taps(taps or self.spec.taps)
        x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        out = jax.eval_shape(lambda v, x: self.module.apply(v, x, taps=taps)[1], self.variables, x)
        return {t: tuple(out[t].shape[1:]) for t in taps}

    # --- pure functions for the dream engine ---------------------------------------------------
    def feature_fn(self, taps: Sequence[str], *, straight_through: bool = False, dtype=None, logits: bool = False):
        """Pure ``f(variables, x) -> {tap: act}``; ``straight_through=True`` picks the dream-path module.

        ``logits=True`` runs the whole network with its classifier top and adds the logits under
        the key ``"logits"`` (needs a backbone loaded with ``include_top=True``)."""
        taps = self.check_taps(taps)
        if logits and not self.include_top:
            raise ValueError(f"backbone {self.name!r} was loaded without its classifier top; "
                             "use load_backbone(..., include_top=True) for logits")
        module = self.spec.build(include_top=logits, dtype=jnp.dtype(dtype or self.dtype),
                                 straight_through=straight_through)

        def f(variables, x):
            out = module.apply(variables, x, taps=taps)[1]
            return {t: out[t] for t in taps}  # a module may return more than asked (taps is a hint)

        def f_logits(variables, x):
            out, acts = module.apply(variables, x)
            return {**{t: acts[t] for t in taps}, "logits": out}

        return f_logits if logits else f

    # --- conveniences --------------------------------------------------------------------------
    def features(self, x, taps: Sequence[str]) -> dict:
        taps = self.check_taps(taps)
        key = ("features", taps)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self.feature_fn(taps, straight_through=False))
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


# --- your own backbone ---------------------------------------------------------------------------

def _call_with_accepted(fn: Callable, **kwargs):
    """``fn(**kwargs)`` passing only the keyword arguments ``fn`` declares (or all, for ``**kw``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _affine_inverse(preprocess: Callable, name: str) -> Callable:
    """The inverse of a per-channel affine ``preprocess`` (``a * x + b``), checked on three levels."""
    levels = np.asarray(preprocess(jnp.asarray([[0.0] * 3, [1.0] * 3, [255.0] * 3], jnp.float32)), np.float64)
    b, a = levels[0], (levels[2] - levels[0]) / 255.0  # the widest span: the least rounding in a
    if not np.all(np.abs(a) > 0) or not np.allclose(a + b, levels[1], rtol=1e-4, atol=1e-4):
        raise ValueError(f"backbone {name!r}: preprocess is not a per-channel affine map; pass deprocess=")
    return lambda x: (x - b.astype(np.float32)) / a.astype(np.float32)


def register_backbone(name: str, *, build: Callable[..., Any], taps: Sequence[str],
                      load: Callable[[Any, bool], Any], preprocess: Callable | None = None,
                      deprocess: Callable | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
                      tap_strides: Mapping[str, int] | None = None, min_size: int = 32,
                      description: str = "", num_classes: int = 1000) -> None:
    """Register your own Flax backbone under ``name``, from your own code (no dreamjax edits).

    build: ``build(include_top=False, dtype=float32, straight_through=False) -> flax module`` (declare only the
      arguments you use). The module's ``__call__(x, taps=None, train=False)`` takes NHWC network
      inputs and returns ``(logits | None, {tap: activation})``; ``taps`` is a hint (stop early
      if you can: the dict may hold more taps than asked).
    taps: the tap names, shallow to deep.
    load: ``load(weights, include_top) -> variables`` or ``(variables, weights_id)``;
      ``weights`` is the config's ``model.weights`` ("auto", "random" or a path). Variables are
      ``{"params": ..., ...}`` as ``module.init`` makes them.
    preprocess: pixels in [0, 255] (NHWC float) -> network input; default ``x / 127.5 - 1``.
    deprocess: its inverse; default: inverted numerically when ``preprocess`` is per-channel affine.
    value_range: the range of network inputs (what ``dream.clip`` clips to).
    tap_strides: input pixels per tap pixel; default: measured from the tap shapes at a probe size.
    min_size: the smallest input side the module accepts.

    It is then used like a built-in one: ``load_backbone(name)``, ``dreamjax model.name=NAME
    model.module=your.module`` (the module is imported first, which runs this call), and
    ``dreamjax-weights info --model NAME --module your.module`` lists its taps with shapes and strides.
    See docs/examples/custom_backbone.py.
    """
    taps = tuple(taps)
    if not taps or len(set(taps)) != len(taps):
        raise ValueError(f"backbone {name!r}: taps must be distinct names, got {list(taps)}")
    pre = preprocess or keras_preprocess
    post = deprocess or (keras_deprocess if preprocess is None else _affine_inverse(pre, name))

    def build_module(include_top=False, dtype=jnp.float32, straight_through=False):
        return _call_with_accepted(build, include_top=include_top, dtype=dtype, straight_through=straight_through)

    def load_variables(weights, include_top):
        got = load(weights, include_top)
        variables, weights_id = got if isinstance(got, tuple) else (got, None)
        if weights_id is None:  # content hash: the same arrays give the same records
            h = hashlib.sha256()
            for leaf in jax.tree_util.tree_leaves(variables):
                h.update(np.asarray(leaf).tobytes())
            weights_id = f"{name}-" + h.hexdigest()
        return variables, weights_id

    def probe_strides():
        size = max(256, -(-min_size // 32) * 32)
        module = build_module()
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        out = jax.eval_shape(lambda v, x: module.apply(v, x)[1], variables, x)
        missing = [t for t in taps if t not in out]
        if missing:
            raise ValueError(f"backbone {name!r}: the module returned taps {sorted(out)}, not {missing}")
        return {t: max(1, round(size / out[t].shape[1])) for t in taps}

    @register(name)
    def _spec() -> BackboneSpec:
        return BackboneSpec(name=name, build=build_module, taps=taps,
                            tap_strides=dict(tap_strides) if tap_strides else probe_strides(),
                            min_size=int(min_size), value_range=tuple(value_range), preprocess=pre,
                            deprocess=post, load=load_variables, description=description,
                            num_classes=num_classes)
