"""Cells' objective entries -> the engine's static terms and per-cell values; checks before compute.

``check(cells, spec)`` is the one place that validates every cell's objective before any compute
(called by ``jobs.plan``): taps, channel indices against the tap's channel count, class terms on a
backbone without a classifier, guide images and masks that cannot be read or resized.
``group_terms`` / ``cell_values`` build what a batch needs (the executor calls them).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.engine.objectives import Terms
from dreamjax.engine.transforms import Transforms
from dreamjax.models.registry import get_spec
from dreamjax.outputs import images
from dreamjax.sweep.grid import Cell, ConfigError
from dreamjax.sweep.units import Entry  # noqa: F401 (re-exported for callers building entries)


def tap_channels(spec) -> dict[str, int]:
    """Channel count of every tap of a backbone (shapes only, no weights, no compute)."""
    return dict(_tap_channels(spec.name))


@functools.lru_cache(maxsize=None)
def _tap_channels(name: str) -> tuple:
    spec = get_spec(name)
    module = spec.build(include_top=False, dtype=jnp.float32, straight_through=False)
    size = max(spec.min_size, 64)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0][1], x)
    return tuple((t, int(a.shape[-1])) for t, a in shapes.items())


def _load_array(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path!r} cannot be read: no such file")
    if p.suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{what} {path!r} cannot be read: {e}") from None
    try:
        px = images.load_painting(p).pixels
    except (images.ImageError, OSError) as e:
        raise ConfigError(f"{what} {path!r} cannot be read: {e}") from None
    return px


def mask_array(mask: str, aspect: float | None = None) -> np.ndarray | None:
    """A file mask as a 2-D float array in [0, 1] (None for "", "center" and regions)."""
    if mask in ("", "center") or "," in mask:
        return None
    a = np.asarray(_load_array(mask, "objective mask"), np.float32)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ConfigError(f"objective mask {mask!r} has shape {a.shape}; it cannot be resized to a tap "
                          "(give a 2-D array or a greyscale/RGB image)")
    if a.max() > 1.0:
        a = a / 255.0
    if aspect is not None and abs(np.log((a.shape[1] / a.shape[0]) / aspect)) > np.log(1.25):
        raise ConfigError(f"objective mask {mask!r} is {a.shape[0]}x{a.shape[1]}: its aspect ratio differs from the "
                          f"image's ({aspect:.2f}) by more than 25%, so it cannot be resized to the tap without "
                          "distortion")
    if not np.any(a > 0):
        raise ConfigError(f"objective mask {mask!r} is zero everywhere: nothing would be dreamed")
    return a


def check(cells: Sequence[Cell], spec, include_top: bool | None = None):
    """Every cell's objective, validated before any compute; raises ConfigError naming the problem."""
    channels = tap_channels(spec)
    seen = set()
    for cell in cells:
        for e in cell.objective:
            if e in seen:
                continue
            seen.add(e)
            if e.tap and e.tap not in channels:
                raise ConfigError(f"objective: unknown tap {e.tap!r} for backbone {spec.name!r}; "
                                  f"allowed: {', '.join(spec.taps)}")
            if e.kind == "channel":
                n = channels[e.tap]
                bad = [i for i in e.index if i >= n]
                if bad:
                    raise ConfigError(f"objective: channel {bad[0]} of {e.tap} is out of range: {e.tap} has {n} "
                                      f"channels (0-{n - 1}) in {spec.name}")
            if e.kind == "pick" and e.index[1] > channels[e.tap]:
                raise ConfigError(f"objective: pick k={e.index[1]} but {e.tap} has {channels[e.tap]} channels")
            if e.kind == "class":
                if include_top is False or not spec.num_classes:
                    raise ConfigError(f"objective: a class term needs the classifier top, but {spec.name} is loaded "
                                      "without it (model.include_top: false)")
                bad = [i for i in e.index if i >= spec.num_classes]
                if bad:
                    raise ConfigError(f"objective: class {bad[0]} is out of range: {spec.name} has "
                                      f"{spec.num_classes} classes")
            if e.kind == "guide":
                _load_array(e.source, "objective guide image")
                if e.index[0] < spec.min_size:
                    raise ConfigError(f"objective guide size {e.index[0]} is below {spec.name}'s minimum input "
                                      f"{spec.min_size}")
            if e.kind == "direction":
                v = _direction(e)
                if v.shape != (channels[e.tap],):
                    raise ConfigError(f"objective: the direction vector for {e.tap} has {v.size} values but "
                                      f"{e.tap} has {channels[e.tap]} channels")
            if e.mask:
                mask_array(e.mask)


def _direction(e: Entry) -> np.ndarray:
    if isinstance(e.source, tuple):
        return np.asarray(e.source, np.float32)
    return np.asarray(_load_array(e.source, "objective direction vector"), np.float32).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Per group: static terms; per batch: values
# ----------------------------------------------------------------------------------------------
def needs_top(cells: Sequence[Cell]) -> bool:
    return any(e.kind == "class" for c in cells for e in c.objective)


def group_terms(cell: Cell, bb, shape) -> tuple[Terms, str, Transforms, int]:
    """(terms, param, transforms, lapnorm) of a cell's group at its bucket shape."""
    s = dict(cell.objective_static) if cell.objective_static else {}
    kinds = {}
    for e in cell.objective:
        kinds.setdefault("channel" if e.kind == "pick" else e.kind, []).append(e)
    order = {t: i for i, t in enumerate(cell.taps)}
    ch_taps = tuple(sorted({e.tap for e in kinds.get("channel", [])}, key=order.get))
    mask_shape = (1, 1)
    if any(e.mask for e in kinds.get("channel", [])):
        mask_shape = tuple(bb.tap_shapes(*shape, [ch_taps[0]])[ch_taps[0]][:2])
    guide_tap, guide_size = "", 0
    if "guide" in kinds:
        g = kinds["guide"][0]
        h, w, _ = bb.tap_shapes(g.index[0], g.index[0], [g.tap])[g.tap]
        guide_tap, guide_size = g.tap, h * w
    regs = tuple(r for r in ("tv", "l2") if r in kinds)
    terms = Terms(channel_taps=ch_taps, reduction=s.get("reduction", "mean_square"), mask_shape=mask_shape,
                  direction_taps=tuple(sorted({e.tap for e in kinds.get("direction", [])}, key=order.get)),
                  class_logits="class" in kinds, guide_tap=guide_tap, guide_size=guide_size, regularisers=regs,
                  blur_every=int(s.get("blur_every", 0)) if "blur" in kinds else 0)
    tf = dict(s.get("transforms", ()))
    transforms = Transforms(pad=int(tf.get("pad", 0)), jitter=int(tf.get("jitter", 0)),
                            scale=tuple(tf.get("scale", (1.0, 1.0))), rotate=float(tf.get("rotate", 0.0)))
    return terms, s.get("param", "pixels"), transforms, int(s.get("lapnorm", 0))


def _mask_values(mask: str, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if mask == "":
        return np.ones(shape, np.float32)
    m = np.zeros(shape, np.float32)
    if mask == "center":
        m[h // 2, w // 2] = 1.0
        return m
    if "," in mask:
        y0, y1, x0, x1 = (float(v) for v in mask.split(","))
        m[int(np.floor(y0 * h)):max(int(np.ceil(y1 * h)), int(np.floor(y0 * h)) + 1),
          int(np.floor(x0 * w)):max(int(np.ceil(x1 * w)), int(np.floor(x0 * w)) + 1)] = 1.0
        return m
    a = mask_array(mask)
    return np.asarray(images.resize_float(a[..., None], shape))[..., 0].clip(0, 1).astype(np.float32)


def cell_values(cells: Sequence[Cell], terms: Terms, bb, originals: np.ndarray,
                guide_cache: dict | None = None, picked: list | None = None) -> dict[str, np.ndarray] | None:
    """The per-cell term values of a batch (``originals``: the batch's network inputs, for pick).
    ``picked``, a list, gets per cell ``{tap: [channel, ...]}``: the channels a pick entry chose on
    this painting, strongest (or weakest, or median) first, for the cell's record."""
    if picked is not None:
        picked[:] = [{} for _ in cells]
    if not terms.columns and not terms.blur_every:
        return None
    channels = {t: s[-1] for t, s in bb.tap_shapes(*originals.shape[1:3]).items()}
    values = terms.zeros(len(cells), channels, bb.spec.num_classes)
    picks = {}
    pick_taps = sorted({e.tap for c in cells for e in c.objective if e.kind == "pick"})
    if pick_taps:  # neural-dream's channel_mode: the painting's own strongest/weakest/median channels
        feats = bb.features(jnp.asarray(originals), tuple(pick_taps))
        picks = {t: np.asarray(jnp.mean(jnp.square(feats[t].astype(jnp.float32)), axis=(1, 2))) for t in pick_taps}
    guide_cache = {} if guide_cache is None else guide_cache
    for b, cell in enumerate(cells):
        for e in cell.objective:
            if e.kind in ("channel", "pick"):
                if e.kind == "pick":
                    mode, k = e.index
                    order = np.argsort(-picks[e.tap][b], kind="stable")
                    mid = (len(order) - k) // 2
                    idx = {"strong": order[:k], "weak": order[::-1][:k], "median": order[mid:mid + k]}[mode]
                    if picked is not None:
                        picked[b][e.tap] = [int(i) for i in idx]
                else:
                    idx = np.asarray(e.index)
                values[f"channel:{e.tap}"][b, idx] += e.weight
                if e.mask:
                    values[f"mask:{e.tap}"][b] = _mask_values(e.mask, terms.mask_shape)
            elif e.kind == "direction":
                values[f"direction:{e.tap}"][b] += e.weight * _direction(e)
            elif e.kind == "class":
                values["class"][b, np.asarray(e.index)] += e.weight
            elif e.kind == "guide":
                key = (e.source, e.index[0], e.tap)
                if key not in guide_cache:
                    px = images.resize_uint8(_load_array(e.source, "objective guide image"), (e.index[0],) * 2)
                    f = bb.features(bb.preprocess(px[None]), (e.tap,))[e.tap]
                    guide_cache[key] = np.asarray(f, np.float32).reshape(-1, f.shape[-1])
                values["guide"][b] = e.weight
                values["guide_features"][b] = guide_cache[key]
            else:  # tv, l2, blur
                values[e.kind][b] = e.weight
    return values


def start_images(cells: Sequence[Cell], pixels: np.ndarray) -> np.ndarray:
    """Per cell: the painting, uniform noise around grey (from the cell's own seed), or flat grey."""
    out = np.array(pixels, np.float32)
    for b, c in enumerate(cells):
        if c.start == "grey":
            out[b] = 127.5
        elif c.start == "noise":
            rng = np.random.default_rng(c.key_seed())
            out[b] = 127.5 + rng.uniform(-1.0, 1.0, out[b].shape) * (127.5 * c.start_noise)
    return out


def record(cell: Cell) -> Mapping:
    """The objective part of a cell's record."""
    return {"objective": [dict(kind=e.kind, tap=e.tap, index=list(e.index), weight=e.weight, mask=e.mask,
                               source=e.source if isinstance(e.source, str) else list(e.source))
                          for e in cell.objective],
            "objective_static": {k: (dict(v) if k == "transforms" else v) for k, v in cell.objective_static},
            "start": cell.start, "unit": cell.unit, "original_colors": cell.original_colors}
