"""dreamjax's one config schema and its one validation pass (pure Python: no JAX, no dreamjax).

The schema is the dataclasses below: :class:`Config` is the root config (``conf/config.yaml``
after Hydra composed it), one dataclass per config group (``model``, ``layers``, ``dream``,
``data``, ``outputs``, ``checkpoint``). :func:`validate` walks a composed config once, against
the schema, before any painting is read or any backbone loaded, and returns a typed
:class:`Config`. Every mistake is a :class:`ConfigError` naming the key, the value and what is
allowed::

    batch_size: 'abc' is not an integer
    data.image_size: 96.5 is not an integer
    resume: 'maybe' is not allowed; choose one of: auto, false
    data.typo: unknown key; allowed: image_size, max_pixels, paths, upscale_small

Why one explicit pass and not the dataclasses registered in Hydra's ConfigStore as a structured
schema: several keys are unions that OmegaConf's structured configs cannot type (``dream.tile_size``
is an integer or ``auto``, ``data.paths`` a path or a list, ``layer_sets`` names or inline sets);
layer sets named by ``layer_sets=[...]`` are read outside Hydra's composition and need the same
checks; and Hydra's own validation errors come wrapped in its tracebacks. One pass written here
gives one error type and one message format for every key, wherever the config came from.

Adding a key (one place): add a field to its group's dataclass with :func:`key` (type, default,
rules); the YAML default goes in ``conf/<group>/*.yaml`` as before. Adding a group: write a
dataclass of its keys, add it as a field of :class:`Config` (``video: Video = group(Video)``),
and add ``conf/<group>/``. Enumerations (``NORMS``, ``OBJECTIVES``, ...) live here and the
engine imports them, so a new objective is one entry in ``OBJECTIVES`` plus its code.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

# Enumerations (the engine implements them; the schema is where they are listed).
NORMS = ("l2", "mean_abs", "std")
OBJECTIVES = ("mean_square", "keras_io", "mean", "l2")
TILINGS = ("cover", "tf")
DETAIL_MODES = ("dlwp", "google", "none")
OPTIMIZERS = ("sgd", "adam", "rmsprop", "momentum")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
CPU_KERNELS = ("auto", "xla", "onednn", "onednn_f32")  # = dreamjax.models.ops.KERNELS (tested)
RESUME_MODES = ("auto", "false")

_MISSING = object()


class ConfigError(ValueError):
    """A config mistake, found before any compute. ``ConfigError(key, problem, value=..., allowed=...)``
    reads ``key: value problem; allowed: ...``; ``ConfigError(message)`` for a message that names
    its keys itself. One line, always."""

    def __init__(self, key: str, problem: str | None = None, *, value: Any = _MISSING, allowed: Any = None):
        if problem is None:
            key, problem = "", key
        self.key = key
        self.value = None if value is _MISSING else value
        self.allowed = allowed
        head = key + (f": {value!r}" if value is not _MISSING else (":" if key else ""))
        msg = f"{head} {problem}".strip()
        if allowed:
            msg += "; allowed: " + (allowed if isinstance(allowed, str) else ", ".join(map(str, allowed)))
        super().__init__(" ".join(msg.split()))


# ---------------------------------------------------------------------------------------------
# Field rules


def key(default: Any = _MISSING, kind: str = "str", *, choices: Sequence[Any] = (), min: float | None = None,
        gt: float | None = None, nullable: bool = False, auto: bool = False, doc: str = ""):
    """A schema key: ``kind`` is int | float | bool | str | enum | list_int | list_float | list_str |
    paths; ``min``/``gt`` bound numbers (and list items); ``auto`` also accepts the string "auto";
    ``nullable`` accepts null (kept as None)."""
    meta = {"kind": kind, "choices": tuple(choices), "min": min, "gt": gt, "nullable": nullable, "auto": auto,
            "doc": doc}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    if default is _MISSING:
        return dataclasses.field(default=None, metadata=meta | {"required": True})
    return dataclasses.field(default=default, metadata=meta)


def group(cls):
    return dataclasses.field(default_factory=cls, metadata={"kind": "group"})


_INT_RE = re.compile(r"^[+-]?\d+$")


def _int(k: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ConfigError(k, "is not an integer", value=v)
    if isinstance(v, int):
        return v
    if isinstance(v, str) and _INT_RE.match(v.strip()):
        return int(v)
    raise ConfigError(k, "is not an integer", value=v)


def _float(k: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ConfigError(k, "is not a number", value=v)
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(k, "is not a number", value=v) from None
    else:
        raise ConfigError(k, "is not a number", value=v)
    if not math.isfinite(f):
        raise ConfigError(k, "is not a finite number", value=v)
    return f


def _bounds(k: str, v: Any, shown: Any, m: Mapping):
    if m["min"] is not None and v < m["min"]:
        raise ConfigError(k, f"must be >= {m['min']}", value=shown)
    if m["gt"] is not None and not v > m["gt"]:
        raise ConfigError(k, f"must be > {m['gt']}", value=shown)


def _value(k: str, v: Any, m: Mapping) -> Any:
    kind = m["kind"]
    if v is None:
        if m["nullable"]:
            return None
        if m["auto"]:
            return "auto"
        raise ConfigError(k, "is not allowed (null); give a value", value=v)
    if m["auto"] and v == "auto":
        return "auto"
    if kind == "int":
        try:
            out = _int(k, v)
        except ConfigError:
            if m["auto"]:
                raise ConfigError(k, "is not an integer or 'auto'", value=v) from None
            raise
        _bounds(k, out, v, m)
        return out
    if kind == "float":
        out = _float(k, v)
        _bounds(k, out, v, m)
        return out
    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(k, "is not a boolean", value=v, allowed="true, false")
        return v
    if kind == "enum":
        s = str(v).lower() if isinstance(v, bool) else v
        if s not in m["choices"]:
            raise ConfigError(k, "is not allowed; choose one of: " + ", ".join(map(str, m["choices"])), value=v)
        return s
    if kind == "str":
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ConfigError(k, "is not a string", value=v)
        return str(v)
    if kind == "paths":
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(k, "must be a path, a glob, a folder or a list of them", value=v)
        if not items:
            raise ConfigError(k, "is an empty list; name at least one painting, folder or glob", value=v)
        return list(items)
    if kind.startswith("list_"):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(k, "is not a list", value=v)
        one = {"list_int": "int", "list_float": "float", "list_str": "str"}[kind]
        return [_value(f"{k}[{i}]", x, dict(m, kind=one, nullable=False, auto=False)) for i, x in enumerate(v)]
    raise AssertionError(f"schema kind {kind!r}")  # pragma: no cover


def _walk(cls, node: Any, prefix: str):
    if node is None:
        node = {}
    if not isinstance(node, Mapping):
        raise ConfigError(prefix.rstrip("."), "must be a group of keys", value=node)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields) - set(getattr(cls, "_ignored", ())))
    if unknown:
        raise ConfigError(prefix + str(unknown[0]), "unknown key", allowed=sorted(fields))
    out = {}
    for name, f in fields.items():
        k = prefix + name
        m = f.metadata
        if m.get("kind") == "group":
            out[name] = _walk(f.default_factory, node.get(name), k + ".")
        elif m.get("kind") == "custom":
            out[name] = m["check"](k, node.get(name))
        elif name in node:
            out[name] = _value(k, node[name], m)
        elif m.get("required"):
            raise ConfigError(k, "is missing; it is required")
        else:
            out[name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    obj = cls(**out)
    check = getattr(obj, "_check", None)
    if check is not None:
        check(prefix)
    return obj


# ---------------------------------------------------------------------------------------------
# The schema


@dataclasses.dataclass
class Study:
    """The model's taps and normalisers for the seed study's four sets (conf/layers/study_set*.yaml)."""

    prefix: str = key("")
    taps: list = key([], "list_str")
    scale: list | None = key(None, "list_float", nullable=True)


@dataclasses.dataclass
class Model:
    name: str = key("efficientnet_lite0", doc="backbone (dreamjax.available_backbones())")
    module: str | None = key(None, nullable=True, doc="imported first: it registers your own backbone")
    weights: str = key("auto", nullable=False, auto=True,
                       doc="auto | random | path to a weights file; checked once at plan time")
    straight_through: bool = key(False, "bool", doc="dream through ReLU6 with a plain-ReLU backward")
    include_top: bool | None = key(None, "bool", nullable=True,
                                   doc="null: loaded with the classifier top when a class term needs it")
    study: Study = group(Study)


@dataclasses.dataclass
class LayerSet:
    name: str = key("custom")
    backbone: str | None = key(None, nullable=True)
    taps: list = key(kind="list_str")
    weights: list = key(kind="list_float")
    scale: list | None = key(None, "list_float", nullable=True)

    def _check(self, prefix: str):
        k = prefix.rstrip(".")
        if not self.taps:
            raise ConfigError(f"{k}.taps", "is empty; name at least one tap", value=self.taps)
        if len(self.weights) != len(self.taps):
            raise ConfigError(f"{k}.weights has {len(self.weights)} values but {k}.taps has {len(self.taps)} "
                              f"({', '.join(self.taps)}); give one weight per tap")
        if self.scale is not None and len(self.scale) != len(self.taps):
            raise ConfigError(f"{k}.scale has {len(self.scale)} values but {k}.taps has {len(self.taps)}")

    def effective_weights(self) -> tuple[float, ...]:
        scale = self.scale or [1.0] * len(self.taps)
        return tuple(float(w) * float(s) for w, s in zip(self.weights, scale))


@dataclasses.dataclass
class Dream:
    name: str = key("")
    norm: str = key("l2", "enum", choices=NORMS)
    objective: str = key("mean_square", "enum", choices=OBJECTIVES)
    border: int = key(2, "int", min=0)
    step_size: float = key(20.0, "float", gt=0)
    iterations: int = key(30, "int", min=1)
    max_loss: float | None = key(None, "float", nullable=True)
    jitter: int = key(0, "int", min=0)
    num_octaves: int = key(3, "int", min=1)
    octave_scale: float = key(1.4, "float", gt=1.0)
    octaves: list | None = key(None, "list_int", nullable=True)
    octave_detail: str = key("dlwp", "enum", choices=DETAIL_MODES)
    clip: bool = key(False, "bool")
    tile_size: Any = key(0, "int", min=0, auto=True, doc="0 = untiled; auto = from memory_budget_gb")
    tiles: str = key("cover", "enum", choices=TILINGS, doc="cover: tiles cover the image; tf: TF tutorial's")
    memory_budget_gb: float = key(4.0, "float", gt=0)
    micro_batch: Any = key("auto", "int", min=0, auto=True, doc="cells per gradient pass; 0 = all")
    optimizer: str = key("sgd", "enum", choices=OPTIMIZERS)
    grad_clip: float = key(0.0, "float", min=0)
    compute_dtype: str = key("float32", "enum", choices=COMPUTE_DTYPES)
    constant_weights: bool = key(False, "bool")
    frame_every: int = key(5, "int", min=0)
    cpu_kernels: str = key("auto", "enum", choices=CPU_KERNELS,
                           doc="CPU convolutions: auto (oneDNN bf16 where it builds) | xla | onednn | onednn_f32")

    def _check(self, prefix: str):
        if self.octaves is not None:
            if not self.octaves:
                raise ConfigError(f"{prefix}octaves", "is empty; give at least one octave (or null)", value=[])
            if list(self.octaves) != sorted(self.octaves):
                raise ConfigError(f"{prefix}octaves", "must increase (small to large)", value=self.octaves)


@dataclasses.dataclass
class Data:
    paths: Any = key(["bundled"], "paths", doc="files, folders, globs or a list; 'bundled' = shipped paintings")
    image_size: int = key(256, "int", min=16)
    max_pixels: int = key(64_000_000, "int", min=1)
    upscale_small: bool = key(True, "bool")
    video: Any = key(None, "paths", nullable=True, doc="a video, a folder of videos or a list: dream it frame by frame")


@dataclasses.dataclass
class Motion:
    """Feedback loops (conf/motion/*.yaml, dreamjax.sweep.motion); zoom, angle, shift are per cell."""

    mode: str = key("none", "enum", choices=("none", "loop"))
    frames: int = key(24, "int", min=1)
    zoom: float = key(1.05, "float", gt=0)
    angle: float = key(0.0, "float")
    shift: list = key([0.0, 0.0], "list_float")
    border: str = key("reflect", "enum", choices=("reflect", "edge", "zeros"))
    fps: float = key(12.0, "float", gt=0)
    gif_max_frames: int = key(60, "int", min=0)


@dataclasses.dataclass
class Video:
    """How ``data.video`` is dreamed (conf/video/default.yaml); blend is per cell."""

    flow: str = key("dis", "enum", choices=("none", "farneback", "dis"))
    blend: float = key(0.5, "float", min=0)
    start: int = key(0, "int", min=0)
    end: int | None = key(None, "int", nullable=True, min=1)
    every: int = key(1, "int", min=1)
    fps: float | None = key(None, "float", nullable=True, gt=0)


@dataclasses.dataclass
class Outputs:
    octave_images: bool = key(True, "bool")
    gif: bool = key(True, "bool")
    gif_max_side: int = key(256, "int", min=1)
    gif_frame_ms: int = key(120, "int", min=1)


@dataclasses.dataclass
class Checkpoint:
    enabled: bool = key(True, "bool")
    every_steps: int = key(10, "int", min=1)
    max_to_keep: int = key(2, "int", min=1)


def _layer_sets(k: str, v: Any):
    """``layer_sets``: null, or a list of layer-set names (conf/layers/NAME.yaml) and inline sets."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise ConfigError(k, "must be a list of layer-set names (e.g. [set1,set2]) or null", value=v)
    out = []
    for i, item in enumerate(v):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(_walk(LayerSet, item, f"{k}[{i}]."))
        else:
            raise ConfigError(f"{k}[{i}]", "must be a layer-set name or a layer set", value=item)
    if not out:
        return None
    return out


def _mapping(k: str, v: Any):
    if v is not None and not isinstance(v, Mapping):
        raise ConfigError(k, "must be a group of keys", value=v)
    return None if v is None else dict(v)


@dataclasses.dataclass
class Config:
    """The root config (conf/config.yaml). ``hydra`` (Hydra's own node) is not part of it."""

    _ignored = ("hydra",)

    name: str = key("dream")
    layer_sets: list | None = dataclasses.field(default=None, metadata={"kind": "custom", "check": _layer_sets})
    seed: int = key(0, "int")
    batch_size: int = key(8, "int", min=1)
    jax_cache_dir: str | None = key(None, nullable=True)
    analyze: bool = key(True, "bool")
    resume: str = key("auto", "enum", choices=RESUME_MODES)
    model: Model = group(Model)
    layers: LayerSet = group(LayerSet)
    dream: Dream = group(Dream)
    data: Data = group(Data)
    outputs: Outputs = group(Outputs)
    checkpoint: Checkpoint = group(Checkpoint)
    motion: Motion = group(Motion)
    video: Video = group(Video)
    # Issue 13: the objective node (conf/objective/*.yaml) and the augment experiment's node; read by
    # dreamjax.sweep.units (units, classes, atlases), which raises ConfigError naming the key.
    objective: dict | None = dataclasses.field(default=None, metadata={"kind": "custom", "check": _mapping})
    augment: dict | None = dataclasses.field(default=None, metadata={"kind": "custom", "check": _mapping})

    def to_dict(self) -> dict:
        """Plain data (the full resolved config, as recorded in each cell.json)."""
        return dataclasses.asdict(self)


def validate(cfg: Mapping) -> Config:
    """The one validation pass: a composed config (plain mapping; Hydra's ``hydra`` node ignored)
    -> a typed :class:`Config`, or the first :class:`ConfigError`."""
    if isinstance(cfg, Config):
        return cfg
    return _walk(Config, _plain(cfg, top=True), "")


def _plain(x: Any, top: bool = False) -> Any:
    """Mappings and sequences (e.g. OmegaConf's DictConfig/ListConfig) -> dict/list, resolved."""
    if isinstance(x, Mapping):
        return {k: _plain(x[k]) for k in x if not (top and k == "hydra")}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(i) for i in x]
    return x


def validate_layer_set(node: Mapping, k: str = "layers") -> LayerSet:
    """A layer set read from ``conf/layers/NAME.yaml`` for ``layer_sets=[...]``."""
    return _walk(LayerSet, _plain(node), k + ".")
