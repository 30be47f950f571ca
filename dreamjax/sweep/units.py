"""The ``objective`` config node -> per-cell objective entries. Pure Python: no JAX.

Units are written the way people write them::

    mixed4:97          one channel of a tap
    block9:[3,17]      several channels (one term, summed)
    block9:0-63        an inclusive range
    class:1            an ImageNet class by index ...
    class:goldfish     ... or by name from the bundled labels (dreamjax/data/imagenet_classes.txt)

A cell's objective is a tuple of :class:`Entry` (hashable: it is part of the cell's fingerprint);
the executor turns them into the engine's per-cell term values (``sweep/objective.py``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from typing import Any, Mapping, Sequence

from dreamjax import files

KINDS = ("channel", "direction", "class", "guide", "pick", "tv", "l2", "blur")
STARTS = ("painting", "noise", "grey")
PICK_MODES = ("strong", "weak", "median")
CLASS_TAPS = ("logits",)  # atlas "taps" whose channels are classes: one class term per cell
PARAMS = ("pixels", "fourier", "decorrelated", "fourier_decorrelated")  # = engine/params.py PARAMS
KNOWN_KEYS = {"name", "layer", "reduction", "terms", "tv", "l2", "blur", "blur_every", "atlas", "layer_atlas", "start",
              "start_noise", "param", "transforms", "lapnorm", "original_colors"}


class UnitError(ValueError):
    """A unit or objective setting that cannot be understood (raised while planning)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One weighted term of one cell.

    kind: channel | direction | class | guide | pick | tv | l2 | blur
    tap: the tap ("" for class and the regularisers)
    index: channels / classes (channel, class); (mode, k) for pick
    weight: the term's weight
    mask: "" (whole tap), "center" (Lucid's neuron: the centre unit), "y0,y1,x0,x1" fractions (a
      region), or a path to a mask image / .npy file
    source: guide image path; direction vector as a tuple of floats or a .npy path
    """

    kind: str
    tap: str = ""
    index: tuple = ()
    weight: float = 1.0
    mask: str = ""
    source: Any = ""


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return tuple(files.IMAGENET_LABELS.read_text().split())


def class_index(name: Any, num_classes: int = 1000) -> int:
    """A class by index or by its bundled label (case and spaces/underscores ignored)."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        i = int(name)
        if not 0 <= i < num_classes:
            raise UnitError(f"class index {i} is out of range: the classifier has {num_classes} classes "
                            f"(0-{num_classes - 1})")
        return i
    names = class_names()
    key = str(name).strip().lower().replace(" ", "_")
    lowered = [n.lower() for n in names]
    if key in lowered:
        return lowered.index(key)
    close = difflib.get_close_matches(key, lowered, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(names[lowered.index(c)]) for c in close)}?" if close else ""
    raise UnitError(f"unknown class name {name!r} (not among the {len(names)} bundled ImageNet labels){hint}")


def _indices(text: str, unit: str) -> tuple[int, ...]:
    text = text.strip()
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise UnitError(f"unit {unit!r}: the range {a}-{b} is empty")
        return tuple(range(a, b + 1))
    if text.startswith("[") and text.endswith("]"):
        parts = [p for p in text[1:-1].split(",") if p.strip()]
    else:
        parts = [text]
    try:
        out = tuple(int(p) for p in parts)
    except ValueError:
        raise UnitError(f"unit {unit!r}: channels must be an index, a list [i,j] or a range a-b") from None
    if not out or any(i < 0 for i in out):
        raise UnitError(f"unit {unit!r}: channel indices must be >= 0")
    return out


def parse_unit(unit: Any) -> tuple[str, str, tuple]:
    """``"block9:[3,17]"`` -> ("channel", "block9", (3, 17)); ``"class:goldfish"`` -> ("class", "", (1,))."""
    s = str(unit).strip()
    if ":" not in s:
        raise UnitError(f"unit {unit!r}: write TAP:CHANNEL (block9:97, block9:[3,17], block9:0-63) or "
                        "class:INDEX|NAME")
    tap, rest = s.split(":", 1)
    tap = tap.strip()
    if tap == "class":
        rest = rest.strip()
        items = [p for p in rest[1:-1].split(",")] if rest.startswith("[") else [rest]
        return "class", "", tuple(class_index(p.strip().strip("'\"")) for p in items if p.strip())
    return "channel", tap, _indices(rest, s)


def _mask(m: Any) -> str:
    if m in (None, "", "none"):
        return ""
    if m == "center":
        return "center"
    if isinstance(m, (list, tuple)):
        if len(m) != 4 or not all(0 <= float(v) <= 1 for v in m) or m[0] >= m[1] or m[2] >= m[3]:
            raise UnitError(f"objective mask {list(m)}: a region is [y0, y1, x0, x1] as fractions 0..1 "
                            "with y0<y1, x0<x1")
        return ",".join(str(float(v)) for v in m)
    return str(m)  # a file: checked (readable, resizable) before compute


def term_entries(terms: Sequence[Any]) -> list[Entry]:
    """The ``objective.terms`` list -> entries (without the per-cell atlas channel)."""
    out = []
    for i, t in enumerate(terms or ()):
        where = f"objective.terms[{i}]"
        if isinstance(t, str):
            t = {"unit": t}
        if not isinstance(t, Mapping):
            raise UnitError(f"{where}: a term is a unit string or a mapping, got {t!r}")
        t = dict(t)
        w = float(t.pop("weight", 1.0))
        mask = _mask(t.pop("mask", None))
        if "unit" in t:
            kind, tap, idx = parse_unit(t.pop("unit"))
            if kind == "class" and mask:
                raise UnitError(f"{where}: a class term has no spatial mask")
            out.append(Entry(kind, tap, idx, w, mask))
        elif "pick" in t:
            mode, k = t.pop("mode", "strong"), int(t.pop("k", 1))
            if mode not in PICK_MODES:
                raise UnitError(f"{where}: pick mode {mode!r}; choose one of: {', '.join(PICK_MODES)}")
            if k < 1:
                raise UnitError(f"{where}: pick k must be >= 1, got {k}")
            out.append(Entry("pick", str(t.pop("pick")), (mode, k), w, mask))
        elif "direction" in t:
            vec = t.pop("vector", None)
            if vec is None:
                raise UnitError(f"{where}: a direction term needs a vector (a list of floats or a .npy file)")
            src = tuple(float(v) for v in vec) if isinstance(vec, (list, tuple)) else str(vec)
            out.append(Entry("direction", str(t.pop("direction")), (), w, "", src))
        elif "guide" in t:
            tap = t.pop("tap", None)
            if not tap:
                raise UnitError(f"{where}: a guide term needs its tap (tap: block9)")
            size = int(t.pop("size", 128))
            out.append(Entry("guide", str(tap), (size,), w, "", str(t.pop("guide"))))
        else:
            raise UnitError(f"{where}: say what it is: unit: TAP:CHANNELS | class:NAME, pick: TAP, direction: TAP "
                            f"or guide: IMAGE; got keys {sorted(t)}")
        if t:
            raise UnitError(f"{where}: unknown key(s) {sorted(t)}")
    return out


@dataclasses.dataclass(frozen=True)
class Objective:
    """One job's objective settings, parsed. ``cells()`` gives each cell's entries."""

    name: str
    layer: float
    entries: tuple[Entry, ...]
    atlas: tuple[str, tuple[int, ...], float, str] | None  # (tap, channels, weight, mask)
    layer_atlas: tuple[tuple[str, ...], str, int, float] | None  # (taps, pick mode, k, weight)
    start: str
    start_noise: float
    original_colors: bool
    static: tuple[tuple[str, Any], ...]  # reduction, param, transforms, lapnorm, blur_every

    def cells(self) -> list[tuple[str, tuple[Entry, ...]]]:
        """(label, entries) per cell of a painting: one, or one per atlas channel."""
        if self.layer_atlas is not None:  # one cell per tap: its k strongest channels on the painting
            taps, mode, k, w = self.layer_atlas
            return [(f"{tap}_{mode}{k}", self.entries + (Entry("pick", tap, (mode, k), w),)) for tap in taps]
        if self.atlas is None:
            return [("", self.entries)]
        tap, channels, w, mask = self.atlas
        if tap in CLASS_TAPS:  # a class atlas: cell c dreams class c on the logits
            return [(f"{tap}_{c:04d}", self.entries + (Entry("class", "", (c,), w),)) for c in channels]
        return [(f"{tap}_{c:04d}", self.entries + (Entry("channel", tap, (c,), w, mask),)) for c in channels]


def _plain(x: Any) -> Any:
    """Config containers (OmegaConf's included) as plain dicts and lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        return x
    return [_plain(v) for v in x]


def parse_objective(node: Mapping | None) -> Objective:
    """The ``objective`` config node (absent = today's layer objective on the painting)."""
    node = _plain(node or {})
    unknown = sorted(set(node) - KNOWN_KEYS)
    if unknown:
        raise UnitError(f"unknown objective setting(s) {unknown}; allowed: {', '.join(sorted(KNOWN_KEYS))}")
    entries = term_entries(node.get("terms") or ())
    for k in ("tv", "l2", "blur"):
        w = float(node.get(k) or 0.0)
        if w < 0:
            raise UnitError(f"objective.{k}={w} must be >= 0")
        if w:
            entries.append(Entry(k, "", (), w))
    atlas = None
    if node.get("atlas"):
        a = dict(node["atlas"])
        tap = str(a.get("tap", ""))
        ch = a.get("channels")
        if not tap or ch is None:
            raise UnitError("objective.atlas needs tap and channels (a range 0-63 or a list)")
        if tap in CLASS_TAPS and isinstance(ch, (list, tuple)):  # classes by index or by name
            channels = tuple(class_index(c) for c in ch)
        else:
            channels = _indices(f"[{','.join(str(c) for c in ch)}]" if isinstance(ch, (list, tuple)) else str(ch),
                                f"{tap}:{ch}")
        mask = _mask(a.get("mask"))
        if tap in CLASS_TAPS and mask:
            raise UnitError(f"objective.atlas: a {tap} atlas (one class per cell) has no spatial mask")
        atlas = (tap, channels, float(a.get("weight", 1.0)), mask)
    layer_atlas = None
    if node.get("layer_atlas"):
        la = dict(node["layer_atlas"])
        if atlas is not None:
            raise UnitError("objective: give either atlas (channels of one tap) or layer_atlas (taps), not both")
        taps = tuple(str(t) for t in la.get("taps") or ())
        mode, k = str(la.get("mode", "strong")), int(la.get("k", 4))
        if not taps or mode not in PICK_MODES or k < 1:
            raise UnitError(f"objective.layer_atlas needs taps (a list), mode ({', '.join(PICK_MODES)}) and k >= 1; "
                            f"got {la}")
        layer_atlas = (taps, mode, k, float(la.get("weight", 1.0)))
    start = str(node.get("start", "painting"))
    if start not in STARTS:
        raise UnitError(f"objective.start={start!r}; choose one of: {', '.join(STARTS)}")
    noise = float(node.get("start_noise", 0.1))
    if not 0 <= noise <= 1:
        raise UnitError(f"objective.start_noise={noise} must be in [0, 1] (a fraction of the pixel range)")
    tf = dict(node.get("transforms") or {})
    bad = sorted(set(tf) - {"pad", "jitter", "scale", "rotate"})
    if bad:
        raise UnitError(f"objective.transforms: unknown key(s) {bad}; allowed: pad, jitter, scale, rotate")
    scale = tf.get("scale", [1.0, 1.0])
    transforms = (("pad", int(tf.get("pad", 0))), ("jitter", int(tf.get("jitter", 0))),
                  ("rotate", float(tf.get("rotate", 0))), ("scale", tuple(float(s) for s in scale)))
    param, lapnorm = str(node.get("param", "pixels")), int(node.get("lapnorm", 0) or 0)
    if param not in PARAMS:
        raise UnitError(f"objective.param={param!r}; choose one of: {', '.join(PARAMS)}")
    if lapnorm < 0:
        raise UnitError(f"objective.lapnorm={lapnorm} must be >= 0 levels (0 = off)")
    if lapnorm and param != "pixels":
        raise UnitError(f"objective.lapnorm={lapnorm} cannot be combined with objective.param={param}: the "
                        "Laplacian-pyramid normalisation works on a pixel gradient"
                        + (", and the Fourier parameterisation already scales its gradient by 1/f"
                           if param.startswith("fourier") else "")
                        + f"; set objective.lapnorm=0 to keep {param}, or objective.param=pixels to keep lapnorm")
    static = (("blur_every", int(node.get("blur_every", 0) or 0)), ("lapnorm", lapnorm),
              ("param", param), ("reduction", str(node.get("reduction", "mean_square"))),
              ("transforms", transforms))
    if any(e.kind == "blur" for e in entries) and not dict(static)["blur_every"]:
        static = tuple((k, 10 if k == "blur_every" else v) for k, v in static)  # a blur weight alone: every 10 steps
    return Objective(name=str(node.get("name", "layers")), layer=float(node.get("layer", 1.0)),
                     entries=tuple(entries), atlas=atlas, layer_atlas=layer_atlas, start=start, start_noise=noise,
                     original_colors=bool(node.get("original_colors", False)), static=static)


def structure(entries: Sequence[Entry]) -> tuple:
    """What of a cell's objective shapes the program: term kinds and taps (not weights)."""
    return tuple(sorted({(("channel" if e.kind == "pick" else e.kind), e.tap,
                          e.index[0] if e.kind == "guide" else "", bool(e.mask)) for e in entries}))
