"""``dreamjax-weights fetch | convert | info``: manage backbone weights, list a backbone's taps.

    dreamjax-weights fetch --model resnet50 --all       # both official Keras files into the cache
    dreamjax-weights convert FILE.h5 --model vgg16 [--top] [-o OUT.msgpack]
    dreamjax-weights info --model resnet50 [--size 224 | --size 181x247]   # every tap: shape, stride
    dreamjax-weights info FILE.h5 --model inception_v3 --top                # the file's hash and counts
    dreamjax-weights info --model mynet --module my_pkg.my_model            # your own backbone

``fetch`` and ``convert`` are for the Keras backbones (inception_v3, resnet50, vgg16); ``info``
works for every registered backbone. ``--model`` defaults to inception_v3.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dreamjax
from dreamjax.models import get_spec
from dreamjax.models.keras_apps import KERAS_ARCHS
from dreamjax.weights.keras_h5 import read_keras_file
from dreamjax.weights.store import converted_path, fetch, load_converted, save_variables

DEFAULT_SIZE = {"inception_v3": 299, "efficientnet_lite2": 260}  # others: 224 (or their minimum)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def _arch(name: str):
    get_spec(name)  # unknown names: the registry's error, which lists the registered ones
    if name not in KERAS_ARCHS:
        raise ValueError(f"backbone {name!r} has no Keras weight files; fetch/convert serve "
                         f"{', '.join(sorted(KERAS_ARCHS))} (info works for every backbone)")
    return KERAS_ARCHS[name]


def _fetch(args):
    arch = _arch(args.model)
    for top in ((False, True) if args.all else (args.top,)):
        print(fetch(arch, top))


def _convert(args):
    arch = _arch(args.model)
    variables, sha = load_converted(arch, args.path, args.top, others=list(KERAS_ARCHS.values()))
    out = args.output or converted_path(arch, sha, args.top)
    if args.output:
        save_variables(variables, out)
    print(f"{args.path} -> {out}  sha256={sha}  params={_count(variables['params']):,}")


def _info(args):
    spec = get_spec(args.model)
    module = spec.build(include_top=args.top, dtype=jnp.float32, straight_through=False)
    size = DEFAULT_SIZE.get(spec.name, max(224, spec.min_size))
    h, w = args.size or (size, size)
    if min(h, w) < spec.min_size:
        raise ValueError(f"--size {h}x{w} is below {spec.name}'s minimum input size {spec.min_size}")
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    print(f"backbone  {spec.name}: {spec.description}")
    if args.path:
        arch = _arch(spec.name)
        file = read_keras_file(args.path)
        variables, sha = load_converted(arch, args.path, args.top, others=list(KERAS_ARCHS.values()))
        print(f"file      {args.path}\nlayout    {file.layout} ({file.num_layers} weighted layers)\nsha256    {sha}")
    else:
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        print("file      (none: shapes from the model definition)")
    params = _count(variables["params"])
    stats = _count({k: v for k, v in variables.items() if k != "params"})
    print(f"params    {params:,} trainable + {stats:,} BatchNorm statistics = {params + stats:,}"
          f" (include_top={args.top})")
    print(f"input     {spec.min_size} px minimum; preprocessed range {spec.value_range[0]:g}..{spec.value_range[1]:g}")
    taps = tuple(spec.taps)
    out = jax.eval_shape(lambda v, x: module.apply(v, x, taps=taps)[1], variables, x)
    width = max(len(t) for t in taps)
    print(f"taps at {h}x{w} ({len(taps)}, shallow to deep; stride = input pixels per tap pixel):")
    for name in taps:
        shape = "x".join(map(str, out[name].shape[1:]))
        print(f"  {name:<{width}}  {shape:<14} stride {spec.tap_strides[name]}")


def main(argv=None) -> int:
    dreamjax.configure_cpu()
    parser = argparse.ArgumentParser(prog="dreamjax-weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="inception_v3", help="backbone name (default: inception_v3)")
        p.add_argument("--module", help="import this module first (it registers your own backbone)")
        p.add_argument("--top", action="store_true", help="with the classifier top (default: no top)")

    p = sub.add_parser("fetch", help="download the official Keras weights into the cache")
    common(p)
    p.add_argument("--all", action="store_true", help="both files (with and without top)")
    p.set_defaults(run=_fetch)
    p = sub.add_parser("convert", help="convert a Keras .h5 file to Flax variables (msgpack)")
    p.add_argument("path")
    common(p)
    p.add_argument("-o", "--output", help="output file (default: the converted cache)")
    p.set_defaults(run=_convert)
    p = sub.add_parser("info", help="parameter counts, every tap with its shape and stride; a file's hash")
    p.add_argument("path", nargs="?")
    common(p)
    p.add_argument("--size", type=_size, default=None, help="input size, N or HxW (default: the model's own)")
    p.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        if args.module:
            importlib.import_module(args.module)
        args.run(args)
    except (ValueError, ModuleNotFoundError) as e:  # WeightsError (one line, names the file), bad names/sizes
        print(f"dreamjax-weights: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
