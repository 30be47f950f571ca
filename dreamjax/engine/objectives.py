"""Objective terms: what a cell's dream maximises, as per-cell weights over a few terms.

Pure JAX, no I/O. Which terms exist is static (:class:`Terms`, part of ``DreamConfig``); every
weight of every term is a per-cell array on the batch axis (``CellParams.terms``, a dict keyed
by :func:`Terms.value_shapes`), so changing a weight, a channel, a class or a guide never
recompiles, and a 64-channel atlas is one program whose channel weights are one-hot rows.

Terms (each a column of the per-step loss record, after the layer taps' columns)::

    channel:<tap>    sum_c w[b, c] * spatial_mean_m( f(act[b, :, :, c]) )   f = act or act**2
                     with a per-cell spatial map m[b, y, x] (ones = the whole tap, a one-hot = Lucid's
                     neuron, a region = a mask), resized to the tap when its shape differs
    direction:<tap>  spatial_mean( <act[b, y, x, :], v[b, :]> )             (Lucid ``direction``)
    class            sum_k w[b, k] * logits[b, k]                             (needs the classifier top)
    guide            w[b] * mean_yx <act[b, y, x], g[b, best(y, x)]>          (Google's objective_guide:
                     each dream location is pulled toward its best-matching guide feature)
    tv, l2           -w[b] * total variation / mean square of the image the network sees

Blur is not a loss: every ``blur_every`` steps a cell's image is blended toward its own 5x5
Gaussian blur by ``blur[b]`` (0 = untouched), see :mod:`dreamjax.engine.transforms`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LOGITS = "logits"  # key of the classifier's logits in a feature dict (no tap has this name)
REDUCTIONS = ("mean_square", "mean")
REGULARISERS = ("tv", "l2")


class ObjectiveError(ValueError):
    """A bad objective setting, found before any compute; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class Terms:
    """Static: which objective terms a group's program has (beyond the layer taps).

    channel_taps: taps with a channel term (``channel:<tap>`` weights [B, C], map ``mask:<tap>``).
    reduction: channel terms' reduction, "mean_square" (as the layer term) or "mean" (Lucid).
    mask_shape: (h, w) of the per-cell spatial maps; (1, 1) = uniform.
    direction_taps: taps with a direction term (``direction:<tap>`` [B, C]).
    class_logits: a class term on the logits (``class`` [B, K]).
    guide_tap: tap of the guide term ("" = none): ``guide`` [B] weights, ``guide_features``
      [B, N, C] (the guide image's features at that tap, N = locations, ``guide_size`` = N).
    regularisers: which of "tv", "l2" exist (``tv`` [B], ``l2`` [B]).
    blur_every: 0 = no blur; k = blend every k steps by ``blur`` [B].
    """

    channel_taps: tuple[str, ...] = ()
    reduction: str = "mean_square"
    mask_shape: tuple[int, int] = (1, 1)
    direction_taps: tuple[str, ...] = ()
    class_logits: bool = False
    guide_tap: str = ""
    guide_size: int = 0
    regularisers: tuple[str, ...] = ()
    blur_every: int = 0

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ObjectiveError(f"objective.reduction={self.reduction!r}; choose one of: {', '.join(REDUCTIONS)}")
        bad = [r for r in self.regularisers if r not in REGULARISERS]
        if bad:
            raise ObjectiveError(f"unknown regulariser(s) {bad}; choose from: {', '.join(REGULARISERS)}")
        if len(self.mask_shape) != 2 or min(self.mask_shape) < 1:
            raise ObjectiveError(f"objective mask shape must be two sizes >= 1, got {self.mask_shape}")
        if self.blur_every < 0:
            raise ObjectiveError(f"objective.blur_every must be >= 0 (0 = no blur), got {self.blur_every}")
        if bool(self.guide_tap) != (self.guide_size > 0):
            raise ObjectiveError("a guide term needs both its tap and the number of guide locations")

    @property
    def taps(self) -> tuple[str, ...]:
        """Taps the terms read (each must also be one of the dream's taps)."""
        out = list(self.channel_taps) + list(self.direction_taps) + ([self.guide_tap] if self.guide_tap else [])
        return tuple(dict.fromkeys(out))

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the term columns of the loss record, in order."""
        return (tuple(f"channel:{t}" for t in self.channel_taps) + tuple(f"direction:{t}" for t in self.direction_taps)
                + (("class",) if self.class_logits else ()) + (("guide",) if self.guide_tap else ())
                + tuple(self.regularisers))

    def value_shapes(self, tap_channels: Mapping[str, int], num_classes: int) -> dict[str, tuple[int, ...]]:
        """Per-cell value name -> shape without the batch axis."""
        out: dict[str, tuple[int, ...]] = {}
        for t in self.channel_taps:
            out[f"channel:{t}"] = (tap_channels[t],)
            out[f"mask:{t}"] = tuple(self.mask_shape)
        for t in self.direction_taps:
            out[f"direction:{t}"] = (tap_channels[t],)
        if self.class_logits:
            out["class"] = (num_classes,)
        if self.guide_tap:
            out["guide"] = ()
            out["guide_features"] = (self.guide_size, tap_channels[self.guide_tap])
        for r in self.regularisers:
            out[r] = ()
        if self.blur_every:
            out["blur"] = ()
        return out

    def zeros(self, batch: int, tap_channels: Mapping[str, int], num_classes: int) -> dict[str, np.ndarray]:
        """Every per-cell value at its neutral setting (weights 0, maps of ones)."""
        out = {}
        for k, shape in self.value_shapes(tap_channels, num_classes).items():
            fill = 1.0 if k.startswith("mask:") else 0.0
            out[k] = np.full((batch,) + shape, fill, np.float32)
        return out

    def check_values(self, values: Mapping[str, np.ndarray], batch: int, tap_channels: Mapping[str, int],
                     num_classes: int):
        """Raise ObjectiveError naming the value whose shape or numbers are wrong."""
        want = self.value_shapes(tap_channels, num_classes)
        got = set(values or {})
        if got != set(want):
            raise ObjectiveError(f"objective values {sorted(got)} do not match the group's terms {sorted(want)}")
        for k, shape in want.items():
            v = np.asarray(values[k])
            if v.shape != (batch,) + shape:
                what = {"channel": "channels", "direction": "channels", "class": "classes"}.get(k.split(":")[0], "")
                raise ObjectiveError(f"objective value {k!r} has shape {v.shape[1:]} per cell, expected {shape}"
                                     + (f" ({shape[0]} {what} of {k.split(':')[-1]})" if what else ""))
            if not np.all(np.isfinite(v)):
                raise ObjectiveError(f"objective value {k!r} must be finite numbers")
        for t in self.channel_taps:
            m = np.asarray(values[f"mask:{t}"])
            if np.any(m < 0) or np.any(m.reshape(batch, -1).sum(axis=1) <= 0):
                raise ObjectiveError(f"the spatial map of channel:{t} must be >= 0 with a positive sum in every cell")


# ----------------------------------------------------------------------------------------------
# Term values (pure functions of the network's outputs and the per-cell values)
# ----------------------------------------------------------------------------------------------
def _f32(a):
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _crop(a, border: int):
    return a[:, border:a.shape[1] - border, border:a.shape[2] - border] if border else a


def spatial_map(m, shape: tuple[int, int], border: int = 0):
    """A per-cell map [B, hm, wm] at the tap's size [B, h, w] (identity when the sizes agree)."""
    if tuple(m.shape[1:]) != tuple(shape):
        m = jax.image.resize(m, (m.shape[0],) + tuple(shape), "linear", antialias=True)
    return _crop(m, border)


def channel_term(act, weights, m, reduction: str, border: int = 0):
    """sum_c w[b, c] * (sum_yx m f(act_c) / sum_yx m), f = square or identity; [B]."""
    a = _f32(act)
    m = spatial_map(m.astype(a.dtype), a.shape[1:3], border)
    a = _crop(a, border)
    f = jnp.square(a) if reduction == "mean_square" else a
    per_channel = jnp.einsum("bhwc,bhw->bc", f, m) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1e-12)[:, None]
    return jnp.sum(per_channel * weights, axis=1)


def direction_term(act, v, border: int = 0):
    """Mean over locations of <act, v>; [B]."""
    a = _crop(_f32(act), border)
    return jnp.mean(jnp.einsum("bhwc,bc->bhw", a, v.astype(a.dtype)), axis=(1, 2))


def class_term(logits, w):
    return jnp.sum(_f32(logits) * w, axis=1)


def guide_term(act, guide_features):
    """Google's objective_guide: each dream location's feature dotted with its best-matching
    guide feature (the match itself is not differentiated), mean over locations; [B]."""
    a = _f32(act)
    x = a.reshape(a.shape[0], -1, a.shape[-1])
    g = guide_features.astype(a.dtype)
    best = jnp.argmax(jnp.einsum("bmc,bnc->bmn", jax.lax.stop_gradient(x), g), axis=2)
    y = jnp.take_along_axis(g, best[..., None], axis=1)
    return jnp.mean(jnp.sum(x * y, axis=-1), axis=1)


def feature_terms(feats: Mapping, values: Mapping, terms: Terms, border: int = 0):
    """Columns of the network terms (class/guide/channel/direction), weighted; [B, K] or None."""
    cols = []
    for t in terms.channel_taps:
        cols.append(channel_term(feats[t], values[f"channel:{t}"], values[f"mask:{t}"], terms.reduction, border))
    for t in terms.direction_taps:
        cols.append(direction_term(feats[t], values[f"direction:{t}"], border))
    if terms.class_logits:
        cols.append(class_term(feats[LOGITS], values["class"]))
    if terms.guide_tap:
        cols.append(values["guide"] * guide_term(feats[terms.guide_tap], values["guide_features"]))
    return jnp.stack(cols, axis=1) if cols else None


def total_variation(image):
    """Mean squared difference of neighbouring pixels, per cell; [B]."""
    dy = image[:, 1:] - image[:, :-1]
    dx = image[:, :, 1:] - image[:, :, :-1]
    return jnp.mean(jnp.square(dy), axis=(1, 2, 3)) + jnp.mean(jnp.square(dx), axis=(1, 2, 3))


def image_terms(image, values: Mapping, terms: Terms):
    """Regulariser columns (negative: the dream maximises), [B, R] or None."""
    cols = []
    for r in terms.regularisers:
        pen = total_variation(image) if r == "tv" else jnp.mean(jnp.square(image), axis=(1, 2, 3))
        cols.append(-values[r] * pen)
    return jnp.stack(cols, axis=1) if cols else None
