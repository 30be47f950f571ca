"""Measure per-tap normalisers (1 / typical mean square) for a backbone's layer-weight presets.

    /work/venv/bin/python scripts/measure_tap_scales.py --backbone efficientnet_lite0 \
        --taps block7 block9 block10_dwpre block12        # ~20 s on 2 CPU cores

Each bundled painting (dreamjax/data/paintings/*.jpg) is resized to 224 px on its long
side (PIL bilinear), preprocessed by the backbone, and the mean square of every requested
tap is taken over H, W and C; the normaliser is 1 / (mean over paintings). With
``weights * scale`` as the effective weight, every tap contributes ~weight to the loss
of an undreamt painting, so no tap dominates by its scale alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

import dreamjax
from dreamjax import load_backbone

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

PAINTINGS = Path(__file__).resolve().parents[1] / "dreamjax" / "data" / "paintings"


def load_painting(path: Path, long_side: int = 224) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    s = long_side / max(img.size)
    return np.asarray(img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR))


def measure_tap_scales(backbone, images, taps) -> dict[str, np.ndarray]:
    """Mean square of each tap per image: {tap: array[len(images)]}."""
    out = {t: [] for t in taps}
    for img in images:
        acts = backbone.features(backbone.preprocess(img[None]), list(taps))
        for t in taps:
            out[t].append(float(jnp.mean(jnp.square(acts[t]))))
    return {t: np.array(v) for t, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--taps", nargs="+", default=["block7", "block9", "block10_dwpre", "block12"])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    backbone = load_backbone(args.backbone)
    images = [load_painting(p, args.size) for p in sorted(PAINTINGS.glob("*.jpg"))]
    ms = measure_tap_scales(backbone, images, args.taps)
    for t, v in ms.items():
        print(f"{t:>20}: mean square {v.mean():9.4f} (min {v.min():.4f}, max {v.max():.4f})"
              f" -> scale {1 / v.mean():.4g}")
    print("scale: [" + ", ".join(f"{1 / ms[t].mean():.3g}" for t in args.taps) + "]")


if __name__ == "__main__":
    main()
