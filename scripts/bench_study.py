#!/usr/bin/env python
"""Numerical side of the XLA study: does a variant change the dream?

Dreams the same cells (3 octaves x N steps, DLwP settings) twice, reference vs variant, and
prints max / mean |delta| of the final images (network input space, [-1, 1]) and of the losses.

  python scripts/bench_study.py --backbone inception_v3 --size 256 --iterations 10 --variant devloop
  python scripts/bench_study.py --backbone efficientnet_lite0 --weights auto --variant bf16
"""
import argparse
import json
import time

import numpy as np

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="inception_v3")
    p.add_argument("--weights", default="random")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--variant", choices=["devloop", "bf16"], required=True)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax

    from dreamjax import load_backbone
    from dreamjax.bench import engine as bench
    from dreamjax.engine.dream import CellParams, Dreamer, DreamRun, OctavePlan

    bb = load_backbone(a.backbone, weights=a.weights)
    _, weights = bench.default_taps(bb)
    params = CellParams.make(np.tile(np.asarray(weights, np.float32), (a.batch, 1)), 20.0, max_loss=None,
                             iterations=a.iterations, seed=np.arange(a.batch))
    rng = np.random.default_rng(0)
    # smooth random "paintings" (low-frequency noise upsampled), in the network's input range
    small = rng.uniform(-1, 1, (a.batch, a.size // 16, a.size // 16, 3)).astype(np.float32)
    images = np.asarray(jax.image.resize(small, (a.batch, a.size, a.size, 3), "bilinear"))

    def run(variant):
        cfg = bench.dlwp_config(bb, "bfloat16" if variant == "bf16" else "float32")
        d = Dreamer(bb, cfg, OctavePlan(), a.iterations)
        if variant == "devloop":
            d.device_loop = True
        elif variant == "hostloop":
            d.device_loop = False
        t0 = time.perf_counter()
        r = DreamRun(d, images, params).run()
        return r.final, np.concatenate([x.reshape(-1) for x in r.octave_losses]), time.perf_counter() - t0

    ref_name = "hostloop" if a.variant == "devloop" else "float32"
    ref, ref_l, t_ref = run("hostloop" if a.variant == "devloop" else "f32")
    var, var_l, t_var = run(a.variant)
    d = np.abs(ref - var)
    change = np.abs(ref - images)
    out = {"backbone": a.backbone, "weights": a.weights, "size": a.size, "batch": a.batch,
           "iterations": a.iterations, "reference": ref_name, "variant": a.variant,
           "max_abs_delta": float(d.max()), "mean_abs_delta": float(d.mean()),
           "mean_abs_dream_change": float(change.mean()),
           "loss_max_rel_delta": float(np.nanmax(np.abs(ref_l - var_l) / np.maximum(np.abs(ref_l), 1e-12))),
           "bitwise_equal": bool(np.array_equal(ref, var)),
           "seconds_ref_incl_compile": t_ref, "seconds_variant_incl_compile": t_var}
    print(json.dumps(out, indent=1))
    if a.json:
        bench.write_json(a.json, out)


if __name__ == "__main__":
    main()
