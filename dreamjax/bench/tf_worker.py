"""The TensorFlow reference for the engine benchmark: Deep Learning with Python's DeepDream step.

Run by :class:`dreamjax.bench.engine.TFWorker` in a separate interpreter that has TensorFlow
(``--tf-python``); it never imports dreamjax. Protocol: one JSON line ``{"ready", "tf"}`` at
start, then per request line ``{"size", "steps", "cells"}`` one JSON line of timings.
"""
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
from tensorflow import keras

base = keras.applications.InceptionV3(weights=None, include_top=False)
layer_settings = {"mixed4": 1.0, "mixed5": 1.5, "mixed6": 2.0, "mixed7": 2.5}
outs = {n: base.get_layer(n).output for n in layer_settings}
fe = keras.Model(inputs=base.inputs, outputs=outs)

def compute_loss(x):
    features = fe(x)
    loss = tf.zeros(shape=())
    for name in features.keys():
        c = layer_settings[name]
        a = features[name]
        loss += c * tf.reduce_mean(tf.square(a[:, 2:-2, 2:-2, :]))
    return loss

@tf.function
def gradient_ascent_step(image, learning_rate):
    with tf.GradientTape() as tape:
        tape.watch(image)
        loss = compute_loss(image)
    grads = tape.gradient(loss, image)
    grads = tf.math.l2_normalize(grads)
    image += learning_rate * grads
    return loss, image

print(json.dumps({"ready": True, "tf": tf.__version__}), flush=True)
warm = set()
for line in sys.stdin:
    req = json.loads(line)
    size, steps, cells = req["size"], req["steps"], req["cells"]
    img = tf.constant(np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype("float32"))
    out = {}
    if size not in warm:
        t0 = time.perf_counter()
        loss, x = gradient_ascent_step(img, 20.0)
        float(loss)
        out["compile_seconds"] = time.perf_counter() - t0
        warm.add(size)
    t0 = time.perf_counter()
    for _ in range(cells):
        x = img
        for _ in range(steps):
            loss, x = gradient_ascent_step(x, 20.0)
            if float(loss) > 1e30:
                break
        x.numpy()
    out["seconds"] = time.perf_counter() - t0
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out), flush=True)
