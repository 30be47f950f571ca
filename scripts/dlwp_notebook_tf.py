#!/usr/bin/env python
"""The Deep Learning with Python (2nd ed., ch. 12) DeepDream notebook as one script, on TensorFlow:
the reference a cold dreamjax CLI run is timed against as a whole process (start-up included).

  /tmp/tfvenv/bin/python scripts/dlwp_notebook_tf.py PAINTING --long-side 256 --out dream.png [--weights imagenet]

InceptionV3 (random weights unless --weights imagenet: speed only), layers mixed4..7 with
1.0/1.5/2.0/2.5, step 20 on the L2-normalised gradient, 3 octaves x 1.4, 30 iterations,
max_loss 15, lost-detail re-injection: the notebook's code, only the image is first resized to
the long side (as dreamjax's data.image_size does). Needs tensorflow-cpu and pillow; not part of dreamjax.
"""
import argparse
import os
import time

T0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"  # the notebook runs Keras on TF (a caller may have set jax)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("painting", nargs="+", help="one or more paintings (each is dreamed with every --sets entry)")
    p.add_argument("--long-side", type=int, default=256)
    p.add_argument("--out", default="dream.png")
    p.add_argument("--weights", default=None, help="None (random, default) or imagenet")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--sets", nargs="+", default=["1.0,1.5,2.0,2.5"],
                   help="layer weights for mixed4..mixed7, one comma list per set (the seed study's 4 sets: "
                        "1.0,1.5,2.0,2.5 0.1,0.3,4.0,5 4.0,3.5,0.3,0.5 2.0,3.0,4.0,5)")
    a = p.parse_args()
    model = keras.applications.inception_v3.InceptionV3(weights=a.weights, include_top=False)
    many = len(a.painting) * len(a.sets) > 1
    # The notebook's cells run again for each weight set and painting, in one process (the way the
    # seed study was run): a new loss and tf.function per set, the model built once.
    for k, weights in enumerate(a.sets):
        layer_settings = dict(zip(("mixed4", "mixed5", "mixed6", "mixed7"), map(float, weights.split(","))))
        for j, painting in enumerate(a.painting):
            out = a.out if not many else a.out.replace(".png", f"_{k}_{j}.png")
            dream_one(model, layer_settings, painting, a.long_side, a.iterations, out)
    print(f"{len(a.painting) * len(a.sets)} dream(s): {time.perf_counter() - T0:.1f} s in this process")


def dream_one(model, layer_settings, painting, long_side, iterations, out_path):
    """The notebook's cells for one painting and one weight set."""
    img = keras.utils.load_img(painting)
    w, h = img.size
    s = long_side / max(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
    original_img = keras.applications.inception_v3.preprocess_input(
        np.expand_dims(keras.utils.img_to_array(img), axis=0))

    outputs_dict = {layer.name: layer.output for layer in [model.get_layer(n) for n in layer_settings]}
    feature_extractor = keras.Model(inputs=model.inputs, outputs=outputs_dict)

    def compute_loss(input_image):
        features = feature_extractor(input_image)
        loss = tf.zeros(shape=())
        for name in features.keys():
            coeff = layer_settings[name]
            activation = features[name]
            loss += coeff * tf.reduce_mean(tf.square(activation[:, 2:-2, 2:-2, :]))
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

    def gradient_ascent_loop(image, iterations, learning_rate, max_loss=None):
        for _ in range(iterations):
            loss, image = gradient_ascent_step(image, learning_rate)
            if max_loss is not None and loss > max_loss:
                break
        return image

    step, num_octave, octave_scale, iterations, max_loss = 20.0, 3, 1.4, iterations, 15.0
    original_shape = original_img.shape[1:3]
    successive_shapes = [original_shape]
    for i in range(1, num_octave):
        successive_shapes.append(tuple(int(dim / (octave_scale ** i)) for dim in original_shape))
    successive_shapes = successive_shapes[::-1]
    shrunk_original_img = tf.image.resize(original_img, successive_shapes[0])
    img = tf.identity(original_img)
    for shape in successive_shapes:
        img = tf.image.resize(img, shape)
        img = gradient_ascent_loop(img, iterations=iterations, learning_rate=step, max_loss=max_loss)
        upscaled_shrunk_original_img = tf.image.resize(shrunk_original_img, shape)
        same_size_original = tf.image.resize(original_img, shape)
        lost_detail = same_size_original - upscaled_shrunk_original_img
        img += lost_detail
        shrunk_original_img = tf.image.resize(original_img, shape)

    out = img.numpy().reshape((img.shape[1], img.shape[2], 3))
    out = np.clip((out + 1.0) * 127.5, 0, 255).astype("uint8")
    keras.utils.save_img(out_path, out)
    print(f"dream {out_path}: {time.perf_counter() - T0:.1f} s in this process")


if __name__ == "__main__":
    main()
