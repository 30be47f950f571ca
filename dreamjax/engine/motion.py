"""Motion: how frame t+1 of a chain starts from frame t. Pure JAX, no I/O.

A zoom loop or a video is a chain of dreams (DESIGN: "Motion is a sequence of cells"):

* feedback loop (Google's notebook, neural-dream ``-zoom``, pytorch-deepdream's Ouroboros):
  ``start[t+1] = affine(dream[t])``, with a per-cell zoom factor, rotation angle and
  translation;
* video (pytorch-deepdream's video mode and the flow-based forks):
  ``start[t] = blend * source[t] + (1 - blend) * flow_warp(dream[t-1], flow[t])``, where
  ``flow[t]`` maps each pixel of source frame t to where it was in source frame t-1.

Every function takes a batch (cells first) and per-cell values on the batch axis, so several
chains advance together in one compiled program. Sampling is bilinear with a static border
``mode``: "reflect" (default: a rotated or translated frame has no black corners for the dream
to grow eyes on), "edge" (repeat the border pixel) or "zeros" (OpenCV's ``warpAffine`` default,
as pytorch-deepdream).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MODES = ("reflect", "edge", "zeros")


class Affine(NamedTuple):
    """Per-cell feedback transform applied between frames (batch axis first).

    zoom: f32[B], > 1 magnifies about the centre (Google's notebook zooms 1/(1-0.05) ~ 1.05 a
      frame; pytorch-deepdream 1.04). angle: f32[B], degrees counter-clockwise a frame (as
      OpenCV's ``getRotationMatrix2D``). shift: f32[B, 2], pixels (dx, dy) a frame.
    """

    zoom: jax.Array
    angle: jax.Array
    shift: jax.Array


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"motion.border={mode!r} is not allowed; choose one of: {', '.join(MODES)}")


def _fold(coord, size, mode):
    """Source coordinate -> an index inside [0, size-1] (reflect / edge); zeros masks later."""
    if mode == "reflect":
        # Mirror about the pixel edges (-0.5 and size-0.5): period 2*size, as np.pad(..., "symmetric").
        period = 2.0 * size
        c = jnp.mod(coord + 0.5, period)
        c = jnp.where(c >= size, period - c, c) - 0.5
        return jnp.clip(c, 0.0, size - 1.0)
    return jnp.clip(coord, 0.0, size - 1.0)


def sample_bilinear(image, ys, xs, mode: str = "reflect"):
    """One image [H, W, C] sampled at float coordinates ys, xs [H', W'] (pixel centres at
    integers) -> [H', W', C]."""
    _check_mode(mode)
    h, w = image.shape[:2]
    inside = (ys >= -0.5) & (ys <= h - 0.5) & (xs >= -0.5) & (xs <= w - 0.5)
    y = _fold(ys, h, mode)
    x = _fold(xs, w, mode)
    y0 = jnp.floor(y)
    x0 = jnp.floor(x)
    wy = (y - y0)[..., None]
    wx = (x - x0)[..., None]
    y0i = y0.astype(jnp.int32)
    x0i = x0.astype(jnp.int32)
    y1i = jnp.minimum(y0i + 1, h - 1)
    x1i = jnp.minimum(x0i + 1, w - 1)
    top = image[y0i, x0i] * (1 - wx) + image[y0i, x1i] * wx
    bottom = image[y1i, x0i] * (1 - wx) + image[y1i, x1i] * wx
    out = top * (1 - wy) + bottom * wy
    if mode == "zeros":
        out = jnp.where(inside[..., None], out, 0.0)
    return out.astype(image.dtype)


def affine_coords(height: int, width: int, zoom, angle, shift):
    """Where output pixel (y, x) of one cell samples its source: the inverse of
    ``p -> R(angle) * zoom * (p - c) + c + shift`` (c = the image centre)."""
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                          indexing="ij")
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    dx = xs - cx - shift[0]
    dy = ys - cy - shift[1]
    t = jnp.deg2rad(angle)
    cos, sin = jnp.cos(t), jnp.sin(t)
    # Image rows grow downwards, so a counter-clockwise rotation on screen is (x, y) ->
    # (x cos + y sin, -x sin + y cos); its inverse is the transpose.
    sx = (cos * dx - sin * dy) / zoom + cx
    sy = (sin * dx + cos * dy) / zoom + cy
    return sy, sx


def affine_warp(images, transform: Affine, mode: str = "reflect"):
    """Each cell's image [B, H, W, C] under its own zoom / rotation / shift."""
    b, h, w, _ = images.shape

    def one(img, z, a, s):
        sy, sx = affine_coords(h, w, z, a, s)
        return sample_bilinear(img, sy, sx, mode)

    return jax.vmap(one)(images, jnp.asarray(transform.zoom, jnp.float32),
                         jnp.asarray(transform.angle, jnp.float32), jnp.asarray(transform.shift, jnp.float32))


def flow_warp(images, flow, mode: str = "edge"):
    """Backward warp along a dense flow: ``out[b, y, x] = images[b, y + flow[...,1], x + flow[...,0]]``.

    ``flow`` [B, H, W, 2] (dx, dy) is the flow from frame t to frame t-1 (OpenCV's
    ``calcOpticalFlow*(frame_t, frame_prev)``), so warping the dream of frame t-1 aligns it
    with frame t.
    """
    b, h, w, _ = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")

    def one(img, f):
        return sample_bilinear(img, ys + f[..., 1], xs + f[..., 0], mode)

    return jax.vmap(one)(images, jnp.asarray(flow, jnp.float32))


def blend(source, warped, weight):
    """``weight * source + (1 - weight) * warped`` per cell (pytorch-deepdream's video blend:
    weight 1 = every frame dreamed from its source alone, 0 = the warped previous dream only)."""
    wgt = jnp.asarray(weight, source.dtype).reshape((-1,) + (1,) * (source.ndim - 1))
    return wgt * source + (1 - wgt) * warped


def video_start(source, prev_dream, flow, weight, use_flow: bool, mode: str = "edge"):
    """The start of frame t of each cell's video chain (frame 0 = ``source``; the caller passes
    ``weight = 1`` there). ``use_flow=False`` blends the previous dream unwarped."""
    warped = flow_warp(prev_dream, flow, mode) if use_flow else prev_dream
    return blend(source, warped, weight)


def temporal_difference(frames, prev_frames, flow=None, mode: str = "edge"):
    """Per-cell mean |frame_t - warp(frame_{t-1})| (the stability figure's y value); ``flow``
    None = no warp. Frames [B, H, W, C] in any consistent range."""
    prev = prev_frames if flow is None else flow_warp(prev_frames, flow, mode)
    return jnp.mean(jnp.abs(frames - prev), axis=tuple(range(1, frames.ndim)))
