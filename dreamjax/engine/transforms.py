"""Image-space operations of a dream step: robustness transforms, Laplacian-pyramid gradient
normalisation, Gaussian blur. Pure JAX, per cell, never mixing the batch axis.

Transformation robustness (Lucid/Lucent ``standard_transforms``: pad, jitter, random scale,
random rotation): the network sees a randomly transformed copy of each cell's image, drawn from
that cell's own key, and the gradient flows back through the transform (``jax.vjp``), so what
the dream learns must survive small shifts, zooms and turns. Here one affine resample does the
jitter, scale and rotation together (bilinear; an integer shift at scale 1 and angle 0 is exact).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Static transform settings (each cell draws its own values every step).

    pad: constant padding in pixels (with the value-range midpoint: Lucid pads with grey);
    jitter: random whole-pixel translation in [-jitter, jitter];
    scale: (lo, hi): a random zoom among 11 steps from lo to hi;
    rotate: a random whole-degree angle in [-rotate, rotate].
    """

    pad: int = 0
    jitter: int = 0
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0

    def __post_init__(self):
        if self.pad < 0 or self.jitter < 0 or self.rotate < 0:
            raise ValueError(f"transforms: pad, jitter and rotate must be >= 0, got {self}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"transforms.scale must be [lo, hi] with 0 < lo <= hi, got {list(self.scale)}")

    @property
    def active(self) -> bool:
        return bool(self.pad or self.jitter or self.rotate or self.scale != (1.0, 1.0))

    @property
    def resamples(self) -> bool:
        return bool(self.jitter or self.rotate or self.scale != (1.0, 1.0))


SCALE_STEPS = 11  # Lucid's random_scale list: 11 scales from lo to hi


def _tables(tf: Transforms):
    """Host-made tables of the allowed scales and of (cos, sin) of the allowed whole-degree
    angles (Lucid draws from lists too). A cell's draw is an index, so its transform is the same
    bits whatever batch it runs in (no transcendental function evaluated on the device)."""
    scales = np.linspace(tf.scale[0], tf.scale[1], SCALE_STEPS if tf.scale[0] != tf.scale[1] else 1)
    deg = np.arange(-int(tf.rotate), int(tf.rotate) + 1) * (np.pi / 180)
    return (np.float32(1.0) / scales.astype(np.float32), np.cos(deg).astype(np.float32),
            np.sin(deg).astype(np.float32))


def draw(tf: Transforms, key):
    """One cell's (dy, dx), 1/scale, cos and sin of its angle for this step."""
    kj, ks, kr = jax.random.split(key, 3)
    inv_scales, cos, sin = _tables(tf)
    shift = jax.random.randint(kj, (2,), -tf.jitter, tf.jitter + 1).astype(jnp.float32)  # Lucid: a crop
    i = jax.random.randint(ks, (), 0, len(inv_scales))
    j = jax.random.randint(kr, (), 0, len(cos))
    return shift, jnp.asarray(inv_scales)[i], jnp.asarray(cos)[j], jnp.asarray(sin)[j]


def _affine(image, shift, inv_scale, cos, sin):
    """Resample one image [H, W, C]: output pixel p reads input at R(-a) (p - c) / s + c - shift."""
    h, w, _ = image.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype), indexing="ij")
    dy, dx = yy - cy, xx - cx
    cos, sin, inv_scale = (jnp.asarray(v, image.dtype) for v in (cos, sin, inv_scale))
    sy = (cos * dy - sin * dx) * inv_scale + cy - shift[0]
    sx = (sin * dy + cos * dx) * inv_scale + cx - shift[1]
    sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [sy, sx], order=1, mode="nearest")  # noqa: E731
    return jnp.stack([sample(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def apply(tf: Transforms, images, keys, fill: float = 0.0):
    """The transformed images each cell's network sees; differentiable in ``images``."""
    x = images
    if tf.pad:
        p = tf.pad
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
    if tf.resamples:
        def one(im, k):
            return _affine(im, *draw(tf, k))

        x = jax.vmap(one)(x, keys)
    return x


# ----------------------------------------------------------------------------------------------
# Laplacian pyramid (TensorFlow's first DeepDream notebook: lap_split / lap_normalize)
# ----------------------------------------------------------------------------------------------
_K1 = np.asarray([1.0, 4.0, 6.0, 4.0, 1.0])
_K5 = (np.outer(_K1, _K1) / np.outer(_K1, _K1).sum()).astype(np.float32)


def _depthwise(x, kernel, stride=1, lhs_dilation=1, padding="SAME"):
    c = x.shape[-1]
    k = jnp.asarray(np.repeat(kernel[:, :, None, None], c, axis=3), x.dtype)  # [5, 5, 1, C]
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, lhs_dilation=(lhs_dilation,) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _down(x):
    return _depthwise(x, _K5, stride=2)


def _up(x, shape):
    """Zero-insert upsampling then the 5x5 kernel x 4, to exactly ``shape`` (h, w)."""
    h, w = shape
    n, m = x.shape[1:3]
    pad = ((2, h - 2 * n + 3), (2, w - 2 * m + 3))
    return _depthwise(x, _K5 * 4.0, lhs_dilation=2, padding=pad)


def lap_split(x, levels: int):
    """[coarsest, ..., finest] band images; ``lap_merge`` of them is ``x`` again."""
    bands = []
    for _ in range(levels):
        if min(x.shape[1:3]) < 2:
            break
        lo = _down(x)
        bands.append(x - _up(lo, x.shape[1:3]))
        x = lo
    bands.append(x)
    return bands[::-1]


def lap_merge(bands):
    x = bands[0]
    for hi in bands[1:]:
        x = _up(x, hi.shape[1:3]) + hi
    return x


def lap_normalize(g, levels: int, eps: float = 1e-10):
    """Each band of each cell's gradient divided by its own RMS, then merged (Google's
    ``lap_normalize``): fine and coarse structure get equal say in the step."""
    def norm(band):
        rms = jnp.sqrt(jnp.mean(jnp.square(band), axis=(1, 2, 3), keepdims=True))
        return band / jnp.maximum(rms, eps)

    return lap_merge([norm(b) for b in lap_split(g, levels)])


def blur(x):
    """5x5 binomial blur per channel, edges replicated."""
    xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    return _depthwise(xp, _K5, padding="VALID")
