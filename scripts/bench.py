#!/usr/bin/env python
"""Engine benchmark: batched vs per-cell loop vs Keras 3 (JAX) vs TensorFlow (DLwP step).

  python scripts/bench.py --backbone inception_v3 --sizes 256 512 --batch 1 4 8 --repeats 3 \
      --keras [--tf-python /tmp/tfvenv/bin/python] [--rss] [--tiled 4096] --json results/bench/engine_cpu.json
  python scripts/bench.py --backbone inception_v3 --sizes 512 --batch 1 --variants onednn \
      --tf-python /tmp/tfvenv/bin/python --json results/bench/engine_cpu_onednn.json   # + TF mixed_bfloat16
  python scripts/bench.py --cold-start --tf-python /tmp/tfvenv/bin/python --repeats 3 \
      --json results/bench/cold_start_cpu.json
  python scripts/bench.py --cold-study --tf-python /tmp/tfvenv/bin/python --repeats 3 --kernels auto \
      --json results/bench/cold_study_cpu.json        # 4 paintings x the 4 weight sets, whole processes
  python scripts/bench.py --cold-experiment quickstart --repeats 3 --kernels auto \
      --json results/bench/cold_quickstart_cpu.json

Logic lives in dreamjax/bench/engine.py. Set XLA_FLAGS in the environment to study XLA options.
"""
import argparse
import os
import sys

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

os.environ.setdefault("KERAS_BACKEND", "jax")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="inception_v3")
    p.add_argument("--weights", default="random", help="random (default; speed only) or auto / a path")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image side(s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="cells per program")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="dream steps per timed call")
    p.add_argument("--keras", action="store_true", help="also time the Keras 3 + JAX DLwP loop")
    p.add_argument("--tf-python", default=None, help="python of a venv with tensorflow (DLwP notebook step)")
    p.add_argument("--rss", action="store_true", help="peak RSS per batched case in a fresh subprocess")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--matmul-precision", default=None, help="jax_default_matmul_precision")
    p.add_argument("--tiled", type=int, default=0, help="also dream one NxN image tiled, report peak RSS")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--variants", nargs="*", default=[],
                   help="extra batched modes: devloop hostloop bf16 onednn onednn_f32 (dreamjax.bench.VARIANTS)")
    p.add_argument("--no-tf-mixed", action="store_true",
                   help="with --tf-python: skip the TF mixed_bfloat16 anchor (timed beside TF float32 by default)")
    p.add_argument("--memory-only", action="store_true",
                   help="only peak RSS per (size, batch) and --tiled, each in a fresh process")
    p.add_argument("--cold-start", action="store_true",
                   help="whole processes: the dreamjax CLI (empty compilation cache, then warm) vs the DLwP "
                        "notebook script on TF (--tf-python), InceptionV3 random weights, one painting")
    p.add_argument("--cold-study", action="store_true",
                   help="--cold-start for the seed study: the paintings x the 4 weight sets, `dreamjax -m` vs the "
                        "notebook's cells re-run per (set, painting) in one TF process")
    p.add_argument("--cold-experiment", default=None, metavar="NAME",
                   help="--cold-start for `dreamjax +experiment=NAME` as it is (e.g. quickstart; no TF side)")
    p.add_argument("--painting", nargs="+", default=None,
                   help="--cold-start: the painting(s) (default: Starry Night; with --cold-study 4 bundled ones)")
    p.add_argument("--long-side", type=int, default=256, help="--cold-start: the dream's long side")
    p.add_argument("--kernels", nargs="+", default=["xla", "auto"],
                   help="--cold-start: dream.cpu_kernels values; K:noprefetch = K with DREAMJAX_PREFETCH=0")
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args(argv)

    import jax

    if a.matmul_precision:
        jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    from dreamjax.bench import engine as bench

    if a.cold_start or a.cold_study or a.cold_experiment:
        from pathlib import Path

        import dreamjax

        bundled = Path(dreamjax.__file__).parent / "data" / "paintings"
        # 3 shape buckets at long side 256 (3:2 landscape x2, 5:4 landscape, 5:4 portrait); not Hokusai:
        # a 16:9 bucket's first octave is 73 px, below InceptionV3's 75 (dreamjax refuses it, TF runs it).
        default = (["munch_the_scream.jpg", "kandinsky_composition_vii.jpg", "turner_shipwreck.jpg",
                    "van_gogh_starry_night.jpg"] if a.cold_study else ["van_gogh_starry_night.jpg"])
        paintings = a.painting or [str(bundled / n) for n in default]
        res = bench.run_cold_start_bench(a.tf_python, paintings, a.long_side, a.repeats, a.kernels,
                                         study=a.cold_study, experiment=a.cold_experiment)
        res["command"] = " ".join([os.path.basename(sys.executable), "scripts/bench.py", *(argv or sys.argv[1:])])
        print(bench.format_cold_table(res))
        if a.json:
            bench.write_json(a.json, res)
        return
    if a.memory_only:
        res = bench.run_memory_bench(a.backbone, a.weights, a.sizes, a.batch, a.tiled or None, a.tile_size)
        if a.json:
            bench.write_json(a.json, res)
        return
    res = bench.run_engine_bench(a.backbone, a.weights, a.sizes, a.batch, a.repeats, a.steps, keras=a.keras,
                                 tf_python=a.tf_python, rss=a.rss, compute_dtype=a.compute_dtype,
                                 tiled=a.tiled or None, tile_size=a.tile_size, variants=a.variants,
                                 tf_mixed=not a.no_tf_mixed)
    res["command"] = " ".join([os.path.basename(sys.executable), "scripts/bench.py", *(argv or sys.argv[1:])])
    res["matmul_precision"] = a.matmul_precision
    print(bench.format_engine_table(res))
    if a.json:
        bench.write_json(a.json, res)


if __name__ == "__main__":
    main()
