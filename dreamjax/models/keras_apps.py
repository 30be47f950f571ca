"""What the Keras-application backbones (InceptionV3, ResNet50, VGG16) share.

* :class:`KerasBatchNorm`: inference BatchNorm computed in Keras' own order, so ReLU kinks fall
  where Keras puts them (a dream's normalised step amplifies every flipped unit).
* Keras' two preprocessing modes: ``tf`` (``x / 127.5 - 1``, InceptionV3) and ``caffe`` (RGB->BGR,
  ImageNet mean subtracted, no scaling; ResNet50 and VGG16), with their inverses.
* The architectures known to the weight converter (:data:`KERAS_ARCHS`), so a file for one
  network given to another is named for what it is; :func:`load_keras_weights` is every Keras
  backbone's ``load``.
* :func:`random_variables`: seeded NumPy weights for the parity tests and benchmarks.
* :func:`register_keras_backbone`: the registry entry every Keras backbone makes (``random``
  weights or a Keras file of its architecture).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.models.ops import Conv2D
from dreamjax.models.registry import BackboneSpec, keras_deprocess, keras_preprocess, register
from dreamjax.weights.keras_h5 import KerasArch
from dreamjax.weights.store import resolve_weights

__all__ = ["CAFFE_MEAN_BGR", "CAFFE_RANGE", "KERAS_ARCHS", "ConvBias", "KerasBatchNorm", "caffe_deprocess",
           "caffe_preprocess", "keras_deprocess", "keras_preprocess", "load_keras_weights", "random_variables",
           "register_arch", "register_keras_backbone", "tap_stop"]

# keras.applications.imagenet_utils, mode="caffe": the ImageNet mean in BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# The range of caffe inputs over all channels (a scalar range: what dream.clip clips to; the
# saved image is clipped to [0, 255] per channel anyway).
CAFFE_RANGE = (-max(CAFFE_MEAN_BGR), 255.0 - min(CAFFE_MEAN_BGR))

KERAS_ARCHS: dict[str, KerasArch] = {}


def caffe_preprocess(x):
    """Keras ``caffe`` mode (ResNet50, VGG16): RGB pixels in [0, 255] -> BGR minus the ImageNet mean."""
    return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)


def caffe_deprocess(x):
    """BGR minus mean -> RGB pixels in [0, 255] (not clipped)."""
    return (x + jnp.asarray(CAFFE_MEAN_BGR, x.dtype))[..., ::-1]


def register_arch(arch: KerasArch) -> KerasArch:
    KERAS_ARCHS[arch.key] = arch
    return arch


def load_keras_weights(arch: KerasArch, weights, include_top: bool):
    """``(variables, sha256 of the .h5)``: cache, then the official download, or an explicit path.
    A file of another registered Keras architecture is refused naming both."""
    return resolve_weights(arch, weights, include_top, others=list(KERAS_ARCHS.values()))


class ConvBias(nn.Module):
    """Keras ``Conv2D(use_bias=True)``: :class:`~dreamjax.models.ops.Conv2D` (the dream path's
    convolution) plus a bias."""

    features: int
    kernel: int
    strides: int = 1
    padding: str = "VALID"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv2D(self.features, (self.kernel, self.kernel), self.strides, self.padding, dtype=self.dtype,
                   name="conv")(x)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return x + bias.astype(self.dtype)


class KerasBatchNorm(nn.Module):
    """Inference BatchNorm computed in Keras' own order.

    Keras' JAX backend computes ``x * inv + (-mean * inv + beta)`` with
    ``inv = rsqrt(var + eps) * gamma``, where Flax's BatchNorm computes ``(x - mean) * inv + beta``.
    Equal up to rounding, but the rounding decides which ReLUs sit exactly at 0, and DeepDream's
    normalised step amplifies each flip: this order keeps the dlwp preset within 1e-3 of the Keras
    loop over 90 steps. Epsilon is the network's own (InceptionV3 1e-3, ResNet50 1.001e-5; Flax's
    default 1e-5 would shift every unit with a small moving variance). Statistics are always the
    stored ones (dreams never update them); variable names are Flax BatchNorm's.
    """

    epsilon: float = 1e-3
    use_scale: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.use_scale:
            self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        inv, res = self.affine()
        return x * inv.astype(self.dtype) + res.astype(self.dtype)

    def affine(self, xp=jnp):
        """``(inv, res)`` with ``bn(x) = x * inv + res``, in float32; ``xp=numpy`` computes them on
        the host (what ops.conv_affine folds into the convolution when it prepares the dream path)."""
        get = self.get_variable
        if xp is np:
            inv = (1.0 / np.sqrt(np.asarray(get("batch_stats", "var"), np.float64) + self.epsilon))
            if self.use_scale:
                inv = inv * np.asarray(get("params", "scale"), np.float64)
            res = -np.asarray(get("batch_stats", "mean"), np.float64) * inv + np.asarray(get("params", "bias"))
            return inv.astype(np.float32), res.astype(np.float32)
        stats = jnp.promote_types(self.dtype, jnp.float32)  # bf16 compute keeps f32 statistics
        inv = jax.lax.rsqrt(get("batch_stats", "var").astype(stats) + self.epsilon)
        if self.use_scale:
            inv = inv * get("params", "scale").astype(stats)
        return inv, -get("batch_stats", "mean").astype(stats) * inv + get("params", "bias").astype(stats)


def random_variables(module: nn.Module, size: int, seed: int = 0) -> dict:
    """Seeded He-normal kernels, random biases, BatchNorm scales and statistics (so inference
    exercises them), drawn with NumPy from the parameter shapes: no compile, ~1 s for ResNet50."""
    # (abstract key and input: a concrete PRNGKey or zeros would each compile a small program)
    shapes = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            x = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name == "mean":
            x = 0.1 * rng.standard_normal(shape)
        elif name in ("var", "scale"):
            x = 0.5 + rng.uniform(size=shape)
        else:  # BatchNorm beta, conv and Dense biases
            x = 0.1 * rng.standard_normal(shape)
        return np.asarray(x, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def tap_stop(name: str, x, taps: Sequence[str] | None, all_taps: Sequence[str], min_size: int) -> int:
    """Check a Keras backbone's input (NHWC, 3 channels, at least ``min_size``) and ``taps``; the
    index in ``all_taps`` of the deepest tap asked for (the last one when ``taps`` is None): where
    the forward pass may stop."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} expects NHWC inputs with 3 channels, got shape {tuple(x.shape)}")
    if min(x.shape[1:3]) < min_size:
        raise ValueError(f"{name} needs inputs of at least {min_size}x{min_size} pixels, "
                         f"got {x.shape[1]}x{x.shape[2]}")
    if taps is not None:
        unknown = [t for t in taps if t not in all_taps]
        if unknown or not taps:
            raise ValueError(f"unknown or no taps {list(taps)} for {name}; allowed: {', '.join(all_taps)}")
    return max(all_taps.index(t) for t in taps) if taps else len(all_taps) - 1


def register_keras_backbone(name: str, module: Callable[..., nn.Module], arch: KerasArch, *,
                            taps: Sequence[str], tap_strides: Mapping[str, int], min_size: int,
                            value_range: tuple[float, float], preprocess: Callable, deprocess: Callable,
                            description: str, random_size: Callable[[bool], int] | None = None) -> Callable:
    """Register the Keras backbone ``name``: ``module(include_top=, dtype=)`` builds its Flax module;
    weights ``"random"`` are :func:`random_variables` at ``random_size(include_top)`` (default
    ``min_size``; the id names the seed and the backbone), anything else a Keras file of ``arch``
    (:func:`load_keras_weights`). Returns the ``load`` function."""

    def load(weights, include_top):
        if weights == "random":
            size = random_size(include_top) if random_size else min_size
            return (random_variables(module(include_top=include_top), size),
                    "random-seed0-" + hashlib.sha256(f"{name}-v1".encode()).hexdigest()[:16])
        return load_keras_weights(arch, weights, include_top)

    @register(name)
    def _spec() -> BackboneSpec:
        return BackboneSpec(
            name=name,
            build=lambda include_top=False, dtype=jnp.float32, straight_through=False: module(
                include_top=include_top, dtype=dtype),
            taps=tuple(taps), tap_strides=tap_strides, min_size=min_size, value_range=tuple(value_range),
            preprocess=preprocess, deprocess=deprocess, load=load, description=description, num_classes=1000)

    return load
