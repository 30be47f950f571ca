"""Flax ResNet50 (v1), a port of keras/src/applications/resnet.py with the Keras ImageNet weights.

Module names are Keras' layer names, so a Flax path reads like the Keras summary:
``params["conv3_block2"]["2_conv"]["conv"]["kernel"]`` is Keras' ``conv3_block2_2_conv`` kernel.

Taps (stride relative to the input), shallow to deep:

* ``conv1_relu`` (2): the 7x7 stem conv + BN + ReLU, 64 channels;
* ``pool1_pool`` (4): the stem's 3x3 max pool — the stem stage's output;
* ``convN_blockM_out``: every bottleneck block's output (after the residual add and ReLU),
  conv2 (3 blocks, 256 channels, stride 4), conv3 (4, 512, 8), conv4 (6, 1024, 16),
  conv5 (3, 2048, 32). The last block of each stage is the stage output
  (``conv2_block3_out``, ``conv3_block4_out``, ``conv4_block6_out``, ``conv5_block3_out``).

Numbers match Keras (~1e-6 of the activation scale in float32) because of three details, each
commented where it lives: BatchNorm epsilon 1.001e-5 in Keras' arithmetic order, explicit zero
padding before the ``VALID`` stem conv and pool (not ``SAME``, which pads asymmetrically), and
the stride on the first 1x1 conv of a block (Keras v1, not the 3x3 as in torchvision's v1.5).
Inputs are Keras' caffe preprocessing: BGR, ImageNet mean subtracted, no scaling.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models.keras_apps import (
    CAFFE_RANGE,
    ConvBias,
    KerasBatchNorm,
    caffe_deprocess,
    caffe_preprocess,
    register_arch,
    register_keras_backbone,
    tap_stop,
)
from dreamjax.models.ops import max_pool, on_onednn
from dreamjax.weights.keras_h5 import (
    BN,
    CONV_BIAS,
    DENSE,
    ExpectedLayer,
    KerasArch,
    functional_order,
    leaves_of,
)

# (stage, bottleneck width, blocks, stride of the first block)
STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
MIN_SIZE = 32  # Keras' own limit (conv5 is then 1x1)
TAPS = ("conv1_relu", "pool1_pool") + tuple(f"{s}_block{m}_out" for s, _, n, _ in STAGES for m in range(1, n + 1))
TAP_STRIDES = {"conv1_relu": 2, "pool1_pool": 4,
               **{f"{s}_block{m}_out": 4 * 2 ** i for i, (s, _, n, _) in enumerate(STAGES) for m in range(1, n + 1)}}

# Keras' ResNet BatchNormalization: epsilon 1.001e-5 (not Flax's 1e-5), with a learned scale.
BatchNorm = functools.partial(KerasBatchNorm, epsilon=1.001e-5, use_scale=True)


class Bottleneck(nn.Module):
    """Keras ``residual_block_v1``: 1x1 (strided) -> 3x3 -> 1x1 x4, plus the shortcut, then ReLU."""

    filters: int
    stride: int = 1
    conv_shortcut: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, d = self.filters, self.dtype
        shortcut = x
        if self.conv_shortcut:
            shortcut = BatchNorm(dtype=d, name="0_bn")(ConvBias(4 * f, 1, self.stride, dtype=d, name="0_conv")(x))
        x = nn.relu(BatchNorm(dtype=d, name="1_bn")(ConvBias(f, 1, self.stride, dtype=d, name="1_conv")(x)))
        x = nn.relu(BatchNorm(dtype=d, name="2_bn")(ConvBias(f, 3, 1, "SAME", dtype=d, name="2_conv")(x)))
        x = BatchNorm(dtype=d, name="3_bn")(ConvBias(4 * f, 1, dtype=d, name="3_conv")(x))
        return nn.relu(shortcut + x)


def _pad(x, p):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


class ResNet50(nn.Module):
    """ResNet50 returning ``(logits | None, {tap: activation})``; see the module docstring.

    The optional top is global average pooling + ``Dense(1000)`` named ``predictions`` and returns
    *logits* (Keras applies softmax). BatchNorm always runs on stored statistics.
    """

    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        stop = tap_stop("resnet50", x, taps, TAPS, MIN_SIZE)
        d = self.dtype
        out = {}

        def keep(name, value):
            out[name] = value
            return taps is not None and TAPS.index(name) == stop

        # Keras pads explicitly (3 each side) and convolves VALID: SAME would pad 2 before, 3 after.
        x = ConvBias(64, 7, 2, dtype=d, name="conv1_conv")(_pad(x.astype(d), 3))
        x = nn.relu(BatchNorm(dtype=d, name="conv1_bn")(x))
        if keep("conv1_relu", x):
            return None, {t: out[t] for t in taps}
        # Zero padding before a max pool over ReLU outputs: a pad never beats a real pixel, and
        # on ties (all zeros) the first position wins, exactly as in Keras' reduce_window.
        x = max_pool(_pad(x, 1), 3, 2, on_onednn(self))
        if keep("pool1_pool", x):
            return None, {t: out[t] for t in taps}
        for stage, filters, blocks, stride in STAGES:
            for m in range(1, blocks + 1):
                x = Bottleneck(filters, stride if m == 1 else 1, conv_shortcut=m == 1, dtype=d,
                               name=f"{stage}_block{m}")(x)
                if keep(f"{stage}_block{m}_out", x):
                    return None, {t: out[t] for t in taps}
        logits = None
        if self.include_top:
            logits = nn.Dense(self.num_classes, dtype=d, name="predictions")(x.mean(axis=(1, 2)))
        return logits, out


# --- Keras layer order ------------------------------------------------------------------------------
# A legacy HDF5 file lists layers in Functional.layers order (keras_h5.functional_order), which
# inside a block with a shortcut conv interleaves the branches: 1_conv, 1_bn, 2_conv, 2_bn,
# 0_conv, 3_conv, 0_bn, 3_bn. The graph below has one node per Keras layer, inputs in call order.

def _keras_graph(include_top: bool) -> tuple[dict[str, list[str]], str]:
    graph: dict[str, list[str]] = {"input": []}

    def add(node, *inputs):
        graph[node] = list(inputs)
        return node

    x = add("conv1_relu", add("conv1_bn", add("conv1_conv", add("conv1_pad", "input"))))
    x = add("pool1_pool", add("pool1_pad", x))
    for stage, _, blocks, _ in STAGES:
        for m in range(1, blocks + 1):
            b = f"{stage}_block{m}"
            shortcut = add(f"{b}/0_bn", add(f"{b}/0_conv", x)) if m == 1 else x
            y = add(f"{b}/1_relu", add(f"{b}/1_bn", add(f"{b}/1_conv", x)))
            y = add(f"{b}/2_relu", add(f"{b}/2_bn", add(f"{b}/2_conv", y)))
            y = add(f"{b}/3_bn", add(f"{b}/3_conv", y))
            x = add(f"{b}/out", add(f"{b}/add", shortcut, y))
    if include_top:
        x = add("predictions", add("avg_pool", x))
    return graph, x


@functools.cache
def keras_layer_order(include_top: bool = True) -> tuple[str, ...]:
    """Flax module paths (``"/"``-joined) of the weighted layers, in the order Keras stores them."""
    order = functional_order(*_keras_graph(include_top))
    return tuple(n for n in order if n.endswith(("_conv", "_bn")) or n == "predictions")


@functools.cache
def expected_layers() -> tuple[ExpectedLayer, ...]:
    """The weighted layers (with the top) in Keras' order, with their Flax leaves and shapes."""
    shapes = jax.eval_shape(ResNet50(include_top=True).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
    out = []
    for unit in keras_layer_order(True):
        path = tuple(unit.split("/"))
        if unit == "predictions":
            out.append(ExpectedLayer(unit, "dense", leaves_of(shapes, path, DENSE)))
        elif unit.endswith("_conv"):
            out.append(ExpectedLayer(unit, "conv2d", leaves_of(shapes, path, (("params", "conv", "kernel"),
                                                                               CONV_BIAS[1]))))
        else:
            out.append(ExpectedLayer(unit, "batch_normalization", leaves_of(shapes, path, BN)))
    return tuple(out)


# From keras/src/applications/resnet.py (BASE_WEIGHTS_PATH, WEIGHTS_HASHES["resnet50"]).
ARCH = register_arch(KerasArch(
    name="ResNet50", key="resnet50", layers=expected_layers, top_layers=1,
    files={True: ("resnet50_weights_tf_dim_ordering_tf_kernels.h5", "md5:2cb95161c43110f7111970584f804107"),
           False: ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5:4d473c1dd8becc155b73f8504c6f6626")},
    base_url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"))


register_keras_backbone(
    "resnet50", ResNet50, ARCH, taps=TAPS, tap_strides=TAP_STRIDES, min_size=MIN_SIZE, value_range=CAFFE_RANGE,
    preprocess=caffe_preprocess, deprocess=caffe_deprocess,
    description="ResNet50 v1 (Keras ImageNet weights), taps conv1_relu, pool1_pool, convN_blockM_out")
