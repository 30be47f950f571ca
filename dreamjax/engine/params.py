"""Parameterisations: the optimised per-cell array -> the image the network sees (static choice).

Pure JAX. Every parameterisation here is an invertible linear map, so a dream can start from
any image (painting, noise, grey: ``from_image``), cross octaves (image -> resize -> back) and be
clipped to the input range in image space, whatever it optimises:

* ``pixels``: the image itself (the classic DeepDream).
* ``fourier``: the image's 2-D real spectrum, each frequency scaled by 1/max(f, 1/max(h, w)),
  so a unit step in parameter space moves low frequencies more than high ones (Lucid/Lucent
  ``fft_image``; the orthonormal FFT plays the role of their sqrt(h*w) factor, and the same /4).
* ``decorrelated``: colour in the decorrelated basis of ImageNet's colour covariance
  (the square root of its SVD, normalised by its largest column norm, as Lucid/Lucent).
* ``fourier_decorrelated``: both (Fourier per decorrelated channel).

Lucid squashes the result with a sigmoid; dreamjax keeps the maps linear and clips to the
backbone's input range in image space instead, so the inverse exists and octaves work.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PARAMS = ("pixels", "fourier", "decorrelated", "fourier_decorrelated")

# sqrt of the SVD of ImageNet's RGB covariance (Lucid/Lucent's color_correlation_svd_sqrt).
_COLOR_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float64)
COLOR = (_COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0))).astype(np.float32)
COLOR_INV = np.linalg.inv(COLOR.astype(np.float64)).astype(np.float32)
FOURIER_GAIN = 4.0  # Lucid divides the inverse FFT by 4


def spectrum_scale(h: int, w: int, decay: float = 1.0) -> np.ndarray:
    """1 / max(|f|, 1/max(h, w))**decay on the rfft2 grid, [h, w//2 + 1]."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    return (1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay).astype(np.float32)


def uses_fourier(param: str) -> bool:
    return param.startswith("fourier")


def uses_color(param: str) -> bool:
    return param.endswith("decorrelated")


def param_shape(param: str, image_shape) -> tuple[int, ...]:
    """Shape of the optimised array for images of ``image_shape`` [B, H, W, C]."""
    b, h, w, c = image_shape
    return (b, h, w // 2 + 1, c, 2) if uses_fourier(param) else (b, h, w, c)


def to_image(param: str, p, image_shape):
    """Optimised array -> image [B, H, W, C] (network input space)."""
    _, h, w, _ = image_shape
    x = p
    if uses_fourier(param):
        spec = (x[..., 0] + 1j * x[..., 1]) * spectrum_scale(h, w)[None, :, :, None]
        x = jnp.fft.irfft2(spec, s=(h, w), axes=(1, 2), norm="ortho") / FOURIER_GAIN
        x = x.astype(p.dtype)
    if uses_color(param):
        x = jnp.einsum("bhwc,dc->bhwd", x, jnp.asarray(COLOR, x.dtype))
    return x


def from_image(param: str, image):
    """Image [B, H, W, C] -> the optimised array that maps back to it."""
    _, h, w, _ = image.shape
    x = image
    if uses_color(param):
        x = jnp.einsum("bhwc,dc->bhwd", x, jnp.asarray(COLOR_INV, x.dtype))
    if uses_fourier(param):
        spec = jnp.fft.rfft2(x * FOURIER_GAIN, axes=(1, 2), norm="ortho") / spectrum_scale(h, w)[None, :, :, None]
        x = jnp.stack([jnp.real(spec), jnp.imag(spec)], axis=-1).astype(image.dtype)
    return x
