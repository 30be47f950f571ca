"""Flax VGG16, a port of keras/src/applications/vgg16.py with the Keras ImageNet weights.

Module names are Keras' layer names (``block3_conv2``, ``fc1``, ``predictions``). Taps, shallow
to deep: every ``blockN_convM`` (the 3x3 conv + bias + ReLU output, as Keras' layer of that name
returns it) and every ``blockN_pool`` (2x2 max pool, stride 2). Strides: block N's convs
``2**(N-1)``, its pool ``2**N``; widths 64, 128, 256, 512, 512.

The optional top is Keras' ``Flatten -> fc1 (4096, ReLU) -> fc2 (4096, ReLU) -> predictions``
and returns *logits* (Keras applies softmax). Because of the Flatten it needs exactly 224x224
inputs; without the top any size from 32 px works. Inputs are Keras' caffe preprocessing:
BGR, ImageNet mean subtracted, no scaling. No BatchNorm: the network is plain convolutions.
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
    caffe_deprocess,
    caffe_preprocess,
    register_arch,
    register_keras_backbone,
    tap_stop,
)
from dreamjax.models.ops import max_pool, on_onednn
from dreamjax.weights.keras_h5 import DENSE, ExpectedLayer, KerasArch, leaves_of

BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, convs) per block
MIN_SIZE = 32  # Keras' own limit (block5_pool is then 1x1)
TOP_SIZE = 224  # the only input size the Flatten top accepts
TAPS = tuple(t for n, (_, convs) in enumerate(BLOCKS, 1)
             for t in (*(f"block{n}_conv{m}" for m in range(1, convs + 1)), f"block{n}_pool"))
TAP_STRIDES = {t: 2 ** (int(t[5]) - (0 if t.endswith("pool") else 1)) for t in TAPS}


class VGG16(nn.Module):
    """VGG16 returning ``(logits | None, {tap: activation})``; see the module docstring."""

    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        stop = tap_stop("vgg16", x, taps, TAPS, MIN_SIZE)
        d = self.dtype
        x = x.astype(d)
        out = {}
        for n, (width, convs) in enumerate(BLOCKS, 1):
            for m in range(1, convs + 1):
                x = out[f"block{n}_conv{m}"] = nn.relu(ConvBias(width, 3, 1, "SAME", dtype=d,
                                                                name=f"block{n}_conv{m}")(x))
                if taps is not None and TAPS.index(f"block{n}_conv{m}") == stop:
                    return None, {t: out[t] for t in taps}
            x = out[f"block{n}_pool"] = max_pool(x, 2, 2, on_onednn(self))
            if taps is not None and TAPS.index(f"block{n}_pool") == stop:
                return None, {t: out[t] for t in taps}
        logits = None
        if self.include_top:
            if x.shape[1:3] != (TOP_SIZE // 32, TOP_SIZE // 32):
                raise ValueError(f"vgg16's classifier top (Flatten to 7x7x512) needs {TOP_SIZE}x{TOP_SIZE} inputs, "
                                 f"got {x.shape[1] * 32}x{x.shape[2] * 32}-ish; use include_top=False for other sizes")
            x = x.reshape(x.shape[0], -1)  # NHWC row-major: Keras' channels_last Flatten order
            x = nn.relu(nn.Dense(4096, dtype=d, name="fc1")(x))
            x = nn.relu(nn.Dense(4096, dtype=d, name="fc2")(x))
            logits = nn.Dense(self.num_classes, dtype=d, name="predictions")(x)
        return logits, out


@functools.cache
def expected_layers() -> tuple[ExpectedLayer, ...]:
    """The weighted layers (with the top) in Keras' order: a chain, so source order."""
    shapes = jax.eval_shape(VGG16(include_top=True).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, TOP_SIZE, TOP_SIZE, 3)))
    convs = [ExpectedLayer(t, "conv2d", leaves_of(shapes, (t,), (("params", "conv", "kernel"), ("params", "bias"))))
             for t in TAPS if "conv" in t]
    dense = [ExpectedLayer(t, "dense", leaves_of(shapes, (t,), DENSE)) for t in ("fc1", "fc2", "predictions")]
    return tuple(convs + dense)


# From keras/src/applications/vgg16.py (WEIGHTS_PATH, WEIGHTS_PATH_NO_TOP and their file_hash).
ARCH = register_arch(KerasArch(
    name="VGG16", key="vgg16", layers=expected_layers, top_layers=3,
    files={True: ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "md5:64373286793e3c8b2b4e3219cbf3544b"),
           False: ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5:6d6bbae143d832006294945121d1f1fc")},
    base_url="https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"))


register_keras_backbone(
    "vgg16", VGG16, ARCH, taps=TAPS, tap_strides=TAP_STRIDES, min_size=MIN_SIZE, value_range=CAFFE_RANGE,
    preprocess=caffe_preprocess, deprocess=caffe_deprocess,
    description="VGG16 (Keras ImageNet weights), taps blockN_convM and blockN_pool",
    random_size=lambda include_top: TOP_SIZE if include_top else MIN_SIZE)  # Flatten fixes the top's size
