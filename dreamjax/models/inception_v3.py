"""Flax InceptionV3, a port of keras/src/applications/inception_v3.py.

The architecture is written once, as a table of Keras' ``conv2d_bn`` calls in
Keras' source order (``BLOCKS``). The module runs that table, and
``keras_layer_order`` walks the same table to list the weighted layers in the
order a Keras HDF5 file stores them, so the weight converter cannot drift from
the model.

Numbers match Keras (max |diff| ~1e-6 of the activation scale in float32) only
because of three details, each commented where it lives: BatchNorm epsilon 1e-3,
average pooling that excludes the padding, and ``VALID`` padding where Keras
says so. Inputs are NHWC, already preprocessed to ``x / 127.5 - 1``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models.keras_apps import (
    KerasBatchNorm,
    keras_deprocess,
    keras_preprocess,
    register_arch,
    register_keras_backbone,
    tap_stop,
)
from dreamjax.models.keras_apps import random_variables as keras_random_variables
from dreamjax.models.ops import Conv2D, avg_pool_same, conv_affine, max_pool, on_onednn
from dreamjax.weights.keras_h5 import BN_NO_SCALE, CONV, DENSE, ExpectedLayer, KerasArch, functional_order, leaves_of

MIN_SIZE = 75  # Keras' own limit: smaller inputs shrink to nothing before mixed8.
TAPS = tuple(f"mixed{i}" for i in range(11))
TAP_STRIDES = {t: 8 if i <= 2 else 16 if i <= 7 else 32 for i, t in enumerate(TAPS)}


@dataclasses.dataclass(frozen=True)
class Conv:
    """One Keras ``conv2d_bn`` call: conv (no bias) -> BatchNorm -> ReLU."""

    name: str
    filters: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"


AVG = "avg_pool"  # 3x3, stride 1, 'same' padding, padding excluded from the mean
MAX = "max_pool"  # 3x3, stride 2, 'valid'


def _c(name, filters, kh, kw, strides=1, padding="SAME"):
    return Conv(name, filters, (kh, kw), strides, padding)


# A block is a tuple of branches concatenated on channels (Keras' ``mixedN``);
# a branch is a chain of steps; a step is a Conv, AVG/MAX, or a pair of Convs
# applied side by side and concatenated (Keras' ``mixed9_0``/``mixed9_1`` and the
# unnamed ``concatenate`` in mixed9/mixed10).
def _block_a(pool_filters):  # mixed0-2, 35x35 at 299
    return (
        (_c("branch1x1", 64, 1, 1),),
        (_c("branch5x5_1", 48, 1, 1), _c("branch5x5_2", 64, 5, 5)),
        (_c("branch3x3dbl_1", 64, 1, 1), _c("branch3x3dbl_2", 96, 3, 3), _c("branch3x3dbl_3", 96, 3, 3)),
        (AVG, _c("branch_pool", pool_filters, 1, 1)),
    )


def _block_c(c7):  # mixed4-7, 17x17 at 299
    return (
        (_c("branch1x1", 192, 1, 1),),
        (_c("branch7x7_1", c7, 1, 1), _c("branch7x7_2", c7, 1, 7), _c("branch7x7_3", 192, 7, 1)),
        (_c("branch7x7dbl_1", c7, 1, 1), _c("branch7x7dbl_2", c7, 7, 1), _c("branch7x7dbl_3", c7, 1, 7),
         _c("branch7x7dbl_4", c7, 7, 1), _c("branch7x7dbl_5", 192, 1, 7)),
        (AVG, _c("branch_pool", 192, 1, 1)),
    )


def _block_e():  # mixed9-10, 8x8 at 299
    return (
        (_c("branch1x1", 320, 1, 1),),
        (_c("branch3x3", 384, 1, 1), (_c("branch3x3_1", 384, 1, 3), _c("branch3x3_2", 384, 3, 1))),
        (_c("branch3x3dbl_1", 448, 1, 1), _c("branch3x3dbl_2", 384, 3, 3),
         (_c("branch3x3dbl_3a", 384, 1, 3), _c("branch3x3dbl_3b", 384, 3, 1))),
        (AVG, _c("branch_pool", 192, 1, 1)),
    )


BLOCKS = (
    ("stem", ((_c("conv1", 32, 3, 3, 2, "VALID"), _c("conv2", 32, 3, 3, 1, "VALID"), _c("conv3", 64, 3, 3), MAX,
               _c("conv4", 80, 1, 1, 1, "VALID"), _c("conv5", 192, 3, 3, 1, "VALID"), MAX),)),
    ("mixed0", _block_a(32)),
    ("mixed1", _block_a(64)),
    ("mixed2", _block_a(64)),
    ("mixed3", ((_c("branch3x3", 384, 3, 3, 2, "VALID"),),
                (_c("branch3x3dbl_1", 64, 1, 1), _c("branch3x3dbl_2", 96, 3, 3),
                 _c("branch3x3dbl_3", 96, 3, 3, 2, "VALID")),
                (MAX,))),
    ("mixed4", _block_c(128)),
    ("mixed5", _block_c(160)),
    ("mixed6", _block_c(160)),
    ("mixed7", _block_c(192)),
    ("mixed8", ((_c("branch3x3_1", 192, 1, 1), _c("branch3x3_2", 320, 3, 3, 2, "VALID")),
                (_c("branch7x7x3_1", 192, 1, 1), _c("branch7x7x3_2", 192, 1, 7), _c("branch7x7x3_3", 192, 7, 1),
                 _c("branch7x7x3_4", 192, 3, 3, 2, "VALID")),
                (MAX,))),
    ("mixed9", _block_e()),
    ("mixed10", _block_e()),
)

# Keras BatchNormalization(scale=False) with epsilon 1e-3, in Keras' arithmetic order (why: KerasBatchNorm).
BatchNorm = functools.partial(KerasBatchNorm, epsilon=1e-3, use_scale=False)


class ConvBN(nn.Module):
    spec: Conv
    dtype: Any = jnp.float32
    feeds: Conv | None = None  # the next step of its branch, when it is a convolution (ops.conv_affine)

    @nn.compact
    def __call__(self, x):
        s = self.spec
        conv = Conv2D(s.filters, s.kernel, s.strides, padding=s.padding, dtype=self.dtype, name="conv")
        # conv -> BatchNorm -> ReLU; one oneDNN call on the oneDNN dream path (ops.conv_affine)
        nxt = self.feeds
        feeds = None if nxt is None else (nxt.kernel, nxt.filters, nxt.strides, nxt.padding)
        return conv_affine(self, conv, x, BatchNorm(dtype=self.dtype, name="bn"), relu=True, feeds=feeds)


class Block(nn.Module):
    branches: tuple
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        onednn = on_onednn(self)

        def step(y, s, feeds=None):
            if isinstance(s, Conv):
                return ConvBN(s, self.dtype, feeds, name=s.name)(y)
            if s == AVG:
                # Keras excludes the zero padding from the mean (Flax's avg_pool counts it by
                # default, which darkens every border pixel of every branch_pool). Both pools
                # are slice-based (dreamjax.models.ops): same values, fused on CPU.
                return avg_pool_same(y, 3)
            if s == MAX:
                return max_pool(y, 3, 2, onednn)
            return jnp.concatenate([step(y, t) for t in s], axis=-1)

        outs = []
        for branch in self.branches:
            y = x
            for i, s in enumerate(branch):
                nxt = branch[i + 1] if i + 1 < len(branch) else None
                y = step(y, s, nxt if isinstance(nxt, Conv) else None)
            outs.append(y)
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


class InceptionV3(nn.Module):
    """InceptionV3 returning ``(logits | None, {"mixed0": ..., "mixed10": ...})``.

    ``dtype`` is the compute dtype; parameters stay float32. The optional top is
    global average pooling + ``Dense(1000)`` named ``predictions`` and returns
    *logits*: Keras' top applies softmax, so ``softmax(logits)`` equals Keras'
    output. ``train`` exists for the common signature only: BatchNorm always runs
    on stored statistics.
    """

    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        if train:
            raise NotImplementedError("InceptionV3 here is inference-only (BatchNorm uses stored statistics)")
        stop = tap_stop("InceptionV3", x, taps, TAPS, MIN_SIZE)
        x = x.astype(self.dtype)
        out = {}
        for name, branches in BLOCKS:
            x = Block(branches, self.dtype, name=name)(x)
            if name in TAPS:
                out[name] = x
                if taps and TAPS.index(name) == stop:
                    return None, {t: out[t] for t in taps}
        logits = None
        if self.include_top:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x.mean(axis=(1, 2)))
        return logits, out


# --- Keras layer order ----------------------------------------------------------------------------
# flax -> keras: a legacy Keras HDF5 file lists layers in the order of
# ``Functional.layers``: Keras' map_graph sorts every layer by depth (longest path
# to the output, deepest first) and breaks ties by the pre-order index of a
# depth-first walk from the output that follows each layer's inputs in order.
# Because every path crosses each mixedN concat, blocks come out in source order,
# but inside a block the order interleaves branches, e.g. for mixed0
# (Keras-2 names as in the official file, conv2d_1 = stem conv1):
#   conv2d_9 (branch3x3dbl_1), bn_9, conv2d_7 (branch5x5_1), conv2d_10 (branch3x3dbl_2),
#   bn_7, bn_10, conv2d_6 (branch1x1), conv2d_8 (branch5x5_2), conv2d_11 (branch3x3dbl_3),
#   conv2d_12 (branch_pool), bn_6, bn_8, bn_11, bn_12.
# The file's names are never used, only positions (like Keras' own loader), and
# every tensor's shape is checked. Below, that sort is replayed on a graph built
# from BLOCKS with one node per Keras layer (conv, bn, activation, pool, concat).

def _keras_graph(include_top: bool) -> tuple[dict[str, list[str]], str]:
    graph: dict[str, list[str]] = {"input": []}

    def add(node, inputs):
        graph[node] = list(inputs)
        return node

    def step(y, s, at):
        if isinstance(s, Conv):
            y = add(f"{at}/{s.name}/conv", [y])
            y = add(f"{at}/{s.name}/bn", [y])
            return add(f"{at}/{s.name}/relu", [y])
        if isinstance(s, str):
            return add(f"{at}/{s}@{len(graph)}", [y])
        return add(f"{at}/concat@{len(graph)}", [step(y, t, at) for t in s])

    x = "input"
    for name, branches in BLOCKS:
        outs = []
        for branch in branches:
            y = x
            for s in branch:
                y = step(y, s, name)
            outs.append(y)
        x = outs[0] if len(outs) == 1 else add(f"{name}/concat", outs)
    if include_top:
        x = add("predictions/dense", [add("avg_pool", [x])])
    return graph, x


@functools.lru_cache(maxsize=None)
def keras_layer_order(include_top: bool = False) -> tuple[tuple[str, ...], ...]:
    """Flax paths of the weighted layers, in the order Keras stores them.

    Each entry is ``(block, unit, "conv"|"bn")`` or ``("predictions", "dense")``.
    """
    order = functional_order(*_keras_graph(include_top))
    return tuple(tuple(n.split("/")) for n in order if n.endswith(("/conv", "/bn", "/dense")))


_KIND = {"conv": ("conv2d", CONV), "bn": ("batch_normalization", BN_NO_SCALE), "dense": ("dense", DENSE)}


@functools.lru_cache(maxsize=None)
def expected_layers() -> tuple[ExpectedLayer, ...]:
    """The weighted layers (with the top) in Keras' order, with their Flax leaves and shapes."""
    shapes = jax.eval_shape(InceptionV3(include_top=True).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
    out = []
    for entry in keras_layer_order(True):
        *unit, kind = entry
        keras_class, spec = _KIND[kind]
        path = tuple(unit) if kind == "dense" else (*unit, kind)
        out.append(ExpectedLayer("/".join(entry), keras_class, leaves_of(shapes, path, spec)))
    return tuple(out)


# From keras/src/applications/inception_v3.py (WEIGHTS_PATH, WEIGHTS_PATH_NO_TOP and their file_hash).
ARCH = register_arch(KerasArch(
    name="InceptionV3", key="inception_v3", layers=expected_layers, top_layers=1,
    files={True: ("inception_v3_weights_tf_dim_ordering_tf_kernels.h5", "md5:9a0d58056eeedaa3f26cb7ebd46da564"),
           False: ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "md5:bcbd6486424b2319ff4ef7d526e38f63")},
    base_url="https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"))


def source_order() -> tuple[tuple[str, str], ...]:
    """(block, unit) for every conv2d_bn in Keras' source order (= Keras' auto-name numbering)."""

    def units(s):
        if isinstance(s, Conv):
            return [s.name]
        return [] if isinstance(s, str) else [u for t in s for u in units(t)]

    return tuple((name, u) for name, branches in BLOCKS for branch in branches for s in branch for u in units(s))


# --- registry ------------------------------------------------------------------------------------

def random_variables(include_top: bool, seed: int = 0):
    """Seeded He-normal weights and random BatchNorm statistics (so inference exercises them)."""
    return keras_random_variables(InceptionV3(include_top=include_top), MIN_SIZE, seed)


register_keras_backbone(
    "inception_v3", InceptionV3, ARCH, taps=TAPS, tap_strides=TAP_STRIDES, min_size=MIN_SIZE,
    value_range=(-1.0, 1.0), preprocess=keras_preprocess, deprocess=keras_deprocess,
    description="InceptionV3 (Keras ImageNet weights), taps mixed0..mixed10")
