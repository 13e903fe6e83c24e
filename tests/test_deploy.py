"""TFLite Micro check, arena search, C array, micro/android kits and the export stage (mskd_tf.deploy)."""

import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest

from mskd_tf import deploy, quantize
from mskd_tf.errors import MskdError
from tiny_fashion import CLASS_NAMES, as_dataset, trained_tiny_cnn


@pytest.fixture(scope="module")
def trained():
    return trained_tiny_cnn()


@pytest.fixture(scope="module")
def int8_bytes(trained):
    model, (x_train, _), _ = trained
    return quantize.convert(model, "int8", calibration_images=x_train[:200])


@pytest.fixture(scope="module")
def arena(trained, int8_bytes):
    return deploy.find_arena_size(int8_bytes)


@pytest.fixture(scope="module")
def gelu_int8():
    """An int8 model whose activation becomes the GELU builtin, which TFLite Micro lacks."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="gelu")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    calibration = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    return quantize.convert(model, "int8", calibration_images=calibration)


def test_micro_ops_match_litert_op_list(int8_bytes):
    from ai_edge_litert.interpreter import Interpreter

    # Independent reference: the ops LiteRT itself reports for the same flatbuffer.
    reference = sorted({op["op_name"] for op in Interpreter(model_content=int8_bytes)._get_ops_details()})
    assert deploy.micro_ops(int8_bytes) == reference
    assert "CONV_2D" in reference and "FULLY_CONNECTED" in reference


def test_tflm_op_set_comes_from_the_runtime():
    supported = deploy.tflm_supported_ops()
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN", "SOFTMAX", "QUANTIZE"} <= supported
    assert "GELU" not in supported  # the runtime refuses it (see the next test), so the set must too
    assert 60 < len(supported) < 200


def test_resolver_method_names():
    # Names as declared in tflite::MicroMutableOpResolver.
    expected = {
        "CONV_2D": "AddConv2D",
        "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
        "FULLY_CONNECTED": "AddFullyConnected",
        "AVERAGE_POOL_2D": "AddAveragePool2D",
        "STRIDED_SLICE": "AddStridedSlice",
        "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
        "BATCH_MATMUL": "AddBatchMatMul",
        "PADV2": "AddPadV2",
        "L2_NORMALIZATION": "AddL2Normalization",
        "RELU6": "AddRelu6",
        "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    }
    assert {op: deploy.resolver_method(op) for op in expected} == expected


def test_unsupported_op_is_named(gelu_int8):
    gelu = gelu_int8
    assert "GELU" in deploy.micro_ops(gelu)
    with pytest.raises(MskdError, match="TFLite Micro has no kernel for: GELU"):
        deploy.check_micro_ops(gelu)
    with pytest.raises(MskdError, match="GELU"):
        deploy.MicroModel(gelu, arena_size=100_000)


def test_arena_search_finds_the_boundary(trained, int8_bytes, arena):
    images = trained[2][0][:2]
    assert arena % deploy.ARENA_ALIGN == 0 and deploy.MIN_ARENA_BYTES < arena < 200_000
    deploy.MicroModel(int8_bytes, arena).predict(images)  # the found size works...
    too_small = arena - deploy.ARENA_ALIGN
    with pytest.raises(MskdError, match=f"arena of {too_small} bytes"):  # ...and 16 bytes less does not
        deploy.MicroModel(int8_bytes, too_small)


def test_arena_that_crashes_tflm_is_an_error_not_a_crash(int8_bytes, arena):
    # Found on ResNet-20: a too-small arena can segfault TFLM while it places persistent buffers.
    # Whatever TFLM does, each size below the found one must come back as an MskdError naming it.
    for size in sorted({deploy.MIN_ARENA_BYTES, arena // 2 // 16 * 16, arena * 3 // 4 // 16 * 16}):
        with pytest.raises(MskdError, match=f"arena of {size} bytes"):
            deploy.MicroModel(int8_bytes, size)


def test_tiny_arena_is_refused_before_tflm_crashes(int8_bytes):
    with pytest.raises(MskdError, match="arena_size=100 bytes is below"):
        deploy.MicroModel(int8_bytes, 100)


def test_tflm_agrees_with_litert_on_real_images(trained, int8_bytes, arena):
    _, _, (x_test, y_test) = trained
    images, labels = x_test[:100], y_test[:100]
    litert = quantize.LiteRTModel(int8_bytes).predict(images)
    result = deploy.evaluate_micro(int8_bytes, images, labels, arena_size=arena, litert_logits=litert)
    assert result["agreement_with_litert"] >= 0.98
    assert abs(result["acc"] - result["litert_acc"]) <= 0.02
    assert result["latency_ms"] > 0 and result["images"] == 100


def test_c_array_round_trips(int8_bytes, tmp_path):
    source = deploy.c_array_source(int8_bytes, "model")
    assert "alignas(16) extern const unsigned char g_model_data[]" in source
    assert f"g_model_data_len = {len(int8_bytes)};" in source
    assert deploy.parse_c_array(source) == int8_bytes
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the generated array")
    # Compile the kit's source + header and let a program dump the array: same bytes, 16-byte aligned.
    io = quantize.io_details(int8_bytes)
    (tmp_path / "model_data.h").write_text(deploy.c_header("model", arena_bytes=4096, io=io, class_names=None))
    (tmp_path / "model_data.cc").write_text(source)
    (tmp_path / "dump.cc").write_text(
        '#include <cstdint>\n#include <cstdio>\n#include "model_data.h"\n'
        "int main() { if (reinterpret_cast<std::uintptr_t>(g_model_data) % 16) return 3;\n"
        "  if (kModelArenaSize != 4096 || kModelNumClasses != 10) return 4;\n"
        "  fwrite(g_model_data, 1, g_model_data_len, stdout); return 0; }\n"
    )
    binary = tmp_path / "dump"
    compile_cmd = ["g++", "-std=c++17", "-Wall", "-Werror", "-o", str(binary)]
    subprocess.run([*compile_cmd, str(tmp_path / "model_data.cc"), str(tmp_path / "dump.cc")], check=True)
    dumped = subprocess.run([str(binary)], capture_output=True, check=True).stdout
    assert dumped == int8_bytes


def test_parse_c_array_rejects_other_text():
    with pytest.raises(MskdError, match="No `unsigned char"):
        deploy.parse_c_array("int x = 3;")


def test_micro_kit_refuses_unsupported_ops(gelu_int8, tmp_path):
    with pytest.raises(MskdError, match="GELU"):
        deploy.write_micro_kit(gelu_int8, str(tmp_path), arena_bytes=10_000)
    assert not os.listdir(tmp_path)


def test_android_kit_rejects_wrong_label_count(int8_bytes, tmp_path):
    with pytest.raises(MskdError, match="class_names has 3 entries but the model outputs 10"):
        deploy.write_android_kit(int8_bytes, str(tmp_path), class_names=["a", "b", "c"])


def test_export_all_writes_verified_variants_and_kits(trained, tmp_path):
    model, (x_train, y_train), (x_test, y_test) = trained
    results = deploy.export_all(
        model,
        str(tmp_path),
        kinds=("float32", "int8"),
        representative_ds=as_dataset(x_train[:1000], y_train[:1000]),
        test_ds=as_dataset(x_test, y_test),
        num_calibration=100,
        class_names=CLASS_NAMES,
        micro_images=50,
    )
    by_kind = {r["kind"]: r for r in results}
    assert list(by_kind) == ["float32", "int8"]
    for entry in results:
        assert os.path.getsize(entry["path"]) == entry["bytes"]
        assert entry["agreement"] >= 0.98
        assert entry["drop_vs_keras"] == pytest.approx(entry["keras_acc"] - entry["test_acc"])
    micro = by_kind["int8"]["micro"]
    assert micro["agreement_with_litert"] >= 0.98 and micro["images"] == 50
    assert micro["arena_bytes_in_header"] >= 1.25 * micro["arena_bytes"]
    assert micro["ops"] == deploy.micro_ops(open(by_kind["int8"]["path"], "rb").read())
    header = open(by_kind["int8"]["micro_kit"]["header"]).read()
    assert f"kModelArenaSize = {micro['arena_bytes_in_header']};" in header
    ops_header = open(by_kind["int8"]["micro_kit"]["ops_header"]).read()
    assert f"kModelNumOps = {len(micro['ops'])};" in ops_header and "resolver.AddConv2D()" in ops_header
    source = open(by_kind["int8"]["micro_kit"]["source"]).read()
    assert deploy.parse_c_array(source) == open(by_kind["int8"]["path"], "rb").read()
    assert "main.cc" in by_kind["int8"]["micro_kit"]  # the template travels with the kit

    android = by_kind["int8"]["android_kit"]
    assert open(android["labels"]).read().splitlines() == CLASS_NAMES
    info = json.load(open(android["info"]))
    io = quantize.io_details(open(android["model"], "rb").read())
    assert info["input"] == io["input"] and info["input"]["dtype"] == "int8"
    assert info["normalisation"]["shortcut"] == f"q = pixel + ({io['input']['zero_point']})"
    saved = json.load(open(tmp_path / "export.json"))
    assert [s["kind"] for s in saved] == ["float32", "int8"] and saved[1]["micro"]["arena_bytes"] == micro["arena_bytes"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_export_all_validates_arguments(trained, tmp_path):
    model, (x_train, y_train), (x_test, y_test) = trained
    data = as_dataset(x_test[:10], y_test[:10])
    with pytest.raises(MskdError, match="kinds=\\('int4',\\)"):
        deploy.export_all(model, str(tmp_path), kinds=("int4",), representative_ds=data, test_ds=data)
    with pytest.raises(MskdError, match="num_calibration=0"):
        deploy.export_all(model, str(tmp_path), kinds=("int8",), representative_ds=data, test_ds=data, num_calibration=0)


def test_missing_kit_templates_are_an_error_not_a_silently_thinner_kit(tmp_path, monkeypatch):
    from mskd_tf.deploy import templates

    copied = templates.copy_templates("micro", str(tmp_path))
    assert sorted(copied) == ["README.md", "main.cc"] and (tmp_path / "main.cc").read_bytes().startswith(b"//")
    monkeypatch.setattr(templates, "TEMPLATE_PACKAGE", "mskd_tf.no_such_templates")
    with pytest.raises(MskdError, match=r"micro kit templates \(mskd_tf.no_such_templates/micro\) are missing"):
        templates.copy_templates("micro", str(tmp_path / "again"))
