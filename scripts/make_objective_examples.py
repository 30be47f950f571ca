"""One picture per objective kind, all cells of ONE compiled program (they differ only in per-cell
weights): layer, channel, neuron, direction, class, guide, TV-regularised, blurred; plus the layer
dream with original_colors. Writes results/objectives/kinds.jpg.

    python scripts/make_objective_examples.py [--size 192] [--iterations 20]

About 5 minutes on 2 CPU cores (EfficientNet-Lite0 with its top: the class term needs the logits).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--painting", default="van_gogh_starry_night")
    ap.add_argument("--guide", default="hokusai_great_wave")
    ap.add_argument("--out", default=str(REPO / "results" / "objectives" / "kinds.jpg"))
    a = ap.parse_args(argv)

    import dreamjax

    dreamjax.configure_cpu()
    import jax.numpy as jnp

    from dreamjax import files, load_backbone
    from dreamjax.engine import dream
    from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan
    from dreamjax.engine.objectives import Terms
    from dreamjax.engine.transforms import Transforms
    from dreamjax.outputs import images, report
    from dreamjax.sweep import units

    bb = load_backbone("efficientnet_lite0", include_top=True)
    paint = images.load_painting(files.BUNDLED_PAINTINGS / f"{a.painting}.jpg").pixels
    guide = images.load_painting(files.BUNDLED_PAINTINGS / f"{a.guide}.jpg").pixels
    s = a.size
    px = images.resize_uint8(paint, (s, s))
    x = np.asarray(bb.preprocess(px[None]))
    tap, ch = "block9", 97
    shapes = bb.tap_shapes(s, s, [tap, "block12"])
    h, w, c = shapes[tap]
    g = np.asarray(bb.features(bb.preprocess(images.resize_uint8(guide, (s, s))[None]), (tap,))[tap])
    kinds = ["layer", f"channel {tap}:{ch}", f"neuron {tap}:{ch} centre", f"direction {tap} (random)",
             "class goldfish", f"guide {a.guide}", "layer + TV", "layer + blur"]
    n = len(kinds)
    terms = Terms(channel_taps=(tap,), reduction="mean", mask_shape=(h, w), direction_taps=(tap,),
                  class_logits=True, guide_tap=tap, guide_size=h * w, regularisers=("tv",), blur_every=4)
    v = terms.zeros(n, {tap: c}, 1000)
    layer = np.zeros((n, 2), np.float32)
    layer[[0, 6, 7], 1] = 1.0 / 28  # block12, as the lite sets (1 / mean square)
    v[f"channel:{tap}"][1, ch] = 1.0
    v[f"channel:{tap}"][2, ch] = 1.0
    v[f"mask:{tap}"][2] = 0.0
    v[f"mask:{tap}"][2, h // 2, w // 2] = 1.0
    v[f"direction:{tap}"][3] = np.random.default_rng(0).normal(size=c) / np.sqrt(c)
    v["class"][4, units.class_index("goldfish")] = 1.0
    v["guide"][5] = 1.0
    v["guide_features"][5] = g.reshape(-1, c)
    v["tv"][6] = 50.0
    v["blur"][7] = 0.5
    params = CellParams.make(layer, 0.015, jitter=16, iterations=a.iterations, seed=list(range(n)), terms=v)
    cfg = DreamConfig(taps=(tap, "block12"), norm="mean_abs", border=0, clip=True, value_range=bb.value_range,
                      terms=terms, micro_batch=1, transforms=Transforms(scale=(0.95, 1.05), rotate=5))
    run = dream.dream(bb, np.repeat(x, n, axis=0), params, cfg, OctavePlan.keras(3, 1.4, "dlwp"))
    out = images.to_uint8(np.asarray(bb.deprocess(run.final)))
    top1 = np.asarray(jnp.argmax(bb.logits(jnp.asarray(run.final)), axis=1))
    tiles = [("painting", px)] + list(zip(kinds, out)) + [("layer, original_colors",
                                                          images.original_colors(out[0], px))]
    rows = [("", tiles[:5]), ("", tiles[5:])]
    sheet = report.contact_sheet(rows, cell_height=min(s, 192), title="one program, one cell per objective kind")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    images.save_jpeg(a.out, np.asarray(sheet), quality=80)
    print(f"wrote {a.out}; the class cell's top-1 is {units.class_names()[int(top1[4])]}")


if __name__ == "__main__":
    main()
