#!/usr/bin/env python
"""Where a dream step's time goes (InceptionV3, DLwP taps): forward only, forward+backward
(the gradient), the whole engine step (gradient + roll + per-cell normalise + bookkeeping), and
the Keras 3 + JAX step, timed interleaved with repeats.

  python scripts/bench_breakdown.py --size 256 --batch 1 --repeats 5 [--json results/bench/breakdown_cpu.json]
"""
import argparse
import os
import statistics
import time

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-keras", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dreamjax import load_backbone
    from dreamjax.bench import engine as bench
    from dreamjax.engine.dream import make_grad_fn, tap_losses

    bb = load_backbone("inception_v3", weights="random")
    cfg = bench.dlwp_config(bb)
    ff = bb.feature_fn(cfg.taps, straight_through=True)
    B, S = a.batch, a.size
    w = jnp.tile(jnp.asarray(bench.DLWP_WEIGHTS), (B, 1))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (B, S, S, 3)).astype(np.float32))
    v = bb.variables
    fwd = jax.jit(lambda v, x: jnp.sum(tap_losses(ff(v, x), cfg.taps, cfg) * w))
    grad = jax.jit(make_grad_fn(ff, cfg))
    case = bench.EngineCase(bb, S, B, 1)
    fns = {"forward": lambda: fwd(v, x), "forward+backward": lambda: grad(v, x, w),
           "engine_step": lambda: case.run(case.fresh_state())}
    flops = {"forward": bench._first(fwd.lower(v, x).cost_analysis())["flops"],
             "forward+backward": bench._first(grad.lower(v, x, w).cost_analysis())["flops"],
             "engine_step": case.flops_per_step}
    if not a.no_keras:
        k = bench.KerasCase(S, 1)
        xk = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (B, S, S, 3)).astype(np.float32))
        fns["keras_step"] = lambda: k._step(xk)
        flops["keras_step"] = bench._first(k._step.lower(xk).cost_analysis())["flops"]
    for f in fns.values():
        jax.block_until_ready(f())
    times = {n: [] for n in fns}
    for _ in range(a.repeats):
        for n, f in fns.items():
            if n == "engine_step":
                st = case.fresh_state()
                jax.block_until_ready(st)
                t0 = time.perf_counter()
                case.run(st)
                times[n].append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                jax.block_until_ready(f())
                times[n].append(time.perf_counter() - t0)
    peak = bench.matmul_peak()["gflops_best"]
    out = {"size": S, "batch": B, "matmul_peak_gflops": peak, "load": os.getloadavg()[0], "parts": {}}
    print(f"{S}x{S} B={B}, f32 matmul peak {peak:.0f} GFLOP/s, load {out['load']:.1f}")
    for n, ts in times.items():
        med = statistics.median(ts)
        out["parts"][n] = {"s_min": min(ts), "s_median": med, "s_max": max(ts), "gflop": flops[n] / 1e9,
                           "gflops_median": flops[n] / 1e9 / med}
        print(f"  {n:<17} s min/med/max {min(ts):.3f}/{med:.3f}/{max(ts):.3f}  {flops[n] / 1e9:6.1f} GFLOP  "
              f"{flops[n] / 1e9 / med:6.1f} GFLOP/s ({100 * flops[n] / 1e9 / med / peak:.0f}% of peak)")
    if a.json:
        bench.write_json(a.json, out)


if __name__ == "__main__":
    main()
