#!/usr/bin/env python
"""End-to-end dream throughput, compile included (what a user sees): DLwP settings, 3 octaves x
N steps, square images, InceptionV3 (random weights), B cells in one dream() call, fresh Dreamer
(so every octave program compiles). Cell-steps/s = B * octaves * N / wall seconds.

  python scripts/bench_full_dream.py --cases 256x8 512x1 --iterations 30 [--json results/bench/full_dream_cpu.json]
"""
import argparse
import os
import time

import numpy as np

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=["256x8", "512x1"], help="SIZExBATCH")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from dreamjax import load_backbone
    from dreamjax.bench import engine as bench
    from dreamjax.engine.dream import CellParams, OctavePlan, dream

    bb = load_backbone("inception_v3", weights="random")
    rows = []
    for case in a.cases:
        size, b = (int(v) for v in case.split("x"))
        images = np.random.default_rng(0).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
        params = CellParams.make(np.tile(np.asarray(bench.DLWP_WEIGHTS, np.float32), (b, 1)), 20.0,
                                 iterations=a.iterations, seed=np.arange(b))
        with bench.CompileCounter() as cc:
            t0 = time.perf_counter()
            run = dream(bb, images, params, bench.dlwp_config(bb), OctavePlan())
            wall = time.perf_counter() - t0
        steps = b * 3 * a.iterations
        row = {"size": size, "batch": b, "iterations": a.iterations, "octaves": 3, "wall_seconds": wall,
               "compile_seconds": cc.seconds, "compilations": cc.count, "cell_steps_per_s": steps / wall,
               "cell_steps_per_s_excl_compile": steps / (wall - cc.seconds), "load": os.getloadavg()[0],
               "programs": run.dreamer.programs()}
        rows.append(row)
        print(f"{size}x{size} B={b}: {wall:.1f} s ({cc.seconds:.1f} s compiling, {cc.count} compilations), "
              f"{row['cell_steps_per_s']:.2f} cell-steps/s incl. compile, "
              f"{row['cell_steps_per_s_excl_compile']:.2f} excl. (load {row['load']:.1f})", flush=True)
    if a.json:
        bench.write_json(a.json, {"kind": "full_dream", "machine": bench.machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
