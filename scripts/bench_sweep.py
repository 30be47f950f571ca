#!/usr/bin/env python
"""Sweep benchmark: wall time of one Hydra multirun per launcher, cold and warm compilation cache.

  python scripts/bench_sweep.py --json results/bench/sweep_cpu.json -- \
      +experiment=seed_study_offline data=quick data.image_size=128 dream.iterations=5

Everything after ``--`` is passed to ``dreamjax -m``. Launchers: dreamjax (batched, default),
basic (one job after another), joblib (n_jobs=2). Cold = a fresh DREAMJAX_JAX_CACHE directory,
warm = the same directory again. Logic lives in dreamjax/bench/engine.py.
"""
import argparse
import sys

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launchers", nargs="+", default=["dreamjax", "basic", "joblib"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where sweeps and caches go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the sweep folders")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not overrides:
        overrides = ["+experiment=seed_study_offline", "data=quick", "data.image_size=128", "dream.iterations=5"]

    from dreamjax.bench import engine as bench

    res = bench.run_sweep_bench(overrides, a.launchers, a.repeats, a.workdir, a.keep)
    print(bench.format_sweep_table(res))
    if a.json:
        bench.write_json(a.json, res)


if __name__ == "__main__":
    main()
