"""Your own backbone in thirty lines: register a Flax module, list its taps, dream with it.

    python docs/examples/custom_backbone.py                       # a 2-octave dream at 64 px, ~10 s
    PYTHONPATH=docs/examples dreamjax model.module=custom_backbone model.name=mini_cnn \
        layers.backbone=mini_cnn 'layers.taps=[c2,c3]' 'layers.weights=[1,2]' layers.scale=null
    PYTHONPATH=docs/examples dreamjax-weights info --module custom_backbone --model mini_cnn --size 64
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.models import load_backbone, register_backbone


class MiniCNN(nn.Module):  # any Flax module: (logits | None, {tap: activation})
    @nn.compact
    def __call__(self, x, taps=None, train=False):
        out = {}
        for i, width in enumerate((8, 16, 32), 1):
            x = out[f"c{i}"] = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
        return None, out


def load(weights, include_top):  # "auto"/"random"/a path -> variables (here: a seeded init)
    return MiniCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


register_backbone("mini_cnn", build=MiniCNN, taps=("c1", "c2", "c3"), load=load, min_size=16)

if __name__ == "__main__":
    from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan, dream

    bb = load_backbone("mini_cnn")
    print({t: (shape, bb.tap_strides[t]) for t, shape in bb.tap_shapes(64, 64).items()})
    x = bb.preprocess(np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)))
    params = CellParams.make([[1.0, 2.0]], step_size=0.02, iterations=3)
    run = dream(bb, x, params, DreamConfig(taps=("c2", "c3"), norm="mean_abs", border=0), OctavePlan.keras(2, 1.4))
    print("dreamed", run.final.shape, "changed by", float(np.abs(np.asarray(run.final) - np.asarray(x)).mean()))
