#!/usr/bin/env python
"""Moving-dream benchmark: zoom-loop frames/s at 256 and 512 px, four chains batched vs one at a
time, and the video overhead (decode + flow + encode) as a share of a dream frame.

  PYTHONPATH=. python scripts/bench_motion.py --json results/bench/motion_cpu.json \
      --table results/bench/motion_cpu.md

About 6 min on 2 CPU cores (EfficientNet-Lite0, 1 octave x 5 steps a frame, 4 frames per chain).
Logic in dreamjax/bench/motion.py.
"""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--json", default="results/bench/motion_cpu.json")
    p.add_argument("--table", default="results/bench/motion_cpu.md")
    a = p.parse_args(argv)
    import logging

    import dreamjax

    dreamjax.configure_cpu()
    logging.basicConfig(level=logging.WARNING)
    from dreamjax.bench import motion
    from dreamjax.sweep.executor import setup_jax_cache

    setup_jax_cache()
    res = motion.run(tuple(a.sizes), frames=a.frames, iterations=a.iterations)
    print(motion.format_table(res))
    motion.write(res, a.json, a.table)


if __name__ == "__main__":
    main()
