"""Benchmark: a channel atlas batched (one program, all channels) vs one channel at a time.

    python scripts/bench_atlas.py [--channels 64] [--size 128] [--iterations 8] [--reps 3]

Each measurement is a fresh process (so "cold" really starts with an empty persistent compilation
cache and "warm" reuses the one the cold run filled):

* batched: one Dreamer, all channels as cells of one batch (one-hot channel weights);
* per-channel: the same engine, one ``dream.dream`` call per channel (batch 1), as separate runs
  of one channel each would do (each builds its own programs; with a warm cache they are loaded).

Writes ``results/bench/atlas_cpu.json`` and prints a table with min/median/max of the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(mode: str, channels: int, size: int, iterations: int):
    import dreamjax

    dreamjax.configure_cpu()
    import jax
    import numpy as np

    jax.config.update("jax_compilation_cache_dir", os.environ["BENCH_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from dreamjax import load_backbone
    from dreamjax.engine import dream
    from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan
    from dreamjax.engine.objectives import Terms
    from dreamjax.engine.transforms import Transforms
    from dreamjax.sweep.executor import auto_micro_batch

    tap = "block9"
    bb = load_backbone("efficientnet_lite0")
    c = bb.tap_shapes(size, size, [tap])[tap][-1]
    terms = Terms(channel_taps=(tap,), reduction="mean")
    cfg = DreamConfig(taps=(tap,), norm="mean_abs", optimizer="adam", border=0, clip=True,
                      value_range=bb.value_range, terms=terms, param="fourier_decorrelated",
                      micro_batch=auto_micro_batch(),
                      transforms=Transforms(pad=4, jitter=4, scale=(0.95, 1.05), rotate=5))
    plan = OctavePlan((0,), 1.4, "none")
    rng = np.random.default_rng(1)
    noise = np.asarray(bb.preprocess(127.5 + rng.uniform(-16, 16, (channels, size, size, 3)).astype(np.float32)))
    values = terms.zeros(channels, {tap: c}, 1000)
    values[f"channel:{tap}"][np.arange(channels), np.arange(channels) % c] = 1.0
    params = CellParams.make(np.zeros((channels, 1)), 0.05, iterations=iterations, seed=list(range(channels)),
                             terms=values)
    bb.dream_variables  # noqa: B018 (made once, outside the timing: both modes share it)
    t = time.perf_counter()
    if mode == "batched":
        out = dream.dream(bb, noise, params, cfg, plan).final
    else:
        out = np.concatenate([dream.dream(bb, noise[i:i + 1], params.take(slice(i, i + 1)), cfg, plan).final
                              for i in range(channels)])
    seconds = time.perf_counter() - t
    assert np.isfinite(out).all()
    print(json.dumps({"seconds": seconds, "micro_batch": cfg.micro_batch}))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "atlas_cpu.json"))
    ap.add_argument("--child", default=None)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, a.channels, a.size, a.iterations)
    runs: dict[str, list[float]] = {k: [] for k in ("batched_cold", "batched_warm", "per_channel_cold",
                                                      "per_channel_warm")}
    loads = []
    micro = None
    for rep in range(a.reps):
        for mode in ("batched", "per_channel"):
            with tempfile.TemporaryDirectory(prefix="bench-atlas-cache-") as cache:
                for temp in ("cold", "warm"):
                    loads.append(os.getloadavg()[0])
                    env = dict(os.environ, BENCH_CACHE=cache, PYTHONPATH=str(REPO))
                    p = subprocess.run([sys.executable, __file__, "--child", mode, "--channels", str(a.channels),
                                        "--size", str(a.size), "--iterations", str(a.iterations)],
                                       capture_output=True, text=True, env=env, check=True)
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    micro = r["micro_batch"]
                    runs[f"{mode}_{temp}"].append(r["seconds"])
                    print(f"rep {rep} {mode:<11} {temp}: {r['seconds']:.1f} s", flush=True)
    ratio = {t: [pc / b for pc, b in zip(runs[f"per_channel_{t}"], runs[f"batched_{t}"])] for t in ("cold", "warm")}
    stats = {t: {"min": min(v), "median": statistics.median(v), "max": max(v)} for t, v in ratio.items()}
    result = {"what": f"{a.channels}-channel atlas of efficientnet_lite0 block9 at {a.size} px from noise, "
                      f"{a.iterations} steps, fourier_decorrelated + transforms: per-channel loop time / batched time",
              "channels": a.channels, "size": a.size, "iterations": a.iterations, "reps": a.reps,
              "micro_batch": micro, "seconds": runs, "speedup": stats,
              "load_average_1min_during": {"min": min(loads), "max": max(loads)}, "cpus": os.cpu_count()}
    from dreamjax import files

    files.write_json(a.out, result)
    print(f"\n{'cache':<6} {'batched s (median)':>19} {'per-channel s (median)':>23} {'speedup min/median/max':>24}")
    for t in ("cold", "warm"):
        s = stats[t]
        b, pc = statistics.median(runs[f"batched_{t}"]), statistics.median(runs[f"per_channel_{t}"])
        print(f"{t:<6} {b:>19.1f} {pc:>23.1f} {s['min']:>8.2f} / {s['median']:.2f} / {s['max']:.2f}")
    print(f"load average during: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs; wrote {a.out}")


if __name__ == "__main__":
    main()
