"""Teacher architectures: shapes, names, .keras round trip, known sizes, option-A numerics, TFLite."""

import numpy as np
import keras
import pytest

from mskd_tf import models
from mskd_tf.errors import MskdError

CIFAR = (32, 32, 3)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _input_shape(name):
    return (28, 28, 1) if name == "small_cnn" else CIFAR


def _trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _images(shape, count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, *shape)).astype("float32")


def test_available_lists_every_architecture():
    assert models.available() == sorted(
        ["mobilenet_v2", "resnet110", "resnet20", "resnet32", "resnet56", "small_cnn", "vgg11", "vgg16", "vgg19"]
    )


@pytest.mark.parametrize("name", models.available())
def test_builds_functional_logits_model_of_builtin_layers(name):
    model = models.build(name, _input_shape(name), 7, width=0.25 if name.startswith("vgg") else 1.0)
    assert model.name == name
    assert model.output_shape == (None, 7)
    classifier = model.layers[-1]
    assert classifier.name == "classifier" and isinstance(classifier, keras.layers.Dense)
    assert classifier.activation is keras.activations.linear
    for layer in model.layers:
        # Only Keras' own layers: the pruning engine and .keras loading need no custom objects.
        assert type(layer).__module__.startswith("keras."), layer.name
        assert not isinstance(layer, keras.layers.Lambda), layer.name
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias and layer.kernel_regularizer is None, layer.name


def test_forward_pass_shape_and_finite_logits():
    model = models.build("resnet20", CIFAR, 10)
    logits = keras.ops.convert_to_numpy(model(_images(CIFAR, count=3), training=False))
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "name,options",
    [
        ("resnet20", {"normalization": (CIFAR_MEAN, CIFAR_STD)}),
        ("resnet20", {"shortcut": "B", "dropout": 0.2}),
        ("vgg11", {"width": 0.125}),
        ("mobilenet_v2", {"width": 0.35}),
        ("small_cnn", {"normalization": ((0.286,), (0.353,))}),
    ],
)
def test_keras_file_round_trip_gives_identical_outputs(tmp_path, name, options):
    model = models.build(name, _input_shape(name), 10, **options)
    images = _images(_input_shape(name))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects needed
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
    )


@pytest.mark.parametrize(
    "name,published",
    [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.72e6), ("vgg16", 14.98e6)],
)
def test_trainable_parameters_match_published_counts(name, published):
    assert _trainable_params(models.build(name, CIFAR, 10)) == pytest.approx(published, rel=0.01)


def test_resnet20_exact_parameter_count():
    # convs: stem 3*3*3*16 + stage1 6*3*3*16*16 + stage2 (3*3*16*32 + 5*3*3*32*32)
    # + stage3 (3*3*32*64 + 5*3*3*64*64); BN gamma+beta 2*(16 + 6*16 + 6*32 + 6*64); fc 64*10+10
    convs = 432 + 6 * 2304 + (4608 + 5 * 9216) + (18432 + 5 * 36864)
    assert _trainable_params(models.build("resnet20", CIFAR, 10)) == convs + 2 * 688 + 650 == 269_722
    # Shortcut B adds two 1x1 projections with BN.
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert _trainable_params(models.build("resnet20", CIFAR, 10, shortcut="B")) == 269_722 + extra


def test_stable_layer_names():
    resnet = models.build("resnet56", CIFAR, 10)
    names = {layer.name for layer in resnet.layers}
    for name in [
        "stem_conv", "stem_bn", "stage2_block3_conv1", "stage2_block3_bn1", "stage2_block3_conv2",
        "stage2_block3_add", "stage2_block1_shortcut_pool", "stage2_block1_shortcut_flat",
        "stage2_block1_shortcut_pad", "stage2_block1_shortcut_unflat", "stage3_block9_out", "gap", "classifier",
    ]:
        assert name in names, name
    assert "stage1_block1_shortcut_pad" not in names  # identity shortcut where shapes agree
    names_b = {layer.name for layer in models.build("resnet20", CIFAR, 10, shortcut="B").layers}
    assert {"stage3_block1_shortcut_conv", "stage3_block1_shortcut_bn"} <= names_b
    vgg = {layer.name for layer in models.build("vgg16", CIFAR, 10, width=0.125).layers}
    assert {"block1_conv1", "block5_conv3", "block4_pool", "fc1", "fc1_bn", "classifier"} <= vgg


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    model = models.build("resnet20", CIFAR, 10)
    probe = keras.Model(
        model.input, [model.get_layer("stage1_block3_out").output, model.get_layer("stage2_block1_shortcut_unflat").output]
    )
    before, shortcut = (keras.ops.convert_to_numpy(t) for t in probe(_images(CIFAR), training=False))
    expected = np.pad(before[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
    np.testing.assert_array_equal(shortcut, expected)


def test_small_cnn_has_a_residual_add_and_stays_cheap():
    from mskd_tf import flops

    model = models.build("small_cnn", (28, 28, 1), 10)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert [layer.name for layer in adds] == ["res_add"]
    # stem 28x28 1->32, residual 2x 32->32 at 14x14, 32->64 at 14x14, 64->128 at 7x7, fc 128->10
    expected = 9 * 32 * 784 + 2 * 9 * 32 * 32 * 196 + 9 * 32 * 64 * 196 + 9 * 64 * 128 * 49 + 1280
    assert flops.count(model).macs == expected == 11_065_088


def test_mobilenet_v2_cifar_strides_and_width():
    cifar = models.build("mobilenet_v2", CIFAR, 10)
    assert cifar.get_layer("stem_conv").strides == (1, 1)
    assert cifar.get_layer("head_conv").output.shape[1:3] == (4, 4)  # 32 -> 4, not 1
    imagenet = models.build("mobilenet_v2", (96, 96, 3), 10)
    assert imagenet.get_layer("head_conv").output.shape[1:3] == (3, 3)  # 96 / 32
    slim = models.build("mobilenet_v2", CIFAR, 10, width=0.5)
    assert slim.get_layer("stem_conv").filters == 16
    assert slim.get_layer("block17_project_conv").filters == 160
    assert slim.get_layer("head_conv").filters == 1280  # kept for width <= 1 as in the paper


def test_normalization_layer_computes_standardized_input():
    model = models.build("resnet20", CIFAR, 10, normalization=(CIFAR_MEAN, CIFAR_STD))
    assert model.layers[1].name == "normalize"
    probe = keras.Model(model.input, model.get_layer("normalize").output)
    images = _images(CIFAR)
    expected = (images - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probe(images)), expected, rtol=1e-5, atol=1e-5)
    assert "normalize" not in {layer.name for layer in models.build("resnet20", CIFAR, 10).layers}


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: models.build("resnet18", CIFAR, 10), "unknown model 'resnet18'.*resnet20.*vgg16"),
        (lambda: models.build("resnet20", (32, 32), 10), "input_shape must be"),
        (lambda: models.build("resnet20", CIFAR, 1), "num_classes"),
        (lambda: models.build("resnet20", CIFAR, 10, shortcut="C"), "shortcut must be 'A'"),
        (lambda: models.build("resnet20", CIFAR, 10, width=0), "width"),
        (lambda: models.build("resnet20", CIFAR, 10, dropout=1.0), "dropout"),
        (lambda: models.build("resnet20", CIFAR, 10, normalization=((0.5,), (0.2,))), "3 channels"),
        (lambda: models.build("resnet20", CIFAR, 10, normalization=(CIFAR_MEAN, (0.2, 0.0, 0.2))), "positive"),
        (lambda: models.build("resnet20", CIFAR, 10, normalization=0.5), r"\(mean, std\)"),
    ],
)
def test_bad_arguments_raise_mskd_error(call, message):
    with pytest.raises(MskdError, match=message):
        call()


@pytest.mark.slow
def test_option_a_resnet_converts_to_float_and_int8_tflite(tmp_path):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    model = models.build("resnet20", CIFAR, 10, normalization=(CIFAR_MEAN, CIFAR_STD), width=0.5)
    images = _images(CIFAR, count=8, seed=1)
    # Train-mode BN statistics of a few batches make the int8 ranges realistic.
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, np.arange(8) % 10, batch_size=4, epochs=1, verbose=0)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)

    def run(flatbuffer, sample):
        interpreter = Interpreter(model_content=flatbuffer)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            sample = np.round(sample / scale + zero).astype(np.int8)
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])[0].astype("float32")
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            result = (result - zero) * scale
        return result

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"))
    float_model = converter.convert()
    np.testing.assert_allclose(run(float_model, images[0]), expected[0], rtol=1e-4, atol=1e-4)

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    int8_model = converter.convert()
    spread = float(np.ptp(expected[0]))
    # Measured: about 1% of the logit range; 5% leaves room for other random weights.
    assert np.max(np.abs(run(int8_model, images[0]) - expected[0])) < 0.05 * spread
