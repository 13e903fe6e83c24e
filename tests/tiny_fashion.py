"""A tiny CNN trained briefly on real Fashion-MNIST images, shared by the export tests.

The IDX files are read from the machine's dataset folder with gzip + numpy (nothing
is cached in the repo); tests skip when the folder is absent. One process trains
the model once (``functools.cache``), in a few seconds on two CPU cores.
"""

import functools
import gzip
import os

import numpy as np
import pytest

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path):
    """Parse one gzipped IDX file (the MNIST container format) into a numpy array."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_split(split, count):
    """The first ``count`` images of a split as float32 NHWC in [0, 1], and int labels."""
    prefix = "train" if split == "train" else "t10k"
    image_path = os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(image_path):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_DIR}")
    images = read_idx(image_path)[:count, :, :, None].astype(np.float32) / 255.0
    labels = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:count].astype(np.int64)
    return images, labels


def as_dataset(images, labels, batch=64):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


@functools.cache
def trained_tiny_cnn():
    """(model, train arrays, test arrays): a 2-conv CNN with in-model Normalization, 5 epochs (~83% test)."""
    import keras

    x_train, y_train = fashion_split("train", 4000)
    x_test, y_test = fashion_split("test", 300)
    keras.utils.set_random_seed(0)
    norm = keras.layers.Normalization(axis=-1)
    norm.adapt(x_train[:1000])
    inputs = keras.Input((28, 28, 1))
    x = norm(inputs)
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs, name="tiny_fashion")
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=5, verbose=0)
    return model, (x_train, y_train), (x_test, y_test)
