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
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dreamjax import config, files
from dreamjax.config import ConfigError
from dreamjax.sweep import units

# Dream settings that ride on the batch axis (never recompile) ...
PER_CELL_KEYS = ("step_size", "max_loss", "jitter", "iterations")
# ... and those that define the compiled program.
STATIC_KEYS = ("norm", "objective", "border", "frame_every", "clip", "tile_size", "optimizer",
               "grad_clip", "compute_dtype", "octaves", "num_octaves", "octave_scale", "octave_detail",
               "memory_budget_gb", "constant_weights", "micro_batch", "tiles", "cpu_kernels")
# In a cell's fingerprint the painting and the weights count by content, not by where they are.
_NOT_IN_FINGERPRINT = ("job_dir", "overrides", "painting_path", "weights", "input_error", "config_json")


@dataclasses.dataclass(frozen=True)
class PaintingInput:
    """One entry of ``data.paths`` as planned: its file, the sha256 of its bytes, or why it cannot be
    used (unreadable, broken link, an entry matching nothing): that input's cells fail, not the run."""

    path: str
    sha256: str = ""
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One dream: everything needed to run it and to write its outputs."""

    job: int  # Hydra job number (0 for a single run)
    job_dir: str  # absolute; outputs go to job_dir/<painting>/
    painting: str  # painting slug (unique within the job; files.slug of the file stem)
    painting_path: str
    backbone: str
    weights: str  # the model.weights setting (auto | random | path); weights_id says what it was
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
    painting_sha256: str = ""  # of the painting's bytes, read at plan time
    weights_id: str = ""  # the loaded weights' id (sha256 of the file, or the random init's id)
    input_error: str = ""  # the painting cannot be read: the cell fails without compute
    config_json: str = ""  # the job's full resolved config (JSON), recorded in cell.json
    # Motion settings, sorted (key, value) pairs (sweep/motion.py); () = a still image.
    motion: tuple[tuple[str, Any], ...] = ()
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

    def static_dict(self) -> dict:
        return dict(self.static)

    def signature(self) -> tuple:
        """What the compiled program depends on (the bucket shape is added by the runner)."""
        return (self.backbone, self.weights, self.weights_id, self.straight_through, self.taps, self.static,
                self.image_size, self.objective_static, units.structure(self.objective))

    def key_seed(self) -> int:
        """Per-cell PRNG seed: from the run seed and the cell's identity, not its batch position."""
        unit = f"|{self.unit}" if self.unit else ""  # atlas cells of one painting differ by unit
        h = hashlib.sha256(f"{self.seed}|{self.painting}|{self.layers}|{self.job}{unit}".encode()).digest()
        return int.from_bytes(h[:4], "little")

    def fingerprint(self) -> str:
        """Hash of everything that determines this cell's result (for resume and the manifest): the
        settings, the painting's bytes (``painting_sha256``) and the weights (``weights_id``)."""
        d = dataclasses.asdict(self)
        for k in _NOT_IN_FINGERPRINT:
            d.pop(k)
        for f in dataclasses.fields(self):  # objective settings at their defaults leave fingerprints as before
            if f.name in _OBJECTIVE_FIELDS and getattr(self, f.name) == f.default:
                d.pop(f.name)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dream_static(dream: config.Dream) -> tuple[tuple[str, Any], ...]:
    out = {k: getattr(dream, k) for k in STATIC_KEYS}
    if out["octaves"] is not None:
        out["octaves"] = tuple(out["octaves"])
    if out.get("tiles") in (None, "cover"):  # the default: left out, so existing cells keep their identity
        out.pop("tiles", None)
    return tuple(sorted(out.items()))


def _layer_set(layers: config.LayerSet, backbone: str, key: str = "layers"):
    """(name, taps, effective weights = weights * scale) of one validated layer-weight set."""
    if layers.backbone and layers.backbone not in (backbone, backbone.rpartition(":")[2]):
        raise ConfigError(f"{key}={layers.name!r} is a set for backbone {layers.backbone!r} but model={backbone!r}; "
                          f"choose a layer set made for {backbone} (e.g. layers=set1 for inception_v3, "
                          f"layers=lite_balanced for efficientnet_lite0)")
    return layers.name, tuple(layers.taps), layers.effective_weights()


def painting_slugs(paintings: Sequence[PaintingInput]) -> list[str]:
    """Unique readable names: the slug of each file stem; a slug already taken gets ``-<8 hex>`` of the
    painting's path, so names stay stable whatever else is in ``data.paths``."""
    slugs = [files.slug(Path(p.path).stem) for p in paintings]
    counts: dict[str, int] = {}
    for s in slugs:
        counts[s] = counts.get(s, 0) + 1
    out, taken = [], set()
    for s, p in zip(slugs, paintings):
        name = s if counts[s] == 1 else f"{s}-{files.short_hash(os.path.abspath(p.path))}"
        while name in taken:  # the same path twice (already de-duplicated upstream): keep them apart
            name = f"{name}-{files.short_hash(name)}"
        taken.add(name)
        out.append(name)
    return out


def cells_from_config(cfg: Mapping | config.Config, paintings: Sequence[str | Path | PaintingInput], *, job: int = 0,
                      job_dir: str | Path = ".", overrides: Sequence[str] = (),
                      layer_sets: Sequence[config.LayerSet] | None = None, weights_id: str = "") -> list[Cell]:
    """The cells of one job: one per painting and layer set, under this job's dream settings.

    ``layer_sets`` (several weight sets in one run, the ``layer_sets=[...]`` option, already read
    and validated) replaces the job's single ``layers``; their cells go to ``<job_dir>/<set>/<painting>/``.
    """
    c = config.validate(cfg)
    backbone = c.model.name
    if c.model.module and ":" not in backbone:
        # Your own backbone: "module:name" makes every process (launchers, SLURM tasks) import the
        # module that registers it before looking the name up (dreamjax.models.registry.get_spec).
        backbone = f"{c.model.module}:{backbone}"
    if layer_sets:
        sets = [_layer_set(ls, backbone, f"layer_sets[{i}]") for i, ls in enumerate(layer_sets)]
        if len({n for n, _, _ in sets}) != len(sets):
            raise ConfigError("layer_sets", "names a set twice", value=[n for n, _, _ in sets])
    else:
        sets = [_layer_set(c.layers, backbone)]
    static = dream_static(c.dream)
    try:
        objective = units.parse_objective(c.objective)
    except units.UnitError as e:
        raise ConfigError(str(e)) from None
    inputs = [p if isinstance(p, PaintingInput) else PaintingInput(str(p)) for p in paintings]
    unique = list(zip(painting_slugs(inputs), inputs))
    config_json = json.dumps(c.to_dict(), sort_keys=True)
    cells = []
    for name, set_taps, set_eff in sets:
        for unit, entries in objective.cells():
            # Term taps join the dream's taps with layer weight 0 (their energy is recorded too).
            extra = tuple(dict.fromkeys(e.tap for e in entries if e.tap and e.tap not in set_taps))
            taps = set_taps + extra
            eff = tuple(w * objective.layer for w in set_eff) + (0.0,) * len(extra)
            set_dir = "/".join(p for p in (name if layer_sets else "", unit) if p)
            for painting, inp in unique:
                cells.append(Cell(
                    job=job, job_dir=str(Path(job_dir).resolve()), painting=painting, painting_path=inp.path,
                    backbone=backbone, weights=c.model.weights, straight_through=c.model.straight_through,
                    layers=name, taps=taps, layer_weights=eff, step_size=c.dream.step_size,
                    max_loss=math.inf if c.dream.max_loss is None else c.dream.max_loss, jitter=c.dream.jitter,
                    iterations=c.dream.iterations, seed=c.seed, static=static, image_size=c.data.image_size,
                    overrides=tuple(overrides), preset=c.dream.name, set_dir=set_dir,
                    painting_sha256=inp.sha256, weights_id=weights_id, input_error=inp.error,
                    config_json=config_json, objective=entries,
                    objective_static=objective.static if entries or objective.static != _DEFAULT_STATIC else (),
                    start=objective.start, start_noise=objective.start_noise,
                    original_colors=objective.original_colors, unit=unit))
    return cells


_DEFAULT_STATIC = units.parse_objective(None).static
_OBJECTIVE_FIELDS = ("objective", "objective_static", "start", "start_noise", "original_colors", "unit")


def cell_label(cell: Cell) -> str:
    """The cell's caption, one meaning everywhere (cell.json, manifest.json, the gallery): its layer
    set, then each dream setting the job's overrides changed (``tiny_set1 · step_size 0.5``)."""
    extra = [o.split("=", 1) for o in cell.overrides if "=" in o]
    extra = [f"{k.split('.')[-1]} {v}" for k, v in extra if k.lstrip("+~").startswith("dream.")]
    return " · ".join([cell.layers] + ([cell.unit] if cell.unit else []) + extra)


def group_cells(cells: Iterable[tuple[Cell, tuple[int, int]]]) -> dict[tuple, list[Cell]]:
    """Group (cell, bucket shape) pairs by static signature + bucket, keeping input order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell, bucket in cells:
        groups.setdefault(cell.signature() + (tuple(bucket),), []).append(cell)
    return groups


def batches(cells: Sequence[Cell], batch_size: int) -> list[list[Cell]]:
    if batch_size < 1:
        raise ConfigError("batch_size", "must be >= 1", value=batch_size)
    return [list(cells[i:i + batch_size]) for i in range(0, len(cells), batch_size)]


def batch_id(cells: Sequence[Cell]) -> str:
    """Stable identity of a batch: which cells, in which order, with which settings."""
    return hashlib.sha256("|".join(c.id + ":" + c.fingerprint() for c in cells).encode()).hexdigest()[:16]
