"""EfficientNet-Lite0 port: real weights classify, every array is used, taps, early stop, dream path."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from PIL import Image

from dreamjax import available_backbones, load_backbone
from dreamjax.models import efficientnet_lite as lite
from dreamjax.weights.torch_pickle import load_torch_file

DATA = Path(__file__).parent / "data"
LAYERS = Path(__file__).resolve().parents[1] / "conf" / "layers"

# Golden tap shapes (H, W, C) at 224x224, and the strides they imply.
GOLDEN_224 = {
    "stem": (112, 112, 32), "block0": (112, 112, 16), "block1": (56, 56, 24), "block2": (56, 56, 24),
    "block3": (28, 28, 40), "block4": (28, 28, 40), "block5": (14, 14, 80), "block6": (14, 14, 80),
    "block7": (14, 14, 80), "block8": (14, 14, 112), "block9": (14, 14, 112), "block10": (14, 14, 112),
    "block11": (7, 7, 192), "block12": (7, 7, 192), "block13": (7, 7, 192), "block14": (7, 7, 192),
    "block15": (7, 7, 320), "head": (7, 7, 1280),
    "block0_dwpre": (112, 112, 32), "block1_expand_pre": (112, 112, 96), "block1_dwpre": (56, 56, 96),
    "block10_expand_pre": (14, 14, 672), "block10_dwpre": (14, 14, 672), "block11_dwpre": (7, 7, 672),
    "block15_dwpre": (7, 7, 1152),
}
NUM_PARAMS = 4_652_008  # learned: conv kernels, BN scale/bias, fc kernel/bias


@pytest.fixture(scope="session")
def lite0():
    return load_backbone("efficientnet_lite0", include_top=True)


@pytest.fixture(scope="session")
def state():
    return load_torch_file(lite.package_weights_path())


def _photo(name):
    import skimage.data

    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((224, 224), Image.BILINEAR))


def _size(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_classifies_real_photos(lite0):
    x = lite0.preprocess(np.stack([_photo("chelsea"), _photo("coffee")]))
    probs = np.asarray(jax.nn.softmax(lite0.logits(x)))
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # chelsea is a cat (285 Egyptian cat, p~0.79)
    assert top5[1, 0] in (967, 968), top5[1]  # coffee: 967 espresso, p~0.90


def test_logits_match_torch(lite0):
    """tests/data/lite0_chelsea_torch_logits.npy: an independent torch 2.13 forward (F.conv2d with
    TF-SAME padding, F.batch_norm eps 1e-3) on ``torch.load``'s state dict, same chelsea input.
    Every tap agreed to <5e-6 relative when it was made; logits to 5e-6 absolute."""
    ref = np.load(DATA / "lite0_chelsea_torch_logits.npy")
    got = np.asarray(lite0.logits(lite0.preprocess(_photo("chelsea")[None])))[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_every_array_used(lite0, state):
    assert "efficientnet_lite0" in available_backbones()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(state) - len(counters) == 247 and len(counters) == 49
    assert lite0.param_count() == NUM_PARAMS
    is_stat = [k.endswith(("running_mean", "running_var")) for k in state]
    learned = sum(v.size for (k, v), s in zip(state.items(), is_stat) if not s and k not in counters)
    stats = sum(v.size for v, s in zip(state.values(), is_stat) if s)
    assert learned == NUM_PARAMS and _size(lite0.variables["batch_stats"]) == stats
    n_leaves = len(jax.tree_util.tree_leaves(lite0.variables))
    assert n_leaves == 247
    # Spot-check transposes: conv [outC, inC, kH, kW] -> [kH, kW, inC, outC], depthwise -> [kH, kW, 1, C].
    v = lite0.variables["params"]
    np.testing.assert_array_equal(v["stem"]["conv"]["kernel"], state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["block10"]["depthwise"]["conv"]["kernel"][:, :, 0, 7],
                                  state["_blocks.10._depthwise_conv.weight"][7, 0])
    np.testing.assert_array_equal(v["fc"]["kernel"], state["_fc.weight"].T)


def test_converter_is_loud(state):
    bad = dict(state)
    del bad["_blocks.3._bn1.running_var"]
    bad["_blocks.3._extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing \['_blocks.3._bn1.running_var'\], "
                                         r"unexpected \['_blocks.3._extra.weight'\]"):
        lite.convert_state_dict(bad)
    bad = dict(state)
    bad["_blocks.5._project_conv.weight"] = bad["_blocks.5._project_conv.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"shape mismatch: _blocks.5._project_conv.weight"):
        lite.convert_state_dict(bad)
    assert "fc" not in lite.convert_state_dict(state, include_top=False)["params"]


def test_tap_shapes_and_strides(lite0):
    assert lite0.tap_shapes(224, 224, list(GOLDEN_224)) == GOLDEN_224
    assert set(lite0.taps) >= set(GOLDEN_224) and len(lite0.taps) == 49
    for tap, (h, _, _) in GOLDEN_224.items():
        assert lite0.tap_strides[tap] == 224 // h, tap
    with pytest.raises(ValueError, match="at least 32x32"):
        lite0.tap_shapes(31, 64)


def test_forward_stops_early(lite0):
    x = jnp.zeros((1, 64, 64, 3))
    # Variables of the first three blocks only: deeper layers would raise if they were touched.
    shallow = {c: {k: v for k, v in col.items() if k in ("stem", "block0", "block1", "block2")}
               for c, col in lite0.variables.items()}
    logits, out = lite0.module.apply(shallow, x, taps=["block2", "stem"])
    assert logits is None and list(out) == ["block2", "stem"]
    # A pre-activation tap stops inside its block: block10's projection is never needed.
    partial = {c: {k: v for k, v in col.items()} for c, col in lite0.variables.items()}
    for c in partial:
        partial[c]["block10"] = {k: v for k, v in partial[c]["block10"].items() if k != "project"}
    _, out = jax.eval_shape(lambda v: lite0.module.apply(v, x, taps=["block10_dwpre"]), partial)
    assert list(out) == ["block10_dwpre"]

    def n_eqns(taps):
        return len(jax.make_jaxpr(lambda v: lite0.module.apply(v, x, taps=taps))(lite0.variables).eqns)

    assert n_eqns(["block2"]) < n_eqns(["block10_dwpre"]) < n_eqns(["block10"]) < n_eqns(["block15"])


def test_straight_through_relu6(lite0):
    xs = jnp.array([-1.0, 3.0, 7.0])
    np.testing.assert_array_equal(lite.relu6_straight_through(xs), lite.relu6(xs))
    np.testing.assert_array_equal(jax.grad(lambda x: lite.relu6_straight_through(x).sum())(xs), [0, 1, 1])
    np.testing.assert_array_equal(jax.grad(lambda x: lite.relu6(x).sum())(xs), [0, 1, 0])
    # Through the backbone: a bright input saturates stem units at 6; only the dream path passes gradient there.
    x = 40.0 * jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))
    grads = {}
    for dream in (False, True):
        f = lite0.feature_fn(["stem"], straight_through=dream)

        def saturated_sum(x, f=f):
            a = f(lite0.variables, x)["stem"]
            return jnp.sum(jnp.where(jax.lax.stop_gradient(a) >= 6, a, 0))

        grads[dream] = jax.grad(saturated_sum)(x)
    assert float(jnp.abs(grads[False]).sum()) == 0.0
    assert float(jnp.abs(grads[True]).sum()) > 0.0


def test_weights_options(lite0, tmp_path):
    import hashlib

    assert lite0.weights_id == hashlib.sha256(lite.package_weights_path().read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "nope.pth")
    spec = lite0.spec
    assert spec.value_range == ((0 - 127) / 128, (255 - 127) / 128)
    np.testing.assert_allclose(spec.deprocess(spec.preprocess(np.array([0.0, 127.0, 255.0]))), [0, 127, 255])


def test_random_weights_match_tree(lite0):
    variables = jax.eval_shape(lambda: lite._load("random", True)[0])  # traced only: init costs ~10 s eagerly
    same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, variables, lite0.variables)
    assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize("path", sorted(LAYERS.glob("lite_*.yaml")), ids=lambda p: p.stem)
def test_layer_presets(path):
    cfg = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# ")
    assert cfg["name"] == path.stem and cfg["backbone"] == "efficientnet_lite0"
    assert len(cfg["taps"]) == len(cfg["weights"]) == len(cfg["scale"]) == 4
    assert all(t in lite.TAP_STRIDES for t in cfg["taps"])
    depth = [lite.TAPS.index(t) for t in cfg["taps"]]
    assert depth == sorted(depth)


def test_presets_present():
    names = {p.stem for p in LAYERS.glob("lite_*.yaml")}
    assert names >= {"lite_balanced", "lite_set1", "lite_set2", "lite_set3", "lite_set4"}
