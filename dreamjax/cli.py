"""Entry points (thin): parse, call the library."""
from __future__ import annotations

import argparse
import logging
import sys

import hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _dream(cfg):
    from dreamjax import sweep

    return sweep.task(cfg)


def main():
    """``dreamjax [overrides]`` / ``dreamjax -m [sweeps]``: see ``dreamjax --help``."""
    _dream()


def weights_main(argv=None):
    from dreamjax import weights_cli

    return weights_cli.main(argv)


def collect_main(argv=None):
    from dreamjax import sweep

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
    from dreamjax import analysis

    return analysis.main(argv)


if __name__ == "__main__":
    main()
