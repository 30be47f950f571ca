"""Keras HDF5 weights -> Flax InceptionV3 variables ``{"params", "batch_stats"}``.

Three layouts are read, all written by Keras itself:

* legacy weights at the root (the official ``inception_v3_weights_tf_dim_ordering_tf_kernels*.h5``,
  Keras 2 names such as ``conv2d_1/kernel:0``; also Keras 3's ``save_weights_to_hdf5_group``);
* ``model.save("x.h5")`` (the same, nested under ``model_weights/``);
* Keras 3 ``model.save_weights("x.weights.h5")`` (``layers/<class>_<k>/vars/<i>``).

Layer names are never trusted: like Keras' own loader, layers with weights are
paired *by position* with the model's weighted layers in Keras' topological order
(``inception_v3.keras_layer_order``, where the flax->keras order is documented),
and every tensor's shape is checked. Keras kernels are already HWIO / (in, out),
Flax's layout, so nothing is transposed. Every failure is one ``WeightsError`` line
naming the file.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Sequence

import numpy as np

Layer = tuple[str, Sequence[np.ndarray]]  # (layer name in the file, arrays in Keras' legacy order)


class WeightsError(ValueError):
    """Weights that cannot be found, downloaded or fitted to the model (one line, names the file)."""


# --- the model side ---------------------------------------------------------------------------------

# Keras' legacy weight order per layer (trainable, then non-trainable) -> Flax leaf.
_LEAVES = {
    "conv": (("params", "conv", "kernel"),),
    "bn": (("params", "bn", "bias"), ("batch_stats", "bn", "mean"), ("batch_stats", "bn", "var")),
    "dense": (("params", "kernel"), ("params", "bias")),
}
KERAS_CLASS = {"conv": "conv2d", "bn": "batch_normalization", "dense": "dense"}


@functools.lru_cache(maxsize=None)
def expected_layers(include_top: bool):
    """``[("block/unit/kind", kind, [(variable path, shape), ...]), ...]`` in Keras' order."""
    import jax
    import jax.numpy as jnp

    from dreamjax.models.inception_v3 import MIN_SIZE, InceptionV3, keras_layer_order

    shapes = jax.eval_shape(InceptionV3(include_top=include_top).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
    out = []
    for entry in keras_layer_order(include_top):
        *unit, kind = entry
        leaves = []
        for collection, *leaf in _LEAVES[kind]:
            node = shapes[collection]
            for key in (*unit, *leaf):
                node = node[key]
            leaves.append(((collection, *unit, *leaf), tuple(node.shape)))
        out.append(("/".join(entry), kind, leaves))
    return out


def _names(names, limit=6):
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert(layers: Sequence[Layer], include_top: bool, source: str = "<weights>") -> dict:
    """Pure: weighted layers in Keras' order -> nested Flax variables, or ``WeightsError``.

    A file with the classifier top also serves ``include_top=False`` (its last
    Dense is dropped); the reverse is an error.
    """
    from flax import traverse_util

    expected = expected_layers(include_top)
    flat = {}
    for k, ((name, arrays), (unit, _, leaves)) in enumerate(zip(layers, expected)):
        got = [tuple(np.shape(a)) for a in arrays]
        want = [shape for _, shape in leaves]
        if got != want:
            raise WeightsError(f"{source}: not InceptionV3 weights: layer #{k} {name!r} in the file holds "
                               f"shapes {got}, the model's {unit} needs {want}")
        flat.update((path, np.asarray(a, np.float32)) for (path, _), a in zip(leaves, arrays))
    extra = [name for name, _ in layers[len(expected):]]
    missing = [unit for unit, _, _ in expected[len(layers):]]
    if not include_top and len(extra) == 1 and [np.shape(a) for a in layers[-1][1]] == [(2048, 1000), (1000,)]:
        extra = []  # the classifier of a full file, not needed here
    if missing == ["predictions/dense"]:
        raise WeightsError(f"{source}: has no classifier top (a 'notop' file, {len(layers)} weighted layers) "
                           "but include_top=True was asked; use the full weights file or include_top=False")
    if missing or extra:
        raise WeightsError(f"{source}: not InceptionV3 weights: {len(layers)} weighted layers in the file, "
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


def _keras3_layers(group, include_top: bool) -> list[Layer]:
    # Keras 3 names each layer's group after its class, numbered per class in the
    # model's layer order (conv2d, conv2d_1, ...), so per-class queues are in Keras'
    # order; they are merged back following the model's sequence of layer kinds.
    queues: dict[str, list[Layer]] = {}
    for key in sorted(group["layers"], key=_split_key):
        vars_ = group["layers"][key].get("vars")
        if vars_ is not None and len(vars_):
            name = vars_.attrs.get("name", key)
            arrays = [vars_[i][()] for i in sorted(vars_, key=int)]
            queues.setdefault(_split_key(key)[0], []).append((str(name), arrays))
    layers = []
    for _, kind, _ in expected_layers(include_top):
        queue = queues.get(KERAS_CLASS[kind])
        if not queue:
            break
        layers.append(queue.pop(0))
    return layers + [layer for queue in queues.values() for layer in queue]


def read_keras_h5(path, include_top: bool = False) -> tuple[str, list[Layer]]:
    """``(layout, weighted layers in Keras' order)`` from any of the three layouts."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if not h5py.is_hdf5(path):
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"
        hint = (" (a zip archive: a Keras .keras file? load it in Keras and save with model.save('x.h5'))"
                if zipped else "")
        raise WeightsError(f"{path}: not an HDF5 file{hint}; expected Keras InceptionV3 weights (.h5)")
    try:
        with h5py.File(path, "r") as f:
            if _attr_list(f, "layer_names"):
                return "keras-legacy-weights", _legacy_layers(f)
            if "model_weights" in f:
                return "keras-legacy-model", _legacy_layers(f["model_weights"])
            if "layers" in f:
                return "keras3-weights", _keras3_layers(f, include_top)
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: truncated or corrupt HDF5 file ({first}); delete it and fetch again") from None
    raise WeightsError(f"{path}: HDF5 file without Keras weights (no 'layer_names', 'model_weights' or 'layers')")


def load_keras_h5(path, include_top: bool = False) -> dict:
    """Read and convert; raises ``WeightsError`` with one line on any problem."""
    layout, layers = read_keras_h5(path, include_top)
    return convert(layers, include_top, source=f"{path} ({layout})")
