"""Keras-written InceptionV3 weight files for the converter and parity tests.

Built once per test session (Keras model build ~5 s, files ~100 MB each in a
session temp dir): a Keras 3 InceptionV3 with random weights *and* random
BatchNorm statistics and beta, so a wrong epsilon or a swapped BN shows, then
its weights written in every layout the converter reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

TOP = {True: "top", False: "notop"}
LAYOUTS = ("official", "keras3-root", "keras3-model", "keras3-weights")
_AUTO_NAMED = ("conv2d", "batch_normalization", "activation", "max_pooling2d", "average_pooling2d",
               "concatenate")
_STATE: dict = {}


def keras_inception(seed: int = 0):
    """``(model with logits top, model without top)``, sharing layers, any input size.

    Keras refuses a flexible input size with ``include_top=True``, so the top
    (GlobalAveragePooling2D + Dense, without Keras' softmax) is added by hand.
    """
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(None, None, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.Dense(1000, name="predictions")(x)
    top = keras.Model(base.input, x, name="inception_v3")
    rng = np.random.default_rng(seed)
    for layer in top.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.beta.shape[0]
            layer.beta.assign(0.1 * rng.standard_normal(n).astype("float32"))
            layer.moving_mean.assign(0.1 * rng.standard_normal(n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    dense = top.get_layer("predictions")
    dense.bias.assign(0.1 * rng.standard_normal(1000).astype("float32"))
    return top, base


def keras2_name(name: str) -> str:
    """Keras 3 auto name -> the Keras 2 name of the official file (counters start at 1)."""
    if name == "input_layer" or name.startswith("input_layer_"):
        return "input_1"
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    prefix, k = m.group(1), int(m.group(2) or 0)
    return f"{prefix}_{k + 1}" if prefix in _AUTO_NAMED else name


def write_official(model, path) -> Path:
    """The layout of ``inception_v3_weights_tf_dim_ordering_tf_kernels*.h5`` (Keras 2 names, ``:0``)."""
    with h5py.File(path, "w") as f:
        names = [keras2_name(layer.name) for layer in model.layers]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.0.8"
        for layer, name in zip(model.layers, names):
            g = f.create_group(name)
            weights = layer.trainable_weights + layer.non_trainable_weights  # Keras' legacy order
            wnames = [f"{name}/{w.path.split('/')[-1]}:0" for w in weights]
            g.attrs["weight_names"] = np.array([n.encode() for n in wnames])
            for n, w in zip(wnames, weights):
                g.create_dataset(n, data=np.asarray(w.numpy()))
    return Path(path)


def write_layout(model, layout: str, directory: Path, stem: str) -> Path:
    from keras.src.legacy.saving import legacy_h5_format

    if layout == "official":
        return write_official(model, directory / f"{stem}.h5")
    if layout == "keras3-root":
        path = directory / f"{stem}-root.h5"
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
        return path
    if layout == "keras3-model":
        path = directory / f"{stem}-model.h5"
        model.save(path)
        return path
    if layout == "keras3-weights":
        path = directory / f"{stem}.weights.h5"
        model.save_weights(path)
        return path
    raise ValueError(layout)


def other_architecture_file(directory: Path) -> Path:
    """A small Keras CNN that starts like InceptionV3 but with 8 filters."""
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(inp)
    x = keras.layers.BatchNormalization(scale=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(10)(x)
    path = directory / "small_cnn.h5"
    keras.Model(inp, x).save(path)
    return path


def keras_setup(tmp_path_factory):
    """Cached per session: {"top": model, "notop": model, "files": {(layout, include_top): path}, "dir": Path}."""
    if not _STATE:
        top, base = keras_inception()
        directory = tmp_path_factory.mktemp("keras_h5")
        files = {(layout, t): write_layout(top if t else base, layout, directory, f"inception_v3_{TOP[t]}")
                 for layout in LAYOUTS for t in (True, False)}
        _STATE.update(top=top, notop=base, files=files, dir=directory)
    return _STATE


# --- ResNet50 and VGG16 --------------------------------------------------------------------------

def randomise_keras_model(model, seed: int = 0):
    """Random BatchNorm statistics, scales and betas, and random biases (Keras initialises them to
    constants), so a wrong epsilon, a swapped leaf or a dropped bias shows in the parity tests."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.beta.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(0.1 * rng.standard_normal(n).astype("float32"))
            layer.moving_mean.assign(0.1 * rng.standard_normal(n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        elif getattr(layer, "bias", None) is not None:
            n = layer.bias.shape[0]
            layer.bias.assign(0.1 * rng.standard_normal(n).astype("float32"))
    return model


def keras_resnet50(seed: int = 0):
    """``(model with a logits top, model without top)``, sharing layers, any input size (the top,
    GlobalAveragePooling2D + Dense without softmax, is added by hand as for InceptionV3)."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.Dense(1000, name="predictions")(x)
    top = keras.Model(base.input, x, name="resnet50")
    randomise_keras_model(top, seed)
    return top, base


def keras_vgg16(include_top: bool = False, seed: int = 0):
    """Keras' own VGG16 (random weights, random biases); with the top it is 224x224 only and its
    last layer returns logits (classifier_activation=None)."""
    import keras

    keras.utils.set_random_seed(seed)
    if include_top:
        model = keras.applications.VGG16(weights=None, include_top=True, classifier_activation=None)
    else:
        model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    return randomise_keras_model(model, seed)
