"""Regenerate results/: the quickstart and the offline seed study, compact copies, and their README.

    python scripts/make_results.py                 # both studies (about 10 min on 2 CPU cores)
    python scripts/make_results.py --only quickstart
    python scripts/make_results.py --inception /path/to/inception_v3_weights_tf_dim_ordering_tf_kernels.h5

Thin: runs the real ``dreamjax`` CLI, then ``dreamjax.bench.publish.publish`` copies what people look at
(grids as JPEG, a few iteration GIFs, the analysis) into results/<study>/ and writes results/README.md.
"""
from __future__ import annotations

import argparse
import sys

import dreamjax
from dreamjax.bench import publish as results

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(results.STUDIES), action="append")
    p.add_argument("--work", default="results_work", help="where the full sweeps are written (not committed)")
    p.add_argument("--out", default="results")
    p.add_argument("--inception", help="InceptionV3 weights (with top) to also run the seed study")
    a = p.parse_args(argv)
    studies = a.only or [s for s in results.STUDIES if s != "seed_study" or a.inception]
    for name in studies:
        results.run_and_publish(name, work=a.work, out=a.out, inception_weights=a.inception)
    results.write_readme(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
