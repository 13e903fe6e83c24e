"""A Keras user's own models through compress(), every stage, to int8 TFLite run in LiteRT and TFLite Micro."""

import keras
import numpy as np
import pytest

import mskd_tf
from mskd_tf import flops

L = keras.layers


def _stripes(n, seed, size=16, channels=1, classes=3):
    """Learnable in a few steps: the class is which horizontal band is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.uniform(0, 0.3, (n, size, size, channels)).astype("float32")
    band = size // (classes + 1)
    for i, c in enumerate(y):
        x[i, band * c:band * (c + 1), :, c % channels] = 1.0
    return x, y


def _check_result(result, teacher, target=0.5):
    student_macs, teacher_macs = flops.count(result.student).macs, flops.count(teacher).macs
    assert student_macs <= target * teacher_macs * 1.05
    (int8,) = [e for e in result.exports if e["kind"] == "int8"]
    assert int8["test_acc"] is not None and int8["micro"]["acc"] is not None  # ran in LiteRT and in TFLM
    assert abs(int8["test_acc"] - result.student_metrics["test_acc"]) <= 0.1
    return int8


@pytest.mark.parametrize("head", ["softmax", "logits"])
def test_sequential_model_end_to_end(tmp_path, head):
    x, y = _stripes(256, 0)
    xv, yv = _stripes(96, 1)
    model = keras.Sequential(
        [keras.Input((16, 16, 1)), L.Conv2D(16, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
         L.Conv2D(16, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(3),
         *([L.Softmax()] if head == "softmax" else [])])
    keras.utils.set_random_seed(0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=head == "logits"))
    model.fit(x, y, epochs=3, verbose=0)
    result = mskd_tf.compress(model, (x, y), (xv, yv), target_macs=0.5, criteria=["l1", "l2"],
                              select_epochs=0.5, allocations=("global",),
                              student_epochs=2, export=("int8",), workdir=str(tmp_path / "wd"))
    _check_result(result, model)
    assert model.trainable  # the caller's model is handed back as it came
    probabilities = keras.ops.convert_to_numpy(result.student(xv[:8]))
    if head == "softmax":  # the student keeps the teacher's head kind
        assert isinstance(result.student.layers[-1], L.Softmax)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    else:
        assert isinstance(result.student.layers[-1], L.Dense)


@pytest.mark.slow  # ~10 minutes on 2 cores, most of it tracing a 150-layer model in each stage
def test_keras_applications_mobilenet_v2_end_to_end(tmp_path):
    x, y = _stripes(384, 0, size=96, channels=3, classes=4)
    xv, yv = _stripes(128, 1, size=96, channels=3, classes=4)
    inputs = keras.Input((96, 96, 3))
    scaled = L.Rescaling(2.0, offset=-1.0)(inputs)  # keras.applications-style scaling to [-1, 1]
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=4,
                                          classifier_activation=None)
    model = keras.Model(inputs, base(scaled))  # a keras.applications model nested as a layer
    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    result = mskd_tf.compress(model, (x, y), (xv, yv), target_macs=0.5,  # every criterion reads the nested layers
                              select_epochs=0.5, batch_size=32, student_epochs=1.5,
                              export=("int8",), workdir=str(tmp_path / "wd"))
    int8 = _check_result(result, model)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= set(int8["micro"]["ops"])
    assert set(result.timings) >= {"teacher", "rank", "candidates", "select", "distill", "export", "report"}
