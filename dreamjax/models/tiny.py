"""A tiny random CNN, for testing only.

Same contract as the real backbones (named taps, early stop, stored BatchNorm
statistics, optional top) but four small conv blocks, so the engine, sweeps and
checkpoint tests compile in a second instead of a minute. Its weights are a
seeded random init: dreams from it are noise, by design.
"""
from __future__ import annotations

import hashlib
from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamjax.models.ops import Conv2D
from dreamjax.models.registry import (
    BackboneSpec,
    keras_deprocess,
    keras_preprocess,
    register,
)

TAPS = ("conv1", "conv2", "conv3", "conv4")
WIDTHS = (8, 16, 16, 32)


class TinyCNN(nn.Module):
    include_top: bool = False
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        if min(x.shape[1:3]) < 16:
            raise ValueError(f"tiny needs inputs of at least 16x16, got {x.shape[1]}x{x.shape[2]}")
        stop = max(TAPS.index(t) for t in taps) if taps else len(TAPS) - 1
        norm = partial(nn.BatchNorm, use_running_average=True, epsilon=1e-3, dtype=self.dtype)
        out = {}
        x = x.astype(self.dtype)
        for i, (name, width) in enumerate(zip(TAPS, WIDTHS)):
            x = Conv2D(width, (3, 3), 2, "SAME", dtype=self.dtype, name=f"{name}_conv")(x)
            x = nn.relu(norm(name=f"{name}_bn")(x))
            out[name] = x
            if i == stop and taps:
                return None, {t: out[t] for t in taps}
        logits = None
        if self.include_top:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean(axis=(1, 2)))
        return logits, out


def _load(weights, include_top):
    if weights not in ("auto", "random", None):
        raise ValueError(f"backbone 'tiny' has random weights only; got weights={weights!r}")
    module = TinyCNN(include_top=include_top)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    # Random BatchNorm statistics, so stored-statistics inference is exercised.
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    stats = variables["batch_stats"]
    leaves, tree = jax.tree_util.tree_flatten(stats)
    keys = jax.random.split(k1, len(leaves))
    new = [(0.1 * jax.random.normal(k, l.shape) if i % 2 == 0 else 1.0 + 0.5 * jax.random.uniform(k, l.shape))
           for i, (k, l) in enumerate(zip(keys, leaves))]
    variables = {"params": variables["params"], "batch_stats": jax.tree_util.tree_unflatten(tree, new)}
    return variables, "tiny-random-seed0-" + hashlib.sha256(b"tiny-v1").hexdigest()[:16]


@register("tiny")
def _spec() -> BackboneSpec:
    return BackboneSpec(
        name="tiny",
        build=lambda include_top=False, dtype=jnp.float32, straight_through=False: TinyCNN(include_top=include_top,
                                                                                             dtype=dtype),
        taps=TAPS,
        tap_strides={t: 2 ** (i + 1) for i, t in enumerate(TAPS)},
        min_size=16,
        value_range=(-1.0, 1.0),
        preprocess=keras_preprocess,
        deprocess=keras_deprocess,
        load=_load,
        description="4-block random CNN for tests (not a real network)",
        num_classes=10,
    )
