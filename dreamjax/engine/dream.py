"""The dream engine: DeepDream for a batch of cells in one compiled program.

Pure JAX, no file I/O. A *cell* is one painting under one layer-weight set and one
set of hyperparameters. Everything that can differ per cell without changing array
shapes rides on the batch axis (:class:`CellParams`); everything that changes the
traced program is static (:class:`DreamConfig`, :class:`OctavePlan`, the image shape).

Data flow per octave (host loop, because shapes change between octaves)::

    init_octave(images)  ->  OctaveState
    run_steps(state, n)  ->  OctaveState      # n steps in one jitted while_loop on the device
                                              # (see Dreamer.device_loop), buffers donated,
                                              # frames + per-tap losses kept
    end_octave(state)    ->  next images       # DLwP lost-detail re-injection

:class:`DreamRun` strings these together and is resumable: its whole state is a
small pytree of arrays plus two integers (octave, step), which ``run.py``
checkpoints with orbax.

Why every cell gets its own gradient from one ``grad`` call: the loss is a sum of
per-cell losses, BatchNorm uses stored statistics and nothing mixes the batch axis,
so d(sum)/d(image[b]) = d(loss[b])/d(image[b]).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamjax.config import (
    COMPUTE_DTYPES,
    CPU_KERNELS,
    DETAIL_MODES,
    NORMS,
    OBJECTIVES,
    OPTIMIZERS,
    TILINGS,
    ConfigError,
)
from dreamjax.engine import objectives, transforms
from dreamjax.engine import params as parameterisations
from dreamjax.engine.objectives import ObjectiveError, Terms
from dreamjax.engine.transforms import Transforms
from dreamjax.models.ops import KernelsUnavailable

log = logging.getLogger(__name__)

__all__ = ["NORMS", "OBJECTIVES", "DETAIL_MODES", "OPTIMIZERS", "COMPUTE_DTYPES", "ConfigError", "DreamConfig",
           "OctavePlan", "CellParams", "Dreamer", "DreamRun", "dream"]

# ----------------------------------------------------------------------------------------------
# Static configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DreamConfig:
    """Static settings: they define the compiled program.

    taps: tapped layers (order = columns of ``CellParams.layer_weights``).
    norm: per-cell gradient normalisation: "l2" (Deep Learning with Python,
      ``tf.math.l2_normalize``), "mean_abs" (keras.io example, Google's notebook),
      "std" (TensorFlow tutorial).
    objective: "mean_square" = mean(act[b, c:-c, c:-c]**2) (DLwP);
      "keras_io" = sum(cropped**2) / size(uncropped) (keras.io example);
      "mean" = mean(act) with no crop (TensorFlow tutorial);
      "l2" = sum(act**2) / 2, whose gradient is the activation itself (Google's notebook,
      ``objective_L2``: ``dst.diff[:] = dst.data``).
    border: border crop in activation pixels (DLwP: 2).
    frame_every: keep the image every k steps for iteration GIFs (0 = none).
    clip: project the image onto the backbone's input range after each step.
    tile_size: 0 = whole image; otherwise gradients are computed tile by tile (TF tutorial),
      bounding memory by the tile.
    tiles: "cover" = tiles cover the whole image (the last row/column shifted inwards), the
      random roll is in [-jitter, jitter]; "tf" = the TF tutorial's ``TiledGradients``: tiles
      start at multiples of tile_size and the last start is skipped unless it is the only one
      (what it leaves out gets no gradient that step; the roll moves it), the roll is
      ``tf.random.uniform(minval=-jitter, maxval=jitter)``, i.e. in [-jitter, jitter).
    optimizer: "sgd" (plain normalised-gradient ascent, as all four references) or an optax
      optimizer applied after the per-cell normalisation.
    grad_clip: if > 0, clip each update element to [-grad_clip, grad_clip] (optax.clip).
    micro_batch: 0 = the gradient of all B cells in one pass; k > 0 = in passes of k cells, one
      after the other inside the same program (``lax.map``). Each cell's gradient is the same
      either way; on a CPU a pass over fewer, larger images keeps the caches warm (one image
      already fills the cores), on a GPU the whole batch in one pass fills the device. ``run.py``
      picks it per platform unless the config sets it.
    compute_dtype: dtype of the backbone's activations; the image and its updates stay float32
      (float64 only with ``jax_enable_x64``: the image is float64 too; used by the parity tests,
      where float32 rounding would let two correct implementations part ways).
    """

    taps: tuple[str, ...]
    norm: str = "l2"
    objective: str = "mean_square"
    border: int = 2
    frame_every: int = 0
    clip: bool = False
    value_range: tuple[float, float] = (-1.0, 1.0)
    tile_size: int = 0
    tiles: str = "cover"
    micro_batch: int = 0
    optimizer: str = "sgd"
    grad_clip: float = 0.0
    compute_dtype: str = "float32"
    straight_through: bool = False  # model.straight_through: the dream-path module variant (ReLU6 backward)
    # Bake the weights into the compiled program as constants: XLA then folds the BatchNorm
    # arithmetic at compile time (measured 6 % faster gradient on CPU, InceptionV3 256 px), at the
    # price of slower compiles and cached programs that embed the weights.
    constant_weights: bool = False
    # Who runs the convolutions on a CPU backend (models/ops.py resolve_kernels): "auto" = oneDNN
    # bfloat16 on AMX / AVX512-BF16 where the extension builds, else XLA; "xla"; "onednn"
    # (an error where it cannot run); "onednn_f32". The image and its updates stay float32.
    cpu_kernels: str = "xla"
    # --- objectives and rendering (issue 13) ---
    # terms: which objective terms beyond the layer taps exist (their weights are per cell, in
    #   CellParams.terms); param: what is optimised (engine/params.py); transforms: robustness
    #   transforms drawn per cell (engine/transforms.py); lapnorm: Laplacian-pyramid levels of the
    #   gradient normalisation applied before ``norm`` (0 = off; Google's notebook uses 4).
    terms: Terms = Terms()
    param: str = "pixels"
    transforms: Transforms = Transforms()
    lapnorm: int = 0

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the loss record's columns: one per tap (unweighted), then each term (weighted)."""
        return tuple(self.taps) + self.terms.columns

    @property
    def image_dtype(self):
        return jnp.float64 if self.compute_dtype == "float64" else jnp.float32

    def __post_init__(self):
        _one_of("dream.norm", self.norm, NORMS)
        _one_of("dream.objective", self.objective, OBJECTIVES)
        _one_of("dream.tiles", self.tiles, TILINGS)
        _one_of("dream.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("dream.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _one_of("dream.cpu_kernels", self.cpu_kernels, CPU_KERNELS)
        if not self.taps:
            raise ConfigError("layers.taps is empty; name at least one tap")
        if self.border < 0:
            raise ConfigError(f"dream.border must be >= 0, got {self.border}")
        if self.frame_every < 0:
            raise ConfigError(f"dream.frame_every must be >= 0 (0 = no frames), got {self.frame_every}")
        if self.compute_dtype == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError("dream.compute_dtype=float64 needs JAX_ENABLE_X64=1")
        if self.tile_size < 0:
            raise ConfigError(f"dream.tile_size must be >= 0 (0 = untiled), got {self.tile_size}")
        if self.micro_batch < 0:
            raise ConfigError(f"dream.micro_batch must be >= 0 (0 = the whole batch), got {self.micro_batch}")
        _one_of("objective.param", self.param, parameterisations.PARAMS)
        missing = [t for t in self.terms.taps if t not in self.taps]
        if missing:
            raise ConfigError(f"objective term tap(s) {missing} are not among the dream's taps "
                              f"{list(self.taps)}; add them (with layer weight 0)")
        if self.lapnorm < 0:
            raise ConfigError(f"objective.lapnorm must be >= 0 levels (0 = off), got {self.lapnorm}")
        if self.lapnorm and self.param != "pixels":
            raise ConfigError(f"objective.lapnorm normalises a pixel gradient; it cannot be combined with "
                              f"objective.param={self.param!r} (its own 1/f scaling does that job)")


@dataclasses.dataclass(frozen=True)
class OctavePlan:
    """Octave shapes (static).

    exponents: octave ``e`` has shape ``dim * scale**e`` (DLwP: -2, -1, 0 with scale 1.4;
      TF tutorial: -2..2 with scale 1.3, i.e. it also dreams *above* the painting's size).
    detail: "dlwp" re-injects the detail lost by shrinking after every octave (DLwP);
      "google" carries the dream's difference from each octave base upward (Google's
      notebook, whose bases are successive shrinks of one another); "none" only resizes.

    Each mode sizes and resizes its octaves as its source does (:meth:`shapes`): "dlwp"
    ``int(dim / scale**i)`` and ``tf.image.resize`` (bilinear, half-pixel); "google"
    ``round(dim * (1 / scale))`` from each base to the next and ``scipy.ndimage.zoom(order=1)``
    (linear, corners aligned) for bases and detail; "none" (TF tutorial)
    ``int(float32(dim) * float32(scale**e))`` and ``tf.image.resize``.
    """

    exponents: tuple[int, ...] = (-2, -1, 0)
    scale: float = 1.4
    detail: str = "dlwp"

    def __post_init__(self):
        _one_of("dream.octave_detail", self.detail, DETAIL_MODES)
        if not self.exponents:
            raise ConfigError("dream.octaves is empty; give at least one octave")
        if not self.scale > 1.0:
            raise ConfigError(f"dream.octave_scale must be > 1, got {self.scale}")
        if list(self.exponents) != sorted(self.exponents):
            raise ConfigError(f"dream.octaves must increase (small to large), got {list(self.exponents)}")

    @classmethod
    def keras(cls, num_octaves: int, scale: float, detail: str = "dlwp") -> "OctavePlan":
        """DLwP / keras.io: ``num_octaves`` octaves ending at the painting's own size."""
        if num_octaves < 1:
            raise ConfigError(f"dream.num_octaves must be >= 1, got {num_octaves}")
        return cls(tuple(range(-(num_octaves - 1), 1)), scale, detail)

    @classmethod
    def from_settings(cls, s: dict) -> "OctavePlan":
        """From the dream config: explicit ``octaves`` exponents, else ``num_octaves`` ending at 0."""
        if s.get("octaves") is not None:
            return cls(tuple(int(e) for e in s["octaves"]), float(s["octave_scale"]), s["octave_detail"])
        return cls.keras(int(s["num_octaves"]), float(s["octave_scale"]), s["octave_detail"])

    def check(self, height: int, width: int, *, backbone: str, min_size: int, deepest_stride: int,
              border: int, objective: str):
        """Every octave must be at least the backbone's minimum input, and its deepest tap larger
        than the border crop; raises ConfigError naming the octave, its size and the fix."""
        for i, (h, w) in enumerate(self.shapes(height, width)):
            if min(h, w) < min_size:
                raise ConfigError(
                    f"octave {i} of the plan (exponent {self.exponents[i]}, scale {self.scale}) is {h}x{w} for a "
                    f"{height}x{width} image, below {backbone}'s minimum input size {min_size}; use fewer "
                    f"octaves (dream.num_octaves), a smaller dream.octave_scale or a larger data.image_size")
            if objective != "mean" and min(h, w) // deepest_stride <= 2 * border:
                raise ConfigError(
                    f"octave {i} is {h}x{w} for a {height}x{width} image: its deepest tap (stride "
                    f"{deepest_stride}) is no larger than the border crop (dream.border={border}); use fewer "
                    f"octaves (dream.num_octaves), a smaller dream.border or a larger data.image_size")

    def shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        if self.detail == "google":
            # Google's notebook: each base is the previous one nd.zoom'ed by 1.0/scale; scipy's
            # output size is int(round(dim * zoom)).
            shapes = [(height, width)]
            for _ in range(-min(self.exponents)):
                h, w = shapes[-1]
                shapes.append((int(round(h * (1.0 / self.scale))), int(round(w * (1.0 / self.scale)))))
            by_exp = {-i: s for i, s in enumerate(shapes)}
            return [by_exp[e] if e <= 0 else _scaled(height, width, self.scale, e) for e in self.exponents]
        if self.detail == "none":
            return [_scaled_tf(height, width, self.scale, e) for e in self.exponents]
        return [_scaled(height, width, self.scale, e) for e in self.exponents]


def _scaled(h, w, scale, e):
    # DLwP writes int(dim / scale**i); TF tutorial int(dim * scale**e). Same intent, but the
    # float rounding differs at the boundary, so keep each source's own expression.
    if e <= 0:
        return int(h / scale ** (-e)), int(w / scale ** (-e))
    return int(h * scale ** e), int(w * scale ** e)


def _scaled_tf(h, w, scale, e):
    # TF tutorial: tf.cast(tf.cast(base_shape, tf.float32) * (scale ** e), tf.int32): the Python
    # float scale**e becomes float32, the product is float32, the cast truncates.
    f = np.float32(scale ** e)
    return int(np.float32(h) * f), int(np.float32(w) * f)


def _one_of(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------
# Per-cell values
# ----------------------------------------------------------------------------------------------
class CellParams(NamedTuple):
    """Per-cell values, batch axis first. None of them changes the compiled program."""

    layer_weights: jax.Array  # f32[B, T]
    step_size: jax.Array  # f32[B]
    max_loss: jax.Array  # f32[B]; +inf = no limit
    jitter: jax.Array  # i32[B]; random roll amplitude in pixels (0 = none)
    iterations: jax.Array  # i32[B]; steps per octave
    key: jax.Array  # u32[B, 2]; raw PRNG key data
    # Objective term values, {name: f32[B, ...]} as ``Terms.value_shapes`` names them (None = no
    # terms beyond the layer taps).
    terms: Any = None

    @classmethod
    def make(cls, layer_weights, step_size, max_loss=None, jitter=0, iterations=30, seed=0, dtype=np.float32,
             terms=None):
        """Broadcast python/numpy values to a batch (B = len(layer_weights)). ``dtype`` is that of
        the weights, steps and loss limits: float32, or float64 for a float64 dream (a float32
        step of 0.01 is 0.01 * (1 - 2e-8), which 60 normalised steps turn into a 1e-6 change).
        ``terms``: the per-cell objective term values (``Terms.zeros`` names and shapes them)."""
        w = np.asarray(layer_weights, dtype)
        if w.ndim != 2:
            raise ConfigError(f"layer_weights must be [cells, taps], got shape {w.shape}")
        b = w.shape[0]

        def col(v, dtype):
            return np.broadcast_to(np.asarray(v, dtype), (b,)).copy()

        mx = np.inf if max_loss is None else max_loss
        seeds = col(seed, np.uint32)
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(int(s)))) for s in seeds])
        terms = None if terms is None else {k: np.asarray(v, np.float32) for k, v in terms.items()}
        return cls(w, col(step_size, dtype), col(mx, dtype), col(jitter, np.int32),
                   col(iterations, np.int32), keys.astype(np.uint32), terms)

    def take(self, idx) -> "CellParams":
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], self)

    def validate(self, num_taps: int):
        w = np.asarray(self.layer_weights)
        if w.shape[1] != num_taps:
            raise ConfigError(f"layers.weights has {w.shape[1]} values per cell but layers.taps has "
                                     f"{num_taps}; give one weight per tap")
        if not np.all(np.isfinite(w)):
            raise ConfigError("layers.weights must be finite numbers")
        if np.any(np.asarray(self.step_size) <= 0):
            raise ConfigError(f"dream.step_size must be > 0, got {np.asarray(self.step_size).min()}")
        if np.any(np.asarray(self.iterations) < 0):
            raise ConfigError("dream.iterations must be >= 0")
        if np.any(np.asarray(self.jitter) < 0):
            raise ConfigError("dream.jitter must be >= 0 (pixels)")


# ----------------------------------------------------------------------------------------------
# The update rule as an optax chain
# ----------------------------------------------------------------------------------------------
def _per_cell(fn, g):
    return fn(g.reshape(g.shape[0], -1)).reshape((-1,) + (1,) * (g.ndim - 1))


def normalize_per_cell(mode: str) -> optax.GradientTransformation:
    """Divide each cell's gradient by its own norm (never the batch's).

    The epsilons are those of each source: DLwP ``tf.math.l2_normalize`` (sum of squares
    floored at 1e-12), keras.io ``max(mean|g|, 1e-6)``, TF tutorial ``std + 1e-8``.
    """
    _one_of("dream.norm", mode, NORMS)

    def update(updates, state, params=None):
        del params
        g = updates
        if mode == "l2":
            denom = _per_cell(lambda v: jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=1), 1e-12)), g)
        elif mode == "mean_abs":
            denom = _per_cell(lambda v: jnp.maximum(jnp.mean(jnp.abs(v), axis=1), 1e-6), g)
        else:
            denom = _per_cell(lambda v: jnp.std(v, axis=1) + 1e-8, g)
        return g / denom, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_per_cell(step_size: jax.Array) -> optax.GradientTransformation:
    """Multiply cell b's update by step_size[b]: gradient *ascent* (optax adds updates)."""

    def update(updates, state, params=None):
        del params
        return updates * step_size.reshape((-1,) + (1,) * (updates.ndim - 1)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_update_rule(cfg: DreamConfig, step_size: jax.Array) -> optax.GradientTransformation:
    """normalise per cell -> [optimizer moments] -> scale by the cell's step -> [clip]."""
    moments = {
        "sgd": [],
        "adam": [optax.scale_by_adam()],
        "rmsprop": [optax.scale_by_rms()],
        "momentum": [optax.trace(decay=0.9)],
    }[cfg.optimizer]
    clip = [optax.clip(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(normalize_per_cell(cfg.norm), *moments, scale_per_cell(step_size), *clip)


# ----------------------------------------------------------------------------------------------
# Objective and gradient
# ----------------------------------------------------------------------------------------------
def tap_losses(acts: dict, taps: Sequence[str], cfg: DreamConfig) -> jax.Array:
    """Per-cell, per-tap objective values, [B, T], computed in at least float32."""
    cols = []
    c = cfg.border
    for t in taps:
        a = acts[t].astype(jnp.promote_types(acts[t].dtype, jnp.float32))
        if cfg.objective == "mean":
            cols.append(jnp.mean(a, axis=(1, 2, 3)))
            continue
        inner = a[:, c:a.shape[1] - c, c:a.shape[2] - c, :] if c else a
        sq = jnp.sum(jnp.square(inner), axis=(1, 2, 3))
        if cfg.objective == "l2":
            cols.append(0.5 * sq)
            continue
        denom = math.prod(inner.shape[1:]) if cfg.objective == "mean_square" else math.prod(a.shape[1:])
        cols.append(sq / denom)
    return jnp.stack(cols, axis=1)


def _roll(images, shifts):
    """Roll each cell by its own (dy, dx)."""
    return jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(images, shifts)


def loss_columns(feats: dict, values, cfg: DreamConfig) -> jax.Array:
    """Per-cell loss record: the taps' unweighted values, then each term's weighted value; [B, T+K]."""
    per_tap = tap_losses(feats, cfg.taps, cfg)
    if not cfg.terms.columns or values is None:
        return per_tap
    border = 0 if cfg.objective == "mean" else cfg.border
    extra = objectives.feature_terms(feats, values, cfg.terms, border)
    return per_tap if extra is None else jnp.concatenate([per_tap, extra.astype(per_tap.dtype)], axis=1)


def total_loss(cols, weights):
    """What a cell maximises: the layer taps weighted by ``layer_weights``, plus every term column."""
    t = weights.shape[1]
    return jnp.sum(cols[:, :t] * weights, axis=1) + jnp.sum(cols[:, t:], axis=1)


def make_grad_fn(feature_fn: Callable, cfg: DreamConfig):
    """``grad(variables, images, weights, values=None) -> (loss columns [B, T+K], grads [B,H,W,C])``,
    the gradient of the network terms with respect to the images the network sees.

    ``weights`` are the layer weights [B, T]; ``values`` the per-cell term values (``CellParams.terms``).
    Untiled: one forward/backward of the whole image. Tiled (TF tutorial): the image is
    cut into tile_size squares (the last row/column of tiles is shifted inwards so every
    tile has the same static shape); each tile's loss gradient is added into the image
    gradient, one tile at a time inside ``lax.fori_loop``, so peak memory is that of one
    tile. Where the image fits in one tile, both paths compute the same thing.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    ncols = len(cfg.columns)

    def loss_and_grad(variables, images, cell):
        weights, values = cell

        def total(x):
            cols = loss_columns(feature_fn(variables, x.astype(dtype)), values, cfg)
            return jnp.sum(total_loss(cols, weights)), cols

        (_, cols), g = jax.value_and_grad(total, has_aux=True)(images)
        return cols, g.astype(images.dtype)

    if not cfg.tile_size:
        grad = _micro_batched(loss_and_grad, cfg.micro_batch)
    else:
        t = cfg.tile_size

        def tiled(variables, images, cell):
            h, w = images.shape[1:3]
            if h <= t and w <= t:
                return loss_and_grad(variables, images, cell)
            th, tw = min(t, h), min(t, w)
            starts_of = _tf_tile_starts if cfg.tiles == "tf" else _tile_starts
            ys = starts_of(h, th)
            xs = starts_of(w, tw)
            starts = jnp.asarray([(y, x) for y in ys for x in xs], jnp.int32)

            def body(i, carry):
                losses, grads = carry
                y, x, z = starts[i, 0], starts[i, 1], jnp.int32(0)  # one index dtype, also under x64
                tile = jax.lax.dynamic_slice(images, (z, y, x, z), (images.shape[0], th, tw, images.shape[3]))
                cols, g = loss_and_grad(variables, tile, cell)
                cur = jax.lax.dynamic_slice(grads, (z, y, x, z), g.shape)
                grads = jax.lax.dynamic_update_slice(grads, cur + g, (z, y, x, z))
                return losses + cols, grads

            zeros = (jnp.zeros((images.shape[0], ncols), cfg.image_dtype), jnp.zeros_like(images))
            losses, grads = jax.lax.fori_loop(0, starts.shape[0], body, zeros)
            return losses / starts.shape[0], grads

        grad = _micro_batched(tiled, cfg.micro_batch)

    def grad_fn(variables, images, weights, values=None):
        return grad(variables, images, (weights, values))

    return grad_fn


def make_dream_grad(feature_fn: Callable, cfg: DreamConfig):
    """``grad(variables, p, params, keys) -> (loss columns [B, T+K+R], d total / d p)``.

    ``p`` is the optimised array (``cfg.param``); the chain is p -> image (parameterisation) ->
    per-cell random roll and robustness transforms -> network terms, plus the regularisers on the
    image. The gradient of the network terms with respect to the network's input comes from
    :func:`make_grad_fn` (tiled and micro-batched as configured); it is carried back through the
    transforms and the parameterisation with ``jax.vjp``, both cheap and per cell.
    """
    net_grad = make_grad_fn(feature_fn, cfg)
    lo, hi = cfg.value_range
    fill = (lo + hi) / 2.0  # pad with grey, as Lucid
    tf = cfg.transforms

    def grad(variables, p, params: "CellParams", keys, image_shape):
        image, back_param = jax.vjp(lambda q: parameterisations.to_image(cfg.param, q, image_shape), p)
        amp = params.jitter[:, None]
        top = amp if cfg.tiles == "tf" else amp + 1  # tf: maxval excluded, as tf.random.uniform
        shifts = jax.vmap(lambda kk, a, b: jax.random.randint(kk, (2,), -a[0], jnp.maximum(b[0], 1 - a[0])))(
            keys, amp, top)
        tkeys = jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(keys)

        if tf.active:
            x, back_seen = jax.vjp(lambda img: transforms.apply(tf, _roll(img, shifts), tkeys, fill), image)
        else:  # a roll is a permutation: its transpose is the opposite roll (not autodiff's pad + update)
            x, back_seen = _roll(image, shifts), lambda gx: (_roll(gx, -shifts),)
        cols, gx = net_grad(variables, x, params.layer_weights, params.terms)
        g = back_seen(gx)[0]
        if cfg.terms.regularisers:
            def reg(img):
                c = objectives.image_terms(img, params.terms, cfg.terms)
                return jnp.sum(c), c

            (_, rcols), gr = jax.value_and_grad(reg, has_aux=True)(image)
            cols = jnp.concatenate([cols, rcols.astype(cols.dtype)], axis=1)
            g = g + gr.astype(g.dtype)
        return cols, back_param(g.astype(image.dtype))[0]

    return grad


def pass_size(batch: int, micro_batch: int) -> int:
    """Cells per gradient pass: the largest divisor of ``batch`` not above ``micro_batch``
    (0 = the whole batch)."""
    if not micro_batch:
        return batch
    return max(d for d in range(1, min(micro_batch, batch) + 1) if batch % d == 0)


def _micro_batched(grad_fn, micro_batch: int):
    """``grad_fn`` over the batch in passes of :func:`pass_size` cells, one after the other in
    one program; 0 = one pass.

    Pass ``i`` takes cells ``i, i + P, i + 2P, ...`` (P passes): a batch sharded in contiguous
    blocks over devices then gives every device its own cells in every pass.
    """
    if not micro_batch:
        return grad_fn

    def passes(variables, images, cell):
        b = images.shape[0]
        k = pass_size(b, micro_batch)
        if k == b:
            return grad_fn(variables, images, cell)

        def split(a):  # [B, ...] -> [P, k, ...]
            return jnp.swapaxes(a.reshape(k, b // k, *a.shape[1:]), 0, 1)

        def join(a):  # [P, k, ...] -> [B, ...]
            return jnp.swapaxes(a, 0, 1).reshape(b, *a.shape[2:])

        per_tap, g = jax.lax.map(lambda xw: grad_fn(variables, *xw),
                                 (split(images), jax.tree_util.tree_map(split, cell)))
        return join(per_tap), join(g)

    return passes


def _tf_tile_starts(n, t):
    """TF tutorial: ``tf.range(0, n, t)[:-1]``, or ``[0]`` when that is empty."""
    return list(range(0, n, t))[:-1] or [0]


def _tile_starts(n, t):
    starts = list(range(0, n - t + 1, t))
    if starts[-1] + t < n:
        starts.append(n - t)
    return starts


# ----------------------------------------------------------------------------------------------
# One octave on the device
# ----------------------------------------------------------------------------------------------
class OctaveState(NamedTuple):
    image: jax.Array  # the optimised array: f32[B, H, W, 3] in network input space for cfg.param
    # "pixels", else the parameterisation's array (Dreamer.image_of gives the image)
    opt_state: Any  # optax state of the update rule
    step: jax.Array  # i32[], steps done in this octave
    stopped: jax.Array  # bool[B], loss passed max_loss (DLwP: stop after that step)
    losses: jax.Array  # f32[S, B, T+K], loss columns (cfg.columns) at each step (NaN where frozen)
    frames: jax.Array  # f32[F, B, H, W, 3], image every frame_every steps (F = 0 if off)


def _image_shape(state: OctaveState) -> tuple[int, ...]:
    # The frames buffer [F, B, H, W, C] carries the image shape even when F = 0; the optimised
    # array may not (a Fourier spectrum's width is W // 2 + 1).
    return tuple(state.frames.shape[1:])


def _octave_key(state: OctaveState) -> tuple[int, int, int]:
    """(B, H, W) of an octave state: what a prefetched octave program is filed under."""
    return (int(state.stopped.shape[0]), *_image_shape(state)[1:3])


def _step_key(cell_key, octave, step):
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(cell_key), octave), step)


class Dreamer:
    """Compiled octave programs for one static signature (backbone, taps, config, plan).

    ``steps_capacity`` sizes the loss buffer (the largest iteration count of any cell in
    the group); it is static so that cells with fewer iterations share the program.
    """

    def __init__(self, backbone, cfg: DreamConfig, plan: OctavePlan, steps_capacity: int,
                 variables=None):
        self.backbone = backbone
        self.cfg = cfg
        self.plan = plan
        self.capacity = int(steps_capacity)
        self.taps = backbone.check_taps(cfg.taps)
        if cfg.terms.class_logits and not backbone.include_top:
            raise ConfigError(f"a class term needs the classifier top, but backbone {backbone.name!r} was "
                              "loaded without it (load_backbone(..., include_top=True))")
        if variables is None:
            try:
                # float64 (parity runs) stays on XLA: the oneDNN kernel is bfloat16 / float32.
                kernels = "xla" if cfg.compute_dtype == "float64" else cfg.cpu_kernels
                variables = backbone.dream_variables_for(kernels)
            except KernelsUnavailable as e:
                raise ConfigError(str(e)) from None
        self.variables = variables
        feature_fn = backbone.feature_fn(self.taps, straight_through=cfg.straight_through, dtype=cfg.compute_dtype,
                                         logits=cfg.terms.class_logits)
        self._grad = make_dream_grad(feature_fn, cfg)
        run_steps, one_step = self._run_steps, self._one_step
        if cfg.constant_weights:  # the variables argument is then unused, so jit drops it
            consts = self.variables
            run_steps = lambda _v, *a: self._run_steps(consts, *a)  # noqa: E731
            one_step = lambda _v, *a: self._one_step(consts, *a)  # noqa: E731
        self._run = jax.jit(run_steps, donate_argnums=(1,))
        self._step = jax.jit(one_step, donate_argnums=(1,))
        self._finish = jax.jit(self._finish_steps, donate_argnums=(0,))
        # Where the steps of an octave loop: on the device, one while_loop per call, on every
        # platform. (On XLA:CPU a while body used to keep the input-gradient convolutions'
        # kernels in a transposed layout its convolution libraries refuse, falling back to a slow
        # loop emitter, so CPU dreams were driven step by step from the host. The backward
        # kernels precomputed in ``Backbone.dream_variables`` removed that: the device loop is now
        # 1.1-1.2x faster than the host loop on CPU, results/bench/README.md.) ``device_loop =
        # False`` keeps the host loop (one jitted, donated step per call) for comparison.
        self.device_loop = True
        self._init = jax.jit(self._init_state)
        self._ahead: dict = {}  # (B, H, W) -> Future of the compiled octave program (prefetch)
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None

    # --- checks before any compute -----------------------------------------------------------
    def validate(self, height: int, width: int, params: CellParams):
        params.validate(len(self.taps))
        if self.cfg.terms.columns or params.terms:
            shapes = self.backbone.tap_shapes(height, width, self.taps)
            try:
                self.cfg.terms.check_values(params.terms or {}, len(params.step_size),
                                            {t: s[-1] for t, s in shapes.items()}, self.backbone.spec.num_classes)
            except ObjectiveError as e:
                raise ConfigError(str(e)) from None
        if np.any(np.asarray(params.iterations) > self.capacity):
            raise ConfigError(f"dream.iterations {int(np.max(params.iterations))} exceeds the group's "
                                     f"steps capacity {self.capacity}")
        self.plan.check(height, width, backbone=self.backbone.name, min_size=self.backbone.min_size,
                        deepest_stride=max(self.backbone.tap_strides[t] for t in self.taps),
                        border=self.cfg.border, objective=self.cfg.objective)

    # --- device programs ---------------------------------------------------------------------
    def _init_state(self, images, params: CellParams):
        b, h, w, c = images.shape
        rule = make_update_rule(self.cfg, params.step_size)
        nf = (self.capacity // self.cfg.frame_every) if self.cfg.frame_every else 0
        p = parameterisations.from_image(self.cfg.param, images.astype(self.cfg.image_dtype))
        return OctaveState(
            image=p,
            opt_state=rule.init(p),
            step=jnp.zeros((), jnp.int32),
            stopped=jnp.zeros((b,), bool),
            losses=jnp.full((self.capacity, b, len(self.cfg.columns)), jnp.nan, self.cfg.image_dtype),
            frames=jnp.zeros((nf, b, h, w, c), self.cfg.image_dtype),
        )

    def _step_body(self, variables, params: CellParams, octave, image_shape):
        """One dream step of every active cell: ``body(state) -> state`` (step + 1)."""
        rule = make_update_rule(self.cfg, params.step_size)
        cfg = self.cfg

        def active_mask(s):
            return (s.step < params.iterations) & ~s.stopped

        def body(s: OctaveState):
            k = self._frames_every(s)
            active = active_mask(s)
            keys = jax.vmap(_step_key, in_axes=(0, None, None))(params.key, octave, s.step)
            per_tap, g = self._grad(variables, s.image, params, keys, image_shape)
            if cfg.lapnorm:  # pixels only (checked in DreamConfig)
                g = transforms.lap_normalize(g, cfg.lapnorm)
            updates, opt_state = rule.update(g, s.opt_state, s.image)
            image = optax.apply_updates(s.image, updates)
            image = self._after_update(image, params, s.step, image_shape)
            sel = active.reshape((-1,) + (1,) * (image.ndim - 1))
            image = jnp.where(sel, image, s.image)
            opt_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
                if new.ndim and new.shape[0] == active.shape[0] else new, opt_state, s.opt_state)
            loss = total_loss(per_tap, params.layer_weights)
            losses = s.losses.at[s.step].set(jnp.where(active[:, None], per_tap, jnp.nan))
            # DLwP applies the step, then stops if the loss (before the step) passed max_loss.
            stopped = s.stopped | (active & (loss > params.max_loss))
            frames = s.frames
            if k:
                fi = s.step // k
                take = ((s.step + 1) % k == 0) & (fi < frames.shape[0])
                shown = parameterisations.to_image(cfg.param, image, image_shape)
                frames = frames.at[jnp.minimum(fi, frames.shape[0] - 1)].set(
                    jnp.where(take, shown, frames[jnp.minimum(fi, frames.shape[0] - 1)]))
            return OctaveState(image, opt_state, s.step + 1, stopped, losses, frames)

        return body, active_mask

    def _in_image_space(self, fn, p, image_shape):
        """``fn`` applied to the image of ``p``, mapped back to the parameterisation."""
        param = self.cfg.param
        if param == "pixels":
            return fn(p)
        return parameterisations.from_image(param, fn(parameterisations.to_image(param, p, image_shape)))

    def _after_update(self, p, params: CellParams, step, image_shape):
        """Periodic blur (per-cell blend) and the clip to the input range, both in image space."""
        cfg = self.cfg
        lo, hi = cfg.value_range
        every = cfg.terms.blur_every
        if not (cfg.clip or every):
            return p

        def fix(img):
            if every:
                w = jnp.where((step + 1) % every == 0, params.terms["blur"], 0.0).astype(img.dtype)
                img = img + w[:, None, None, None] * (transforms.blur(img) - img)
            if cfg.clip:
                img = optax.projections.projection_box(img, lo, hi)
            return img

        return self._in_image_space(fix, p, image_shape)

    def image_of(self, state: OctaveState):
        """The images [B, H, W, 3] of an octave state (network input space)."""
        return parameterisations.to_image(self.cfg.param, state.image, _image_shape(state))

    def _frames_every(self, state: OctaveState) -> int:
        return self.cfg.frame_every if state.frames.shape[0] else 0  # no frame slot: fewer steps than k

    def _run_steps(self, variables, state: OctaveState, params: CellParams, octave, n_steps):
        end = jnp.minimum(state.step + n_steps, self.capacity)
        body, active_mask = self._step_body(variables, params, octave, _image_shape(state))

        def cond(s):
            return (s.step < end) & jnp.any(active_mask(s))

        s = jax.lax.while_loop(cond, body, state)
        return self._finish_steps(s, end)

    def _one_step(self, variables, state: OctaveState, params: CellParams, octave):
        """One step (host loop, see ``device_loop``); the caller checks the loop condition."""
        return self._step_body(variables, params, octave, _image_shape(state))[0](state)

    def _finish_steps(self, s: OctaveState, end):
        k = self._frames_every(s)
        if k:
            # Slots past the last step taken hold the current image: frozen cells keep their
            # final image; a later chunk overwrites the slots it reaches.
            fill = jnp.arange(s.frames.shape[0]) >= s.step // k
            shown = parameterisations.to_image(self.cfg.param, s.image, _image_shape(s))
            s = s._replace(frames=jnp.where(fill[:, None, None, None, None], shown[None], s.frames))
        return s._replace(step=jnp.asarray(end, jnp.int32))

    # --- host API ------------------------------------------------------------------------------
    def init_octave(self, images, params: CellParams) -> OctaveState:
        if not isinstance(images, jax.Array):  # a host array: jnp.asarray would compile per shape
            images = jax.device_put(np.asarray(images, self.cfg.image_dtype))
        if images.dtype != self.cfg.image_dtype:
            images = images.astype(self.cfg.image_dtype)
        return self._init(images, params)

    def prefetch(self, shapes: Sequence[tuple[int, int]], params: CellParams) -> None:
        """Start compiling the octave programs for image ``shapes`` (H, W) of a batch with these
        ``params`` in a background thread, one after the other, so that a later octave's program
        compiles while this octave runs (XLA compiles on one core; a dream step runs on all).
        :meth:`run_steps` takes a prefetched program when its shape comes up. Device loop on a
        single device only (elsewhere nothing happens: the programs compile when first run)."""
        if not self.device_loop or jax.device_count() > 1 or os.environ.get("DREAMJAX_PREFETCH", "1") == "0":
            return  # (DREAMJAX_PREFETCH=0: compile every octave when it starts, for A/B runs)
        batch = int(np.shape(params.step_size)[0])
        for h, w in shapes:
            key = (batch, int(h), int(w))
            if key not in self._ahead:
                if self._compiler is None:
                    self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dreamjax-compile")
                self._ahead[key] = self._compiler.submit(self._compile_octave, key, params)

    def _compile_octave(self, key, params: CellParams):
        b, h, w = key
        images = jax.ShapeDtypeStruct((b, h, w, 3), self.cfg.image_dtype)
        state = jax.eval_shape(self._init_state, images, params)
        return self._run.lower(self.variables, state, params, jnp.int32(0), jnp.int32(1)).compile()

    def _prefetched(self, state: OctaveState):
        fut = self._ahead.get(_octave_key(state))
        if fut is None:
            return None
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - the jitted path compiles it again and reports its own error
            log.debug("prefetched octave program failed to compile (%s); compiling it in line", e)
            return None

    def run_steps(self, state: OctaveState, params: CellParams, octave: int, n_steps: int) -> OctaveState:
        if self.device_loop:
            args = (self.variables, state, params, jnp.int32(octave), jnp.int32(n_steps))
            compiled = self._prefetched(state)
            if compiled is not None:
                try:
                    return compiled(*args)
                except (TypeError, ValueError):  # arguments unlike the prefetched ones: the jitted path
                    self._ahead.pop(_octave_key(state), None)
            return self._run(*args)
        # Host loop, same condition as the device loop's: stop at `end` or when no cell is active.
        step = int(state.step)
        end = min(step + int(n_steps), self.capacity)
        iterations = np.asarray(params.iterations)
        stopped = np.asarray(state.stopped)
        watch = bool(np.any(np.isfinite(np.asarray(params.max_loss))))  # else `stopped` never changes
        octave = jnp.int32(octave)
        while step < end and np.any((step < iterations) & ~stopped):
            state = self._step(self.variables, state, params, octave)
            step += 1
            if watch:
                stopped = np.asarray(state.stopped)
        return self._finish(state, jnp.int32(end))

    def programs(self) -> int:
        """How many octave programs this dreamer has compiled (one per octave shape), in line or
        ahead of time (:meth:`prefetch`)."""
        ahead = sum(1 for f in self._ahead.values() if f.done() and f.exception() is None)
        return (self._run if self.device_loop else self._step)._cache_size() + ahead

    def resize(self, images, shape) -> np.ndarray:
        """The plan's resize, on the host: ``tf.image.resize`` bilinear, or in google mode
        ``nd.zoom(order=1)``."""
        fn = _zoom_linear if self.plan.detail == "google" else _resize
        return fn(images, tuple(int(s) for s in shape))

    def lower(self, height: int, width: int, batch: int):
        """The lowered octave program for a shape (for cost analysis and compile counting)."""
        params = CellParams.make(np.ones((batch, len(self.taps))), 1.0, iterations=1)
        images = jax.ShapeDtypeStruct((batch, height, width, 3), self.cfg.image_dtype)
        state = jax.eval_shape(self._init_state, images, params)
        if not self.device_loop:  # the program run_steps runs: one step
            return self._step.lower(self.variables, state, params, jnp.int32(0))
        return self._run.lower(self.variables, state, params, jnp.int32(0), jnp.int32(1))


def _linear_taps(n: int, m: int, half_pixel: bool):
    """For resampling an axis of ``n`` pixels to ``m``: the two source indices and the weight of
    the second, per output pixel. ``half_pixel``: tf.image.resize's centres (sample (o + 0.5) n/m
    - 0.5, clamped to the edge pixels); else scipy.ndimage.zoom(order=1)'s aligned corners."""
    if half_pixel:
        pos = np.clip((np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5, 0.0, n - 1)
    else:
        pos = np.arange(m, dtype=np.float64) * ((n - 1) / (m - 1) if m > 1 else 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, pos - lo


def _bilinear(images, shape, half_pixel: bool) -> np.ndarray:
    # Separable: rows, then columns, two taps each, on the host in the images' own precision
    # (float32; float64 for parity runs). An octave's resizes are a few MFLOP: on the device each
    # new shape was a compilation (25 in a one-painting run).
    x = np.asarray(images)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    for axis, m in ((1, shape[0]), (2, shape[1])):
        n = x.shape[axis]
        if n == m:
            continue
        lo, hi, frac = _linear_taps(n, m, half_pixel)
        a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
        x = a + (b - a) * frac.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    return x


def _resize(images, shape) -> np.ndarray:
    """Bilinear without antialiasing, half-pixel centres: what tf.image.resize does by default
    (DLwP's and the TF tutorial's resize), so octave parity with Keras/TF holds. On the host."""
    return _bilinear(images, shape, half_pixel=True)


def _zoom_linear(images, shape) -> np.ndarray:
    """scipy.ndimage.zoom(x, (1, h/h0, w/w0, 1), order=1) as Google's notebook calls it: linear
    interpolation with the corner pixels aligned, output pixel o samples input o*(n-1)/(m-1)."""
    return _bilinear(images, shape, half_pixel=False)


# ----------------------------------------------------------------------------------------------
# A whole dream, resumable
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DreamRun:
    """The octave loop on the host. Its state is (octave, OctaveState, finished octaves).

    ``advance(n)`` runs at most n steps (crossing an octave boundary ends the call, so a
    checkpoint can be taken at each octave end). ``done`` tells when every octave ran.
    """

    dreamer: Dreamer
    originals: np.ndarray  # f32[B, H, W, 3], network input space, the bucket shape
    params: CellParams
    octave: int = 0
    state: OctaveState | None = None
    octave_images: list = dataclasses.field(default_factory=list)  # f32[B,h,w,3] per finished octave
    octave_losses: list = dataclasses.field(default_factory=list)  # f32[S,B,T] per finished octave
    octave_frames: list = dataclasses.field(default_factory=list)  # f32[F,B,h,w,3] per finished octave
    detail: Any = None  # google mode: detail carried between octaves

    def __post_init__(self):
        self.shapes = self.dreamer.plan.shapes(*self.originals.shape[1:3])
        self.dreamer.validate(*self.originals.shape[1:3], self.params)

    @property
    def done(self) -> bool:
        return self.octave >= len(self.shapes)

    def _start_octave(self):
        # Octave transitions run on the host (NumPy): the images are small, and on the device
        # every new shape of a resize or a sum was another compilation.
        d, i = self.dreamer, self.octave
        shape = self.shapes[i]
        if d.plan.detail == "google":
            base = self._google_bases[i]
            img = base if self.detail is None else base + d.resize(self.detail, shape)
        elif i == 0:
            d.prefetch(self.shapes[1:], self.params)  # later octaves compile while this one runs
            img = d.resize(self._host_originals, shape)
        else:
            img = d.resize(self.octave_images[-1], shape)
        sharding = getattr(self.originals, "sharding", None)  # placed like originals (batch axis sharded)
        self.state = d.init_octave(jax.device_put(np.asarray(img, d.cfg.image_dtype), sharding), self.params)

    @functools.cached_property
    def _host_originals(self) -> np.ndarray:
        return np.asarray(self.originals)  # (one transfer when originals live on the devices)

    @functools.cached_property
    def _google_bases(self) -> list:
        """Google's octave bases: each shrunk from the next larger one, not from the painting
        (octaves above the painting's size are resized from it directly)."""
        d, orig = self.dreamer, self._host_originals
        bases: list = [None] * len(self.shapes)
        base = orig
        for j in range(len(self.shapes) - 1, -1, -1):
            if d.plan.exponents[j] > 0:
                bases[j] = d.resize(orig, self.shapes[j])
                continue
            if self.shapes[j] != tuple(base.shape[1:3]):
                base = d.resize(base, self.shapes[j])
            bases[j] = base
        return bases

    def _end_octave(self):
        d, i, s = self.dreamer, self.octave, self.state
        img = np.asarray(d.image_of(s))
        shape = self.shapes[i]
        if d.plan.detail == "dlwp":
            orig = self._host_originals
            prev = self.shapes[0] if i == 0 else self.shapes[i - 1]
            shrunk = d.resize(orig, prev)
            lost = d.resize(orig, shape) - d.resize(shrunk, shape)
            img = img + lost
        elif d.plan.detail == "google":
            self.detail = img - self._google_bases[i]
        self.octave_images.append(img)
        self.octave_losses.append(np.asarray(s.losses))
        self.octave_frames.append(np.asarray(s.frames))
        self.state = None
        self.octave += 1

    def advance(self, max_steps: int | None = None) -> int:
        """Run up to ``max_steps`` steps of the current octave; returns steps run."""
        if self.done:
            return 0
        if self.state is None:
            self._start_octave()
        remaining = self.dreamer.capacity - int(self.state.step)
        n = remaining if max_steps is None else min(max_steps, remaining)
        if n > 0:
            self.state = self.dreamer.run_steps(self.state, self.params, self.octave, n)
        if int(self.state.step) >= self.dreamer.capacity or not self._any_active():
            self._end_octave()
        return n

    def _any_active(self):
        s = self.state
        return bool(np.any((np.asarray(s.step) < np.asarray(self.params.iterations)) & ~np.asarray(s.stopped)))

    def run(self, callback: Callable[["DreamRun"], None] | None = None, chunk: int | None = None):
        while not self.done:
            self.advance(chunk)
            if callback is not None:
                callback(self)
        return self

    @property
    def final(self) -> np.ndarray:
        """The dreamed images (network input space, bucket shape)."""
        if not self.done:
            raise RuntimeError("the dream has not finished")
        return self.octave_images[-1]


def dream(backbone, images, params: CellParams, cfg: DreamConfig, plan: OctavePlan,
          steps_capacity: int | None = None) -> DreamRun:
    """Dream a batch of preprocessed images (same shape) to the end; returns the finished run."""
    cap = int(np.max(params.iterations)) if steps_capacity is None else steps_capacity
    dreamer = Dreamer(backbone, cfg, plan, max(cap, 1))
    return DreamRun(dreamer, np.asarray(images, cfg.image_dtype), params).run()
