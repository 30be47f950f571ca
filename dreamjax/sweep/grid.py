"""Hydra config -> cells -> groups -> batches. Pure Python: no JAX, no image decoding.

A *cell* is one dream trajectory: one painting under one layer-weight set and one set of
hyperparameters. A job (one Hydra config) yields one cell per painting of ``data.paths``.
Cells whose *static signature* (backbone, taps, the dream's static settings, the painting's
shape bucket) agree form a *group*, run as batches through one compiled program per octave.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dreamjax.sweep import units

# Dream settings that ride on the batch axis (never recompile) ...
PER_CELL_KEYS = ("step_size", "max_loss", "jitter", "iterations")
# ... and those that define the compiled program.
STATIC_KEYS = ("norm", "objective", "border", "frame_every", "clip", "tile_size", "optimizer",
               "grad_clip", "compute_dtype", "octaves", "num_octaves", "octave_scale", "octave_detail",
               "memory_budget_gb", "constant_weights", "micro_batch")
KNOWN_DREAM_KEYS = set(PER_CELL_KEYS) | set(STATIC_KEYS) | {"name"}


class ConfigError(ValueError):
    """A config mistake, found before any compute; names the key and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One dream: everything needed to run it and to write its outputs."""

    job: int  # Hydra job number (0 for a single run)
    job_dir: str  # absolute; outputs go to job_dir/<painting>/
    painting: str  # painting name (file stem, unique within the job)
    painting_path: str
    backbone: str
    weights: str
    straight_through: bool
    layers: str  # layer-set name
    taps: tuple[str, ...]
    layer_weights: tuple[float, ...]  # effective weights (weights * scale)
    step_size: float
    max_loss: float  # inf = none
    jitter: int
    iterations: int
    seed: int
    static: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs of the static dream settings
    image_size: int
    overrides: tuple[str, ...] = ()
    preset: str = ""
    set_dir: str = ""  # "" = one layer set per job; else the set's folder inside the job
    # --- objective (issue 13): per-cell term entries, static rendering settings, start image ---
    objective: tuple = ()  # units.Entry per term beyond the layer taps (weights are per cell)
    objective_static: tuple = ()  # sorted (key, value): reduction, param, transforms, lapnorm, blur_every
    start: str = "painting"  # painting | noise | grey
    start_noise: float = 0.1  # noise amplitude, fraction of the pixel range
    original_colors: bool = False  # the dream's luminance with the painting's chroma
    unit: str = ""  # the atlas unit of this cell ("" = not an atlas cell)

    @property
    def id(self) -> str:
        return "/".join(str(p) for p in (self.job, self.set_dir, self.painting) if p != "")

    @property
    def out_dir(self) -> Path:
        return Path(self.job_dir) / self.set_dir / self.painting

    @property
    def label(self) -> str:
        return f"{self.layers} {self.unit}" if self.unit else self.layers

    def static_dict(self) -> dict:
        return dict(self.static)

    def signature(self) -> tuple:
        """What the compiled program depends on (the bucket shape is added by the runner)."""
        return (self.backbone, self.weights, self.straight_through, self.taps, self.static, self.image_size,
                self.objective_static, units.structure(self.objective))

    def key_seed(self) -> int:
        """Per-cell PRNG seed: from the run seed and the cell's identity, not its batch position."""
        unit = f"|{self.unit}" if self.unit else ""  # atlas cells of one painting differ by unit
        h = hashlib.sha256(f"{self.seed}|{self.painting}|{self.layers}|{self.job}{unit}".encode()).digest()
        return int.from_bytes(h[:4], "little")

    def fingerprint(self) -> str:
        """Hash of everything that determines this cell's result (for resume and the manifest)."""
        d = dataclasses.asdict(self)
        for k in ("job_dir", "overrides"):
            d.pop(k)
        for f in dataclasses.fields(self):  # settings at their defaults leave old fingerprints unchanged
            if f.name in _OBJECTIVE_FIELDS and getattr(self, f.name) == f.default:
                d.pop(f.name)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get(cfg: Mapping, dotted: str, default: Any = KeyError):
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) and not hasattr(cur, "keys"):
            cur = None
        if cur is None or part not in cur:
            if default is KeyError:
                raise ConfigError(f"missing config key {dotted!r}")
            return default
        cur = cur[part]
    return cur


def _num(key: str, value: Any, cast=float, *, minimum=None, strict=False, allow_none=False):
    if value is None and allow_none:
        return None
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} {minimum}")
    return v


def dream_static(dream: Mapping) -> tuple[tuple[str, Any], ...]:
    unknown = sorted(set(dream) - KNOWN_DREAM_KEYS)
    if unknown:
        raise ConfigError(f"unknown dream setting(s) {unknown}; allowed: {', '.join(sorted(KNOWN_DREAM_KEYS))}")
    out = {}
    for k in STATIC_KEYS:
        v = dream.get(k)
        if k == "octaves" and v is not None:
            v = tuple(int(e) for e in v)
        out[k] = v
    scale = _num("dream.octave_scale", out["octave_scale"], strict=True, minimum=1.0)
    out["octave_scale"] = scale
    if out["octaves"] is None:
        out["num_octaves"] = int(_num("dream.num_octaves", out["num_octaves"], int, minimum=1))
    out["tile_size"] = out["tile_size"] if out["tile_size"] == "auto" else int(out["tile_size"] or 0)
    mb = out["micro_batch"]
    if mb in (None, "auto"):
        out["micro_batch"] = "auto"
    elif isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
        raise ConfigError(f"dream.micro_batch={mb!r} must be 'auto' or an integer >= 0 "
                          "(cells per gradient pass; 0 = the whole batch in one pass)")
    return tuple(sorted(out.items()))


def _layer_set(layers: Mapping, backbone: str, key: str = "layers") -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """(name, taps, effective weights = weights * scale) of one layer-weight set, validated."""
    name = str(layers.get("name", "custom"))
    lb = layers.get("backbone")
    if lb and lb not in (backbone, backbone.rpartition(":")[2]):
        raise ConfigError(f"{key}={name!r} is a set for backbone {lb!r} but model={backbone!r}; "
                          f"choose a layer set made for {backbone} (e.g. layers=set1 for inception_v3, "
                          f"layers=lite_balanced for efficientnet_lite0)")
    taps = tuple(str(t) for t in _get(layers, "taps"))
    weights = [_num(f"{key}.weights[{i}]", w) for i, w in enumerate(_get(layers, "weights"))]
    if len(weights) != len(taps):
        raise ConfigError(f"{key}.weights has {len(weights)} values but {key}.taps has {len(taps)} "
                          f"({', '.join(taps)}); give one weight per tap")
    scale = layers.get("scale")
    if scale is None:
        scale = [1.0] * len(taps)
    if len(scale) != len(taps):
        raise ConfigError(f"{key}.scale has {len(scale)} values but {key}.taps has {len(taps)}")
    return name, taps, tuple(float(w) * _num(f"{key}.scale", s) for w, s in zip(weights, scale))


def cells_from_config(cfg: Mapping, paintings: Sequence[str | Path], *, job: int = 0,
                      job_dir: str | Path = ".", overrides: Sequence[str] = (),
                      layer_sets: Sequence[Mapping] | None = None) -> list[Cell]:
    """The cells of one job: one per painting and layer set, under this job's dream settings.

    ``layer_sets`` (several weight sets in one run, the ``layer_sets=[...]`` option) replaces the
    job's single ``layers``; their cells go to ``<job_dir>/<set>/<painting>/``.
    """
    model = _get(cfg, "model")
    dream = _get(cfg, "dream")
    backbone = str(_get(model, "name"))
    if model.get("module") and ":" not in backbone:
        # Your own backbone: "module:name" makes every process (launchers, SLURM tasks) import the
        # module that registers it before looking the name up (dreamjax.models.registry.get_spec).
        backbone = f"{model.get('module')}:{backbone}"
    if layer_sets:
        sets = [_layer_set(ls, backbone, f"layer_sets[{i}]") for i, ls in enumerate(layer_sets)]
        if len({n for n, _, _ in sets}) != len(sets):
            raise ConfigError(f"layer_sets names a set twice: {[n for n, _, _ in sets]}")
    else:
        sets = [_layer_set(_get(cfg, "layers"), backbone)]
    step = _num("dream.step_size", dream.get("step_size"), minimum=0.0, strict=True)
    max_loss = _num("dream.max_loss", dream.get("max_loss"), allow_none=True)
    jitter = int(_num("dream.jitter", dream.get("jitter", 0) or 0, int, minimum=0))
    iterations = int(_num("dream.iterations", dream.get("iterations"), int, minimum=1))
    image_size = int(_num("data.image_size", _get(cfg, "data.image_size"), int, minimum=1))
    static = dream_static(dream)
    seed = int(_get(cfg, "seed", 0))
    try:
        objective = units.parse_objective(cfg.get("objective"))
    except units.UnitError as e:
        raise ConfigError(str(e)) from None
    names: dict[str, int] = {}
    unique = []
    for p in paintings:
        stem = Path(p).stem
        n = names.get(stem, 0)
        names[stem] = n + 1
        unique.append((stem if n == 0 else f"{stem}_{n}", str(p)))
    cells = []
    for name, set_taps, set_eff in sets:
        for unit, entries in objective.cells():
            # Term taps join the dream's taps with layer weight 0 (their energy is recorded too).
            extra = tuple(dict.fromkeys(e.tap for e in entries if e.tap and e.tap not in set_taps))
            taps = set_taps + extra
            eff = tuple(w * objective.layer for w in set_eff) + (0.0,) * len(extra)
            set_dir = "/".join(p for p in (name if layer_sets else "", unit) if p)
            for painting, path in unique:
                cells.append(Cell(
                    job=job, job_dir=str(Path(job_dir).resolve()), painting=painting, painting_path=path,
                    backbone=backbone, weights=str(model.get("weights", "auto")),
                    straight_through=bool(model.get("straight_through", False)), layers=name,
                    taps=taps, layer_weights=eff, step_size=step,
                    max_loss=math.inf if max_loss is None else max_loss, jitter=jitter, iterations=iterations,
                    seed=seed, static=static, image_size=image_size, overrides=tuple(overrides),
                    preset=str(dream.get("name", "")), set_dir=set_dir, objective=entries,
                    objective_static=objective.static if entries or objective.static != _DEFAULT_STATIC else (),
                    start=objective.start, start_noise=objective.start_noise,
                    original_colors=objective.original_colors, unit=unit))
    return cells


_DEFAULT_STATIC = units.parse_objective(None).static
_OBJECTIVE_FIELDS = ("objective", "objective_static", "start", "start_noise", "original_colors", "unit")


def group_cells(cells: Iterable[tuple[Cell, tuple[int, int]]]) -> dict[tuple, list[Cell]]:
    """Group (cell, bucket shape) pairs by static signature + bucket, keeping input order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell, bucket in cells:
        groups.setdefault(cell.signature() + (tuple(bucket),), []).append(cell)
    return groups


def batches(cells: Sequence[Cell], batch_size: int) -> list[list[Cell]]:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    return [list(cells[i:i + batch_size]) for i in range(0, len(cells), batch_size)]


def batch_id(cells: Sequence[Cell]) -> str:
    """Stable identity of a batch: which cells, in which order, with which settings."""
    return hashlib.sha256("|".join(c.id + ":" + c.fingerprint() for c in cells).encode()).hexdigest()[:16]
