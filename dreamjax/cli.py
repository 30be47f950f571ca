"""Entry points (thin): parse, call the library."""
from __future__ import annotations

import argparse
import logging
import sys

import hydra

import dreamjax
from dreamjax import weights_cli
from dreamjax.outputs import analysis
from dreamjax.sweep import jobs
from dreamjax.sweep import jobs as sweep


@hydra.main(version_base="1.3", config_path=dreamjax.config_dir(), config_name="config")
def _dream(cfg):
    return sweep.task(cfg)


def main():
    """``dreamjax [overrides]`` / ``dreamjax -m [sweeps]``: see ``dreamjax --help``."""
    dreamjax.configure_cpu()
    _dream()


def weights_main(argv=None):
    dreamjax.configure_cpu()

    return weights_cli.main(argv)


def collect_main(argv=None):
    p = argparse.ArgumentParser(prog="dreamjax-collect", description="Write a sweep's manifest, summary, "
                                "grids and gallery from its cells' records (after SLURM tasks finish, say).")
    p.add_argument("sweep_dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = sweep.collect(a.sweep_dir)
    except FileNotFoundError as e:
        print(f"dreamjax-collect: {e}", file=sys.stderr)
        return 2
    c = out["manifest"]["counts"]
    print(f"{a.sweep_dir}: {c['done']} done, {c['failed']} failed -> index.html, manifest.json, summary.csv")
    return 0


def analyze_main(argv=None):
    dreamjax.configure_cpu()

    return analysis.main(argv, collect=lambda d: jobs.collect(d, analyze=False))


if __name__ == "__main__":
    main()
