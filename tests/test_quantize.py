"""TFLite conversion and LiteRT verification (mskd_tf.quantize) on a tiny CNN trained on Fashion-MNIST."""

import os

import numpy as np
import pytest

from mskd_tf import quantize
from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic
from tiny_fashion import as_dataset, trained_tiny_cnn


@pytest.fixture(scope="module")
def trained():
    model, train, test = trained_tiny_cnn()
    keras_logits = model.predict(test[0], verbose=0)
    return model, train, test, keras_logits


@pytest.fixture(scope="module")
def converted(trained):
    model, (x_train, _), _, _ = trained
    calibration = x_train[np.random.default_rng(0).permutation(len(x_train))[:200]]
    return {kind: quantize.convert(model, kind, calibration_images=calibration) for kind in quantize.KINDS}


def test_trained_model_is_a_real_classifier(trained):
    _, _, (_, y_test), keras_logits = trained
    # Agreement numbers below only mean something if the Keras model is far above chance (10%).
    assert np.mean(keras_logits.argmax(-1) == y_test) > 0.7


# Per kind: minimum argmax agreement with Keras on 300 real test images, and max |logit diff|.
EXPECTED = {"float32": (1.0, 1e-4), "float16": (0.99, 0.05), "dynamic": (0.98, 0.5), "int8": (0.98, 2.0)}


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_each_variant_runs_in_litert_and_agrees_with_keras(trained, converted, kind):
    _, _, (x_test, y_test), keras_logits = trained
    result = quantize.verify_tflite(converted[kind], x_test, y_test, keras_logits, latency_repeats=10)
    min_agreement, max_diff = EXPECTED[kind]
    assert result["agreement"] >= min_agreement
    assert result["max_abs_logit_diff"] <= max_diff
    assert result["keras_acc"] == pytest.approx(np.mean(keras_logits.argmax(-1) == y_test))
    assert abs(result["test_acc"] - result["keras_acc"]) <= 0.02
    assert set(result["latency_ms"]) == {1, 2} and all(v > 0 for v in result["latency_ms"].values())
    assert result["litert_kernels"] == "xnnpack"


def test_a_model_xnnpack_refuses_runs_on_the_builtin_kernels():
    # A ReLU layer that is zero on every calibration image gets a vanishing output scale, so the next int8
    # convolution's input x filter / output scale ratio is far over XNNPACK's 256 limit: LiteRT refuses to
    # prepare it with its default delegate, but the model is valid and TFLite's own kernels run it.
    import keras

    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="dead")(inputs)
    x = L.Conv2D(4, 3, padding="same", activation="relu")(x)
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    kernel, bias = model.get_layer("dead").get_weights()
    model.get_layer("dead").set_weights([kernel, np.full_like(bias, -100.0)])
    images = np.random.default_rng(0).random((16, 8, 8, 3)).astype(np.float32)
    tflite = quantize.convert(model, "int8", calibration_images=images[:8])
    runner = quantize.LiteRTModel(tflite)
    assert runner.kernels == "builtin" and "XNNPACK" in runner.xnnpack_refusal
    keras_logits = model.predict(images, verbose=0)
    result = quantize.verify_tflite(tflite, images, keras_logits.argmax(-1), keras_logits, latency_repeats=3)
    assert result["litert_kernels"] == "builtin" and result["max_abs_logit_diff"] < 0.05
    assert quantize.io_details(tflite)["input"]["dtype"] == "int8"


def test_the_unsigned_conversion_is_the_same_int8_model(trained, converted):
    # The device-target planner measures candidates converted with signature=False: it must be the file the
    # export ships (same ops, outputs and TFLM arena) but for the signature's bytes.
    from mskd_tf.deploy import tflm

    model, (x_train, _), (x_test, _), _ = trained
    calibration = x_train[np.random.default_rng(0).permutation(len(x_train))[:200]]
    unsigned = quantize.convert(model, "int8", calibration_images=calibration, signature=False)
    signed = converted["int8"]
    ops = [[op["op_name"] for op in quantize._interpreter(b, 1, xnnpack=False)._get_ops_details()]
           for b in (unsigned, signed)]
    assert ops[0] == ops[1]
    np.testing.assert_array_equal(quantize.LiteRTModel(unsigned).predict(x_test[:64]),
                                  quantize.LiteRTModel(signed).predict(x_test[:64]))
    assert tflm.arena_usage(unsigned) == tflm.arena_usage(signed)
    assert 0 < len(signed) - len(unsigned) < 512


def test_quantized_files_are_smaller_and_typed_as_requested(converted):
    sizes = {kind: len(data) for kind, data in converted.items()}
    # The dense layer dominates the weights: int8 ~1/4 of float32, float16 ~1/2.
    assert sizes["int8"] < 0.4 * sizes["float32"]
    assert sizes["dynamic"] < 0.4 * sizes["float32"]
    assert 0.4 * sizes["float32"] < sizes["float16"] < 0.65 * sizes["float32"]
    int8_io = quantize.io_details(converted["int8"])
    assert int8_io["input"]["dtype"] == "int8" and int8_io["output"]["dtype"] == "int8"
    # Inputs are [0, 1] images, so calibration must find scale 1/255 and zero point -128.
    assert int8_io["input"]["scale"] == pytest.approx(1 / 255, rel=1e-3)
    assert int8_io["input"]["zero_point"] == -128
    assert int8_io["input"]["shape"] == [1, 28, 28, 1]
    for kind in ("float32", "dynamic", "float16"):
        io = quantize.io_details(converted[kind])
        assert io["input"]["dtype"] == "float32" and io["input"]["scale"] == 0.0


def test_quantize_input_matches_numpy_reference():
    images = np.array([0.0, 0.2, 1.0, 2.0, -1.0], dtype=np.float32)
    q = quantize.quantize_input(images, 1 / 255, -128, np.int8)
    # 0.2 * 255 = 51 -> 51 - 128 = -77; out-of-range values clip to the int8 limits.
    np.testing.assert_array_equal(q, np.array([-128, -77, 127, 127, -128], dtype=np.int8))
    np.testing.assert_allclose(quantize.dequantize(np.array([-128, 127], np.int8), 0.5, -128), [0.0, 127.5])
    np.testing.assert_array_equal(quantize.dequantize(np.array([1.5]), 0.0, 0), [1.5])


def test_int8_without_calibration_images_is_refused(trained):
    with pytest.raises(MskdError, match="kind='int8' needs calibration images"):
        quantize.convert(trained[0], "int8", calibration_images=None)


def test_unknown_kind_is_refused(trained):
    with pytest.raises(MskdError, match="kind='int4' is not a TFLite variant"):
        quantize.convert(trained[0], "int4")


def test_dataset_arrays_collects_and_validates(trained):
    _, _, (x_test, y_test), _ = trained
    images, labels = quantize.dataset_arrays(as_dataset(x_test, y_test, batch=32), max_images=70)
    assert images.shape == (70, 28, 28, 1)
    np.testing.assert_array_equal(labels, y_test[:70])
    import tensorflow as tf

    with pytest.raises(MskdError, match="expected batched NHWC"):
        quantize.dataset_arrays(tf.data.Dataset.from_tensor_slices((x_test[:4], y_test[:4])))
    with pytest.raises(MskdError, match="must yield \\(images, labels\\)"):
        quantize.dataset_arrays(tf.data.Dataset.from_tensor_slices(x_test[:4]).batch(2))
    with pytest.raises(MskdError, match="empty"):
        quantize.dataset_arrays(as_dataset(x_test[:0], y_test[:0]))


def test_verify_refuses_a_model_with_other_outputs(trained, converted):
    _, _, (x_test, y_test), keras_logits = trained
    with pytest.raises(MskdError, match="outputs shape"):
        quantize.verify_tflite(converted["float32"], x_test[:5], y_test[:5], keras_logits[:5, :3])


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "model.tflite"
    write_atomic(str(target), b"first")
    write_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["model.tflite"]
