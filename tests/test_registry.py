import numpy as np
import pytest

from dreamjax import available_backbones, load_backbone


def test_tiny_registered_and_taps(tiny_backbone):
    assert "tiny" in available_backbones()
    shapes = tiny_backbone.tap_shapes(64, 48)
    assert shapes == {"conv1": (32, 24, 8), "conv2": (16, 12, 16), "conv3": (8, 6, 16), "conv4": (4, 3, 32)}


def test_unknown_backbone_and_tap(tiny_backbone):
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*tiny"):
        load_backbone("nope")
    with pytest.raises(ValueError, match="unknown tap.*conv9.*allowed: conv1"):
        tiny_backbone.features(np.zeros((1, 32, 32, 3), np.float32), ["conv9"])


def test_early_stop_returns_only_requested(tiny_backbone):
    x = tiny_backbone.preprocess(np.full((1, 32, 32, 3), 128, np.uint8))
    out = tiny_backbone.features(x, ["conv2"])
    assert list(out) == ["conv2"]
    assert tiny_backbone.logits(x).shape == (1, 10)
