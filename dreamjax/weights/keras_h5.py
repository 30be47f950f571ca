"""Keras HDF5 weights -> Flax variables ``{"params", "batch_stats"}``, for any Keras architecture.

Three layouts are read, all written by Keras itself:

* legacy weights at the root (the official ``*_weights_tf_dim_ordering_tf_kernels*.h5`` files,
  Keras 2 names such as ``conv2d_1/kernel:0``; also Keras 3's ``save_weights_to_hdf5_group``);
* ``model.save("x.h5")`` (the same, nested under ``model_weights/``);
* Keras 3 ``model.save_weights("x.weights.h5")`` (``layers/<class>_<k>/vars/<i>``).

This module knows no model. The caller describes its architecture as a :class:`KerasArch`: the
weighted layers in the order Keras stores them (each with its Keras class and the Flax leaves
its arrays fill, with shapes), how many of the last ones are the classifier top, and the
official file names. :func:`functional_order` replays Keras' own topological sort on a graph
the model module builds, so a model lists its layers without hand-written tables.

Layer names are never trusted: like Keras' own loader, layers with weights are paired *by
position* with the model's weighted layers, and every tensor's shape is checked. Keras kernels
are already HWIO / (in, out), Flax's layout, so nothing is transposed. Every failure is one
``WeightsError`` line naming the file.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import traverse_util

Layer = tuple[str, Sequence[np.ndarray]]  # (layer name in the file, arrays in Keras' legacy order)
Leaf = tuple[tuple[str, ...], tuple[int, ...]]  # (Flax variable path, shape)


class WeightsError(ValueError):
    """Weights that cannot be found, downloaded or fitted to the model (one line, names the file)."""


@dataclasses.dataclass(frozen=True)
class ExpectedLayer:
    """One weighted Keras layer as the model sees it."""

    unit: str  # the Flax module path, "/"-joined (names the layer in errors)
    keras_class: str  # Keras 3's snake-case class name: conv2d, batch_normalization, dense
    leaves: tuple[Leaf, ...]  # in Keras' legacy weight order (trainable, then non-trainable)


@dataclasses.dataclass(frozen=True)
class KerasArch:
    """What the converter and the store need to know about one Keras application."""

    name: str  # as people write it: "ResNet50"
    key: str  # backbone / cache name: "resnet50"
    layers: Callable[[], Sequence[ExpectedLayer]]  # with the top, in Keras' order (cached by the caller)
    top_layers: int  # how many of the last layers are the classifier top
    files: Mapping[bool, tuple[str, str]]  # include_top -> (official file name, "md5:..." Keras publishes)
    base_url: str  # where Keras downloads them from

    def expected(self, include_top: bool) -> Sequence[ExpectedLayer]:
        layers = self.layers()
        return layers if include_top else layers[: len(layers) - self.top_layers]


def leaves_of(shapes: Mapping, unit: Sequence[str], spec: Sequence[Sequence[str]]) -> tuple[Leaf, ...]:
    """``((collection, *unit, *leaf), shape)`` for each ``(collection, *leaf)`` of ``spec``,
    read from a tree of shapes such as ``jax.eval_shape(module.init, ...)``."""
    out = []
    for collection, *leaf in spec:
        node = shapes[collection]
        for key in (*unit, *leaf):
            node = node[key]
        out.append(((collection, *unit, *leaf), tuple(node.shape)))
    return tuple(out)


# Keras' legacy weight order per layer kind -> Flax leaf (relative to the unit).
CONV = (("params", "kernel"),)
CONV_BIAS = (("params", "kernel"), ("params", "bias"))
DENSE = CONV_BIAS
BN = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))
BN_NO_SCALE = (("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))


def functional_order(graph: Mapping[str, Sequence[str]], output: str) -> list[str]:
    """Nodes of a Keras functional graph in the order of ``Functional.layers``.

    ``graph`` maps each layer to its inputs, in call order. Keras' ``map_graph`` sorts every
    layer by depth (longest path to the output, deepest first) and breaks ties by the pre-order
    index of a depth-first walk from the output that follows each layer's inputs in order;
    this replays that sort, so a model lists its weighted layers from its own structure.
    """
    index: dict[str, int] = {}
    post: list[str] = []

    def visit(node):  # pre-order index, post-order list (Keras' _build_map)
        if node in index:
            return
        index[node] = len(index)
        for parent in graph[node]:
            visit(parent)
        post.append(node)

    visit(output)
    depth: dict[str, int] = {}
    for node in reversed(post):  # outputs first: longest path to the output
        d = depth.setdefault(node, 0)
        for parent in graph[node]:
            depth[parent] = max(depth.get(parent, 0), d + 1)
    return sorted(index, key=lambda n: (-depth[n], index[n]))


def _names(names, limit=6):
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def shapes_of(layers: Sequence[Layer]) -> list[list[tuple[int, ...]]]:
    return [[tuple(np.shape(a)) for a in arrays] for _, arrays in layers]


def matches(layers: Sequence[Layer], expected: Sequence[ExpectedLayer]) -> bool:
    """Whether the file's layers have exactly the shapes of ``expected`` (architecture check)."""
    return shapes_of(layers) == [[s for _, s in e.leaves] for e in expected]


def convert(layers: Sequence[Layer], arch: KerasArch, include_top: bool, source: str = "<weights>") -> dict:
    """Pure: weighted layers in Keras' order -> nested Flax variables, or ``WeightsError``.

    A file with the classifier top also serves ``include_top=False`` (its top layers are
    dropped); the reverse is an error that names the file to use.
    """
    expected = arch.expected(include_top)
    flat = {}
    for k, ((name, arrays), want) in enumerate(zip(layers, expected)):
        got = [tuple(np.shape(a)) for a in arrays]
        shapes = [shape for _, shape in want.leaves]
        if got != shapes:
            raise WeightsError(f"{source}: not {arch.name} weights: layer #{k} {name!r} in the file holds "
                               f"shapes {got}, the model's {want.unit} needs {shapes}")
        flat.update((path, np.asarray(a, np.float32)) for (path, _), a in zip(want.leaves, arrays))
    extra = [name for name, _ in layers[len(expected):]]
    missing = [e.unit for e in expected[len(layers):]]
    top = arch.layers()[len(arch.layers()) - arch.top_layers:]
    if not include_top and matches(layers[len(expected):], top):
        extra = []  # the classifier of a full file, not needed here
    if include_top and len(missing) == arch.top_layers and not extra:
        raise WeightsError(f"{source}: has no classifier top (a 'notop' file, {len(layers)} weighted layers) "
                           f"but include_top=True was asked; use the full weights file {arch.files[True][0]} "
                           "or include_top=False")
    if missing or extra:
        raise WeightsError(f"{source}: not {arch.name} weights: {len(layers)} weighted layers in the file, "
                           f"{len(expected)} in the model; missing {len(missing)}: [{_names(missing)}]; "
                           f"extra {len(extra)}: [{_names(extra)}]")
    return traverse_util.unflatten_dict(flat)


# --- the file side ----------------------------------------------------------------------------------

def _attr_list(group, name) -> list[str]:
    # Keras splits long attributes into name0, name1, ... (HDF5 object header limit).
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for chunk in chunks for n in chunk]


def _legacy_layers(group) -> list[Layer]:
    layers = []
    for name in _attr_list(group, "layer_names"):
        weights = _attr_list(group[name], "weight_names")
        if weights:
            layers.append((name, [group[name][w][()] for w in weights]))
    return layers


def _split_key(key):
    prefix, k = re.fullmatch(r"(.*?)(?:_(\d+))?", key).groups()
    return prefix, int(k or 0)


@dataclasses.dataclass
class KerasFile:
    """The weighted layers of one file. A legacy file stores them in Keras' order; a Keras 3
    ``.weights.h5`` stores one queue per layer class (``conv2d``, ``conv2d_1``, ... in the model's
    order), merged back by :meth:`in_order` following the model's sequence of classes."""

    path: Path
    layout: str
    legacy: list[Layer] | None = None
    queues: dict[str, list[Layer]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.legacy) if self.legacy is not None else sum(map(len, self.queues.values()))

    def in_order(self, expected: Sequence[ExpectedLayer]) -> list[Layer]:
        if self.legacy is not None:
            return list(self.legacy)
        queues = {k: list(v) for k, v in self.queues.items()}
        layers = []
        for e in expected:
            queue = queues.get(e.keras_class)
            if not queue:
                break
            layers.append(queue.pop(0))
        return layers + [layer for queue in queues.values() for layer in queue]


def _keras3_queues(group) -> dict[str, list[Layer]]:
    queues: dict[str, list[Layer]] = {}
    for key in sorted(group["layers"], key=_split_key):
        vars_ = group["layers"][key].get("vars")
        if vars_ is not None and len(vars_):
            name = vars_.attrs.get("name", key)
            arrays = [vars_[i][()] for i in sorted(vars_, key=int)]
            queues.setdefault(_split_key(key)[0], []).append((str(name), arrays))
    return queues


def read_keras_file(path) -> KerasFile:
    """Any of the three layouts; ``WeightsError`` for a missing, foreign or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    import h5py  # lazy: ~0.05 s of every start-up, and only a Keras file needs it

    if not h5py.is_hdf5(path):
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"
        hint = (" (a zip archive: a Keras .keras file? load it in Keras and save with model.save('x.h5'))"
                if zipped else "")
        raise WeightsError(f"{path}: not an HDF5 file{hint}; expected Keras weights (.h5)")
    try:
        with h5py.File(path, "r") as f:
            if _attr_list(f, "layer_names"):
                return KerasFile(path, "keras-legacy-weights", legacy=_legacy_layers(f))
            if "model_weights" in f:
                return KerasFile(path, "keras-legacy-model", legacy=_legacy_layers(f["model_weights"]))
            if "layers" in f:
                return KerasFile(path, "keras3-weights", queues=_keras3_queues(f))
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: truncated or corrupt HDF5 file ({first}); delete it and fetch again") from None
    raise WeightsError(f"{path}: HDF5 file without Keras weights (no 'layer_names', 'model_weights' or 'layers')")


def read_keras_h5(path, arch: KerasArch, include_top: bool = False) -> tuple[str, list[Layer]]:
    """``(layout, weighted layers in Keras' order for arch)`` from any of the three layouts."""
    file = read_keras_file(path)
    return file.layout, file.in_order(arch.expected(include_top))


def identify(file: KerasFile, archs: Sequence[KerasArch]) -> tuple[KerasArch, bool] | None:
    """``(arch, has_top)`` whose layer shapes the file holds exactly, or None."""
    for arch in archs:
        for top in (True, False):
            expected = arch.expected(top)
            if file.num_layers == len(expected) and matches(file.in_order(expected), expected):
                return arch, top
    return None


def load_keras_h5(path, arch: KerasArch, include_top: bool = False, others: Sequence[KerasArch] = ()) -> dict:
    """Read and convert; raises ``WeightsError`` with one line on any problem.

    ``others``: architectures to recognise when the file is not ``arch``'s, so the error says
    whose weights it holds ("VGG16 weights (no top), not ResNet50 weights").
    """
    file = read_keras_file(path)
    try:
        return convert(file.in_order(arch.expected(include_top)), arch, include_top,
                       source=f"{path} ({file.layout})")
    except WeightsError:
        found = identify(file, [a for a in others if a.key != arch.key])
        if found is None:
            raise
        other, top = found
        raise WeightsError(f"{path}: holds {other.name} weights ({'with' if top else 'no'} top, like "
                           f"{other.files[top][0]}), not {arch.name} weights; use model={other.key} with "
                           f"this file, or give {arch.key} {arch.files[include_top][0]}") from None
