"""Quantization-aware training through tf_keras + tfmot (mskd_tf.compat). Slow: tfmot import, tracing, fine-tuning."""

import os

import keras
import numpy as np
import pytest

from mskd_tf import deploy, quantize
from mskd_tf.errors import MskdError
from tiny_fashion import as_dataset, trained_tiny_cnn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compat():
    from mskd_tf import compat

    return compat


@pytest.fixture(scope="module")
def trained():
    return trained_tiny_cnn()


def test_import_leaves_keras_3_selected(compat):
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    compat.load_tf_keras()
    assert os.environ.get("TF_USE_LEGACY_KERAS") == before


def test_tf_keras_rebuild_has_identical_outputs(compat, trained):
    model, _, (x_test, _) = trained
    rebuilt = compat.to_tf_keras(model)
    assert type(rebuilt).__module__.startswith("tf_keras")
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(rebuilt.predict(x_test[:64], verbose=0), model.predict(x_test[:64], verbose=0), atol=1e-4)


def test_rebuild_names_an_unsupported_layer(compat):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.LayerNormalization(name="odd_norm")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.raises(MskdError, match="layer 'odd_norm' \\(LayerNormalization\\) cannot be rebuilt"):
        compat.to_tf_keras(model)


def test_qat_int8_converts_runs_and_keeps_accuracy(compat, trained):
    model, (x_train, y_train), (x_test, y_test) = trained
    tflite = compat.qat_int8(
        model,
        train_ds=as_dataset(x_train, y_train),
        calibration_images=x_train[:100],
        teacher=model,  # self-distillation: the Distiller loss path with a teacher
        epochs=1,
        steps_per_epoch=20,
    )
    io = quantize.io_details(tflite)
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8"
    keras_logits = model.predict(x_test, verbose=0)
    result = quantize.verify_tflite(tflite, x_test, y_test, keras_logits, latency_repeats=5)
    assert result["test_acc"] >= result["keras_acc"] - 0.05
    assert result["agreement"] >= 0.85  # QAT changes the weights, so agreement is not exact
    assert "CONV_2D" in deploy.check_micro_ops(tflite)


def test_qat_rejects_bad_options(compat, trained):
    model, (x_train, _), _ = trained
    with pytest.raises(MskdError, match="epochs >= 1 and lr > 0"):
        compat.qat_int8(model, train_ds=None, calibration_images=x_train[:4], epochs=0)
    with pytest.raises(MskdError, match="needs train_ds"):
        compat.qat_int8(model, train_ds=None, calibration_images=x_train[:4])


def test_export_all_adds_a_verified_qat_variant(trained, tmp_path):
    model, (x_train, y_train), (x_test, y_test) = trained
    results = deploy.export_all(
        model,
        str(tmp_path),
        kinds=("int8",),
        representative_ds=as_dataset(x_train[:500], y_train[:500]),
        test_ds=as_dataset(x_test[:200], y_test[:200]),
        num_calibration=50,
        qat={"train_ds": as_dataset(x_train, y_train), "teacher": model, "epochs": 1, "steps_per_epoch": 5},
        micro_images=20,
    )
    by_kind = {r["kind"]: r for r in results}
    assert list(by_kind) == ["int8", "int8_qat"]
    qat = by_kind["int8_qat"]
    assert os.path.getsize(qat["path"]) == qat["bytes"] and qat["test_acc"] >= qat["keras_acc"] - 0.05
    # The QAT file is the one deployed: micro check and both kits use it.
    assert qat["micro"]["agreement_with_litert"] >= 0.95
    assert open(qat["android_kit"]["model"], "rb").read() == open(qat["path"], "rb").read()
    source = open(qat["micro_kit"]["source"]).read()
    assert deploy.parse_c_array(source) == open(qat["path"], "rb").read()
