#!/usr/bin/env python
"""Does bfloat16 through oneDNN change a dream more than a change of seed does?

Full dreams of the ``lite`` and ``dlwp`` presets on the real EfficientNet-Lite0 weights (the
offline backbone), bundled paintings, layers ``lite_balanced``. For each preset:

* ``f32``        XLA float32 (today's dream), seed 0 — the reference;
* ``f32_seed1``  the same, seed 1 (the jitter's random rolls: what a change of seed does;
                 ``dlwp`` has no jitter, so its two seeds are the same dream, and the
                 rounding-level reference is ``onednn_f32`` below);
* ``onednn_f32`` oneDNN float32 convolutions, seed 0 (same maths, another summation order);
* ``onednn``     oneDNN bfloat16 convolutions (f32 accumulation), seed 0.

Each is compared to the reference: mean and max |delta| of the final dreams in grey levels
(0-255), 1 - cosine of deep features (the tapped layers of the final dreams, f32 XLA), and the
reference's own change from the painting (mean |dream - painting|) for scale.

  python scripts/bench_bf16_quality.py --size 320 --json results/bench/bf16_quality_lite0.json
  (about 10 min on 2 busy CPU cores, compiles included)
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

PRESETS = {  # conf/dream/{lite,dlwp}.yaml, as the engine gets them
    "lite": dict(cfg=dict(norm="mean_abs", objective="mean_square", border=0, clip=True),
                 plan=(4, 1.4, "dlwp"), step_size=0.015, iterations=40, jitter=32, max_loss=None),
    "dlwp": dict(cfg=dict(norm="l2", objective="mean_square", border=2, clip=False),
                 plan=(3, 1.4, "dlwp"), step_size=20.0, iterations=30, jitter=0, max_loss=15.0),
}
LAYERS = {"taps": ("block7", "block9", "block10_dwpre", "block12"),  # conf/layers/lite_balanced.yaml
          "weights": (0.5, 1.0, 1.0, 0.5), "scale": (0.0253, 0.0317, 0.348, 0.0477)}
PAINTINGS = ("hokusai_great_wave.jpg", "kandinsky_composition_vii.jpg")


def load_paintings(size: int) -> np.ndarray:
    from pathlib import Path

    from PIL import Image

    folder = Path(dreamjax.__file__).parent / "data" / "paintings"
    return np.stack([np.asarray(Image.open(folder / p).convert("RGB").resize((size, size), Image.BICUBIC),
                                np.float32) for p in PAINTINGS])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=320,
                   help="square side (dlwp needs >= 320 on Lite0: border 2 at stride 32)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax

    from dreamjax import load_backbone
    from dreamjax.bench import engine as bench
    from dreamjax.engine.dream import CellParams, DreamConfig, Dreamer, DreamRun, OctavePlan
    from dreamjax.models import kernels

    bb = load_backbone("efficientnet_lite0", weights="auto")
    pixels = load_paintings(a.size)
    originals = np.asarray(bb.preprocess(pixels))
    taps = LAYERS["taps"]
    lw = np.asarray(LAYERS["weights"], np.float32) * np.asarray(LAYERS["scale"], np.float32)
    feats = jax.jit(lambda v, x: bb.feature_fn(taps, straight_through=False)(v, x))

    def grey(x):
        return np.clip(np.asarray(bb.deprocess(x)), 0, 255)

    out = {"backbone": "efficientnet_lite0", "weights_id": bb.weights_id, "size": a.size,
           "paintings": list(PAINTINGS), "layers": {k: list(v) for k, v in LAYERS.items()},
           "onednn": kernels.status().reason, "machine": bench.machine_info(), "presets": {}}
    for name in a.presets:
        pr = PRESETS[name]
        runs = {}
        for label, kern, seed in [("f32", "xla", 0), ("f32_seed1", "xla", 1), ("onednn_f32", "onednn_f32", 0),
                                  ("onednn", "onednn", 0)]:
            cfg = DreamConfig(taps=taps, value_range=tuple(bb.value_range), cpu_kernels=kern, micro_batch=1,
                              **pr["cfg"])
            d = Dreamer(bb, cfg, OctavePlan.keras(*pr["plan"]), pr["iterations"])
            params = CellParams.make(np.tile(lw, (len(PAINTINGS), 1)), pr["step_size"], pr["max_loss"],
                                     pr["jitter"], pr["iterations"], seed=np.full(len(PAINTINGS), seed))
            t0 = time.perf_counter()
            final = DreamRun(d, originals, params).run().final
            runs[label] = (np.asarray(final), time.perf_counter() - t0)
            print(f"{name} {label}: {runs[label][1]:.1f} s", file=sys.stderr, flush=True)
        ref, _ = runs["f32"]
        fref = feats(bb.variables, ref)
        res = {"dream_change_mean_grey": float(np.abs(grey(ref) - pixels).mean()),
               "seconds_incl_compile": {k: v[1] for k, v in runs.items()}}
        for label, (img, _) in runs.items():
            if label == "f32":
                continue
            f = feats(bb.variables, img)
            cos = {}
            for t in taps:
                u = np.asarray(f[t], np.float64).reshape(len(PAINTINGS), -1)
                v = np.asarray(fref[t], np.float64).reshape(len(PAINTINGS), -1)
                c = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
                cos[t] = float((1 - c).mean())
            dg = np.abs(grey(img) - grey(ref))
            res[label] = {"mean_abs_delta_grey": float(dg.mean()), "max_abs_delta_grey": float(dg.max()),
                          "per_painting_mean_abs_delta_grey": dg.reshape(len(PAINTINGS), -1).mean(1).tolist(),
                          "one_minus_cosine_features": cos}
        out["presets"][name] = res
        print(json.dumps({name: res}, indent=1), flush=True)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    if a.json:
        bench.write_json(a.json, out)


if __name__ == "__main__":
    main()
