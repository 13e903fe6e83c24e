"""prune(): identity, masking equivalence and cost on hand-built, project and keras.applications models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mskd_tf import models
from mskd_tf.pruning import build_graph, mask_channels, plan_keep, prune
from pruning_helpers import L, check_pruning, randomize_batchnorm, toy_model


def _assert_correct(result, target=0.5):
    assert result["identity_diff"] < 1e-5
    assert result["changed"] > 1e-3  # pruning changed the function, so equality below means something
    assert result["relative"] < 1e-4
    plan, cost = result["plan"], result["cost"]
    assert (plan.macs, plan.params) == (cost.macs, cost.params)
    assert abs(plan.macs_ratio - target) <= 0.01 * target


def test_toy_model_identity_masking_and_cost():
    result = check_pruning(toy_model(), (16, 16, 3), target_macs=0.6)
    assert result["identity_diff"] < 1e-5
    assert result["relative"] < 1e-4 and result["changed"] > 1e-3
    assert (result["plan"].macs, result["plan"].params) == (result["cost"].macs, result["cost"].params)
    pruned = result["pruned"]
    assert [layer.name for layer in pruned.layers] == [layer.name for layer in result["graph"].model.layers]


def test_project_resnet20_prunes_exactly():
    _assert_correct(check_pruning(models.build("resnet20", (32, 32, 3), 10), (32, 32, 3)))


def test_keras_applications_mobilenet_v3_small():
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10)
    _assert_correct(check_pruning(model, (32, 32, 3)))


def test_assorted_layers_separable_transpose_prelu_dense_chain():
    inputs = keras.Input((8, 8, 4))
    x = L.Rescaling(1 / 255.0)(inputs)
    x = L.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.PReLU(shared_axes=[1, 2], name="prelu")(x)
    x = L.Conv2DTranspose(10, 3, strides=2, padding="same", name="up")(x)
    x = L.BatchNormalization(name="up_bn")(x)
    x = L.Activation("swish", name="swish")(x)
    x = L.Dropout(0.1)(x)
    x = L.GlobalMaxPooling2D()(x)
    x = L.Dense(16, name="hidden")(x)
    x = L.BatchNormalization(scale=False, name="hidden_bn")(x)  # no gamma, as in Inception
    x = L.ReLU()(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(x))
    randomize_batchnorm(model)
    graph = build_graph(model)
    assert {g.id for g in graph.groups if g.prunable} == {"sep", "up", "hidden"}
    keep = {"sep": [0, 3, 4, 11], "up": [1, 2, 9], "hidden": list(range(0, 16, 3))}
    pruned, masked = prune(model, keep, graph=graph), mask_channels(model, keep, graph=graph)
    x = np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(pruned(x).numpy(), masked(x).numpy(), rtol=1e-4, atol=1e-5)
    assert tuple(pruned.get_layer("prelu").alpha.shape) == (1, 1, 4)
    assert tuple(pruned.get_layer("up").kernel.shape) == (3, 3, 3, 4)  # (k, k, out, in)
    assert tuple(pruned.get_layer("sep").pointwise_kernel.shape) == (1, 1, 8, 4)


def test_layer_normalization_on_channels_is_sliced():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.LayerNormalization(name="ln")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(x)))
    pruned = prune(model, {"conv": [1, 2, 6]})
    np.testing.assert_array_equal(pruned.get_layer("ln").gamma.numpy(), model.get_layer("ln").gamma.numpy()[[1, 2, 6]])


def _pruned_toy():
    model = randomize_batchnorm(toy_model())
    pruned = prune(model, {"stem": np.arange(0, 24, 2), "se_reduce": [0, 3]})
    x = np.random.default_rng(0).uniform(0, 1, (1, 16, 16, 3)).astype("float32")
    return pruned, x, pruned(x).numpy()


def test_pruned_model_saves_and_loads_without_custom_objects(tmp_path):
    pruned, x, expected = _pruned_toy()
    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.models.load_model(tmp_path / "pruned.keras")  # no custom_objects needed
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pruned_model_converts_to_tflite(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    pruned, x, expected = _pruned_toy()
    pruned.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    tflite = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved")).convert()
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_original_model_is_untouched():
    model = toy_model()
    before = [w.copy() for w in model.get_weights()]
    graph = build_graph(model)
    prune(model, plan_keep(graph, keep_ratio=0.5).keep, graph=graph)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="different model"):
        prune(toy_model(), {}, graph=graph)


SLOW_MODELS = {
    "resnet56": lambda: models.build("resnet56", (32, 32, 3), 10),
    "vgg16": lambda: models.build("vgg16", (32, 32, 3), 10),
    "mobilenet_v2": lambda: models.build("mobilenet_v2", (32, 32, 3), 10, normalization=([0.5] * 3, [0.25] * 3)),
    "app_MobileNetV2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10),
    "app_ResNet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10),
    "app_DenseNet121": lambda: keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10),
    "app_EfficientNetB0": lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10),
    # BatchNormalization(scale=False) everywhere; 75 px is its smallest input.
    "app_InceptionV3": lambda: keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classes=10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_MODELS))
def test_larger_models_prune_exactly(name):
    model = SLOW_MODELS[name]()
    _assert_correct(check_pruning(model, tuple(model.input.shape[1:])))
