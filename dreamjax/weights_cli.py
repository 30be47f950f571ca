"""``dreamjax-weights fetch | convert | info``: manage InceptionV3 weights.

    dreamjax-weights fetch --all              # both official Keras files into the cache (~180 MB)
    dreamjax-weights convert FILE.h5 [--top] [-o OUT.msgpack]
    dreamjax-weights info [FILE.h5] [--top] [--size 299 | --size 181x247]
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dreamjax
from dreamjax.models.inception_v3 import InceptionV3
from dreamjax.weights.keras_h5 import read_keras_h5
from dreamjax.weights.store import converted_path, fetch, load_converted, save_variables


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def _fetch(args):
    for top in ((False, True) if args.all else (args.top,)):
        print(fetch(top))


def _convert(args):
    variables, sha = load_converted(args.path, args.top)  # fills the converted cache
    out = args.output or converted_path(sha, args.top)
    if args.output:
        save_variables(variables, out)
    print(f"{args.path} -> {out}  sha256={sha}  params={_count(variables['params']):,}")


def _info(args):
    module = InceptionV3(include_top=args.top)
    h, w = args.size
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    if args.path:
        layout, layers = read_keras_h5(args.path, args.top)
        variables, sha = load_converted(args.path, args.top)
        print(f"file      {args.path}\nlayout    {layout} ({len(layers)} weighted layers)\nsha256    {sha}")
    else:
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        print("file      (none: shapes from the model definition)")
    params, stats = _count(variables["params"]), _count(variables["batch_stats"])
    print(f"params    {params:,} trainable + {stats:,} BatchNorm statistics = {params + stats:,}"
          f" (include_top={args.top})")
    out = jax.eval_shape(lambda v, x: module.apply(v, x)[1], variables, x)
    print(f"taps at {h}x{w}:")
    for name, a in sorted(out.items(), key=lambda kv: int(kv[0][5:])):
        print(f"  {name:8s} {'x'.join(map(str, a.shape[1:]))}")


def main(argv=None) -> int:
    dreamjax.configure_cpu()
    parser = argparse.ArgumentParser(prog="dreamjax-weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download the official Keras weights into the cache")
    p.add_argument("--top", action="store_true", help="the file with the classifier (default: no top)")
    p.add_argument("--all", action="store_true", help="both files")
    p.set_defaults(run=_fetch)
    p = sub.add_parser("convert", help="convert a Keras .h5 file to Flax variables (msgpack)")
    p.add_argument("path")
    p.add_argument("--top", action="store_true", help="keep the classifier")
    p.add_argument("-o", "--output", help="output file (default: the converted cache)")
    p.set_defaults(run=_convert)
    p = sub.add_parser("info", help="hash, parameter counts and tap shapes")
    p.add_argument("path", nargs="?")
    p.add_argument("--top", action="store_true")
    p.add_argument("--size", type=_size, default=(299, 299), help="input size, 299 or HxW")
    p.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # WeightsError (one line, names the file) and bad sizes
        print(f"dreamjax-weights: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
