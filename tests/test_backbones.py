"""Every built-in backbone: golden parameter counts; configs that bring their own layer sets and
presets; your own backbone registered from user code (the docs example runs a tiny dream)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from dreamjax.models import (
    BUILTIN_BACKBONES,
    available_backbones,
    get_spec,
    load_backbone,
    register_backbone,
)
from tests.helpers import PAINTINGS, REPO

CONF = REPO / "conf"
EXAMPLE = REPO / "docs" / "examples" / "custom_backbone.py"

# (learned parameters, + BatchNorm statistics) per (backbone, include_top); Keras' count_params() for the
# Keras ports, the checkpoints' own sizes for the Lite ones.
PARAM_COUNTS = {
    ("inception_v3", False): (21_768_352, 21_802_784), ("inception_v3", True): (23_817_352, 23_851_784),
    ("resnet50", False): (23_534_592, 23_587_712), ("resnet50", True): (25_583_592, 25_636_712),
    ("vgg16", False): (14_714_688, 14_714_688), ("vgg16", True): (138_357_544, 138_357_544),
    ("efficientnet_lite0", False): (3_371_008, 3_413_024), ("efficientnet_lite0", True): (4_652_008, 4_694_024),
    ("efficientnet_lite2", False): (4_811_072, 4_869_168), ("efficientnet_lite2", True): (6_092_072, 6_150_168),
    ("tiny", False): (8_424, 8_568), ("tiny", True): (8_754, 8_898),
}


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_every_builtin_backbone_has_a_golden_row():
    assert {"resnet50", "vgg16", "efficientnet_lite2"} <= set(BUILTIN_BACKBONES)
    assert {(n, t) for n in BUILTIN_BACKBONES for t in (False, True)} == set(PARAM_COUNTS)


@pytest.mark.parametrize("name,top", sorted(PARAM_COUNTS), ids=lambda v: str(v))
def test_param_counts(name, top):
    spec = get_spec(name)
    size = 224 if name == "vgg16" and top else max(spec.min_size, 75)
    v = jax.eval_shape(spec.build(include_top=top).init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    learned, total = PARAM_COUNTS[name, top]
    assert _count(v["params"]) == learned
    assert _count(v) == total


@pytest.mark.parametrize("name", BUILTIN_BACKBONES)
def test_tap_strides_agree_with_shapes(name):
    spec = get_spec(name)
    module = spec.build()
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    v = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(lambda v, x: module.apply(v, x, taps=spec.taps)[1], v, x)
    for t in spec.taps:  # VALID convolutions (InceptionV3) lose a few pixels
        assert 256 // spec.tap_strides[t] - 3 <= out[t].shape[1] <= -(-256 // spec.tap_strides[t]), t


# --- configs ----------------------------------------------------------------------------------------

def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import dreamjax

    with initialize_config_dir(dreamjax.config_dir(), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("model,layers,dream", [
    ("resnet50", "resnet50_balanced", "resnet50"), ("vgg16", "vgg16_balanced", "vgg16"),
    ("efficientnet_lite2", "lite2_balanced", "lite2"), ("efficientnet_lite0", "lite_balanced", "lite")])
def test_model_alone_brings_its_layer_set_and_preset(model, layers, dream):
    cfg = _compose(f"model={model}")
    assert (cfg["model"]["name"], cfg["layers"]["name"], cfg["dream"]["name"]) == (model, layers, dream)
    cfg = _compose(f"model={model}", "layers=study_set2", "dream=dlwp")  # the command line still wins
    assert cfg["layers"]["name"].endswith("set2") and cfg["dream"]["name"] == "dlwp"


@pytest.mark.parametrize("model", ["inception_v3", "resnet50", "vgg16", "efficientnet_lite0", "efficientnet_lite2"])
def test_four_study_sets_for_every_backbone(model):
    sets = [_compose(f"model={model}", f"layers=study_set{k}")["layers"] for k in (1, 2, 3, 4)]
    spec = get_spec(model)
    for k, s in enumerate(sets, 1):
        assert s["backbone"] == model and s["name"].endswith(f"set{k}") and len(s["taps"]) == 4
        assert all(t in spec.taps for t in s["taps"])
        assert [spec.taps.index(t) for t in s["taps"]] == sorted(spec.taps.index(t) for t in s["taps"])
    assert [s["weights"] for s in sets] == [[1.0, 1.5, 2.0, 2.5], [0.1, 0.3, 4.0, 5.0], [4.0, 3.5, 0.3, 0.5],
                                            [2.0, 3.0, 4.0, 5.0]]  # the seed study's four sets
    if model == "efficientnet_lite0":  # the same sets (and names) as lite_set1..4
        assert [s["name"] for s in sets] == [f"lite_set{k}" for k in (1, 2, 3, 4)]
        for s in sets:
            ref = yaml.safe_load((CONF / "layers" / f"{s['name']}.yaml").read_text())
            assert {k: s[k] for k in ref} == ref


def test_seed_study_offline_takes_the_models_own_sets():
    cfg = _compose("+experiment=seed_study_offline", "model=efficientnet_lite2", "layers=study_set3")
    assert cfg["model"]["name"] == "efficientnet_lite2" and cfg["layers"]["name"] == "lite2_set3"
    assert cfg["name"] == "seed_study_offline_efficientnet_lite2"


@pytest.mark.parametrize("path", sorted((CONF / "layers").glob("*.yaml")), ids=lambda p: p.stem)
def test_layer_sets_name_real_taps(path):
    cfg = yaml.safe_load(path.read_text())
    if str(cfg.get("backbone", "")).startswith("${"):
        return  # a study set: checked per model above
    spec = get_spec(cfg["backbone"])
    assert cfg["name"] == path.stem and all(t in spec.taps for t in cfg["taps"]), cfg["taps"]
    assert len(cfg["weights"]) == len(cfg["taps"])


# --- your own backbone --------------------------------------------------------------------------------

@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_example_is_short_and_runs_a_tiny_dream():
    lines = EXAMPLE.read_text().splitlines()
    code = lines[lines.index('"""', 1) + 1:lines.index('if __name__ == "__main__":')]  # after the docstring
    assert len([line for line in code if line.strip()]) <= 30 and any("register_backbone(" in line for line in code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'c3': ((8, 8, 32), 8)" in p.stdout and "dreamed (1, 64, 64, 3)" in p.stdout


def test_register_from_user_code_and_select_by_module(tmp_path, monkeypatch):
    """``module:name`` imports the module that registers the backbone (what model.module=... does)."""
    import flax.linen as nn

    (tmp_path / "user_nets.py").write_text(
        "import flax.linen as nn, jax, jax.numpy as jnp\n"
        "from dreamjax.models import register_backbone\n"
        "class Net(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x, taps=None):\n"
        "        a = nn.Conv(4, (3, 3), strides=2)(x)\n"
        "        return None, {'a': a, 'b': nn.Conv(8, (3, 3), strides=2)(a)}\n"
        "register_backbone('user_net', build=Net, taps=['a', 'b'], min_size=8,\n"
        "                  preprocess=lambda x: (x - 100.0) / 50.0,\n"
        "                  load=lambda w, top: Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bb = load_backbone("user_nets:user_net")
    assert bb.name == "user_net" and "user_net" in available_backbones()
    assert bb.tap_strides == {"a": 2, "b": 4} and bb.tap_shapes(40, 24) == {"a": (20, 12, 4), "b": (10, 6, 8)}
    assert bb.weights_id.startswith("user_net-") and bb.weights_id == load_backbone("user_net").weights_id
    np.testing.assert_allclose(bb.deprocess(bb.preprocess(np.array([[0.0, 100.0, 255.0]]))), [[0, 100, 255]],
                               atol=1e-4)
    assert list(bb.features(bb.preprocess(np.zeros((1, 16, 16, 3))), ["b"])) == ["b"]  # only what was asked

    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x, taps=None):
            return None, {"a": x}

    register_backbone("bad_net", build=Bad, taps=["a", "zz"], load=lambda w, t: {})
    with pytest.raises(ValueError, match=r"backbone 'bad_net': the module returned taps \['a'\], not \['zz'\]"):
        get_spec("bad_net")
    with pytest.raises(ValueError, match="not a per-channel affine map"):
        register_backbone("bad_pre", build=Bad, taps=["a"], load=lambda w, t: {}, preprocess=lambda x: x ** 2)


def test_unknown_backbone_lists_the_registered_ones():
    with pytest.raises(ValueError) as e:
        load_backbone("resnet5")
    msg = str(e.value)
    assert "unknown backbone 'resnet5'" in msg
    assert all(n in msg for n in ("resnet50", "vgg16", "efficientnet_lite2", "inception_v3"))
    assert "register_backbone" in msg and "model.module" in msg


@pytest.mark.slow  # 15 s of CLI start-up; the import hook itself is tested in-process above
def test_cli_dreams_with_your_own_backbone(tmp_path):
    """``dreamjax model.module=custom_backbone model.name=mini_cnn`` end to end (one painting, 64 px)."""
    path = [str(EXAMPLE.parent), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    args = ["model.module=custom_backbone", "model.name=mini_cnn", "model.weights=random", "layers.backbone=mini_cnn",
            "layers.name=mini", "layers.taps=[c2,c3]", "layers.weights=[1,2]", "layers.scale=null",
            f"data.paths=[{PAINTINGS / 'turner_shipwreck.jpg'}]", "data.image_size=64", "dream.iterations=2",
            "dream.num_octaves=1", "analyze=false", "outputs.gif=false", f"hydra.run.dir={tmp_path / 'out'}"]
    p = subprocess.run([sys.executable, "-m", "dreamjax.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list((tmp_path / "out").glob("*/dream.png")), sorted(str(q) for q in (tmp_path / "out").rglob("*"))[:20]


def test_model_module_checked_before_compute(tmp_path, monkeypatch):
    """The validation pass imports model.module (which registers the backbone) before it looks the
    name up; a module that cannot be imported is one ConfigError line naming it."""
    from dreamjax.config import ConfigError
    from dreamjax.sweep.jobs import check_config

    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    layers = ["layers.backbone=mini_cnn", "layers.name=mini", "layers.taps=[c2,c3]", "layers.weights=[1,2]",
              "layers.scale=null", "data.image_size=64"]
    c, _ = check_config(_compose("model.module=custom_backbone", "model.name=mini_cnn", *layers))
    assert c.model.name == "mini_cnn"
    with pytest.raises(ConfigError, match=r"model.module: 'no_such_module_xyz' cannot be imported"):
        check_config(_compose("model.module=no_such_module_xyz", "model.name=other_net", *layers))
