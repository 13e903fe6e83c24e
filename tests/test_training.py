"""Shared training helpers: fused BatchNorm runtime, compile settings, optimizer, NaN guard, augmentation."""

import inspect
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mskd_tf import data, training
from mskd_tf.errors import MskdError
from test_data import _crop_and_flip_of


@pytest.fixture
def fused_bn():
    """Run a test with the fused BatchNorm path on and restore the previous state afterwards."""
    before = training._RUNTIME["fused_batchnorm"]
    training.configure_runtime(fused_batchnorm=True)
    with training.fused_batchnorm():
        yield
    training.configure_runtime(fused_batchnorm=before)


def test_fused_batchnorm_only_inside_the_block_nested_threads_and_errors():
    import threading

    keras_call = keras.layers.BatchNormalization.call
    assert keras_call is training._ORIGINAL_BN_CALL  # nothing patched at import or by configure_runtime
    training.configure_runtime()
    assert keras.layers.BatchNormalization.call is keras_call
    with training.fused_batchnorm():
        assert keras.layers.BatchNormalization.call is training._batchnorm_call
        with training.fused_batchnorm():
            pass
        assert keras.layers.BatchNormalization.call is training._batchnorm_call  # the inner exit keeps it
    assert keras.layers.BatchNormalization.call is keras_call
    with pytest.raises(RuntimeError, match="boom"):
        with training.fused_batchnorm():
            raise RuntimeError("boom")
    assert keras.layers.BatchNormalization.call is keras_call and training._RUNTIME["depth"] == 0
    barrier = threading.Barrier(4)

    def worker():
        with training.fused_batchnorm():
            barrier.wait(timeout=10)  # all four inside at once
            assert keras.layers.BatchNormalization.call is training._batchnorm_call

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert keras.layers.BatchNormalization.call is keras_call and training._RUNTIME["depth"] == 0


def _bn_step(layer, x, fused):
    """One training-mode forward + backward of ``layer`` through a traced function."""
    training._RUNTIME["fused_batchnorm"] = fused

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.cos(y))  # a loss with a non-trivial gradient
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return y, grads

    y, grads = step(x)
    ops = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
    return y.numpy(), [g.numpy() for g in grads], layer.moving_mean.numpy(), layer.moving_variance.numpy(), ops


def _fresh_bn(channels, seed, **kwargs):
    layer = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    layer.build((None, 6, 6, channels))
    rng = np.random.default_rng(seed)
    layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
    layer.beta.assign(rng.normal(size=channels))
    layer.moving_mean.assign(rng.normal(size=channels))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return layer


def test_fused_batchnorm_matches_keras_in_training(fused_bn):
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (8, 6, 6, 5)).astype("float32"))
    fused = _bn_step(_fresh_bn(5, 1), x, fused=True)
    plain = _bn_step(_fresh_bn(5, 1), x, fused=False)
    assert "FusedBatchNormV3" in fused[4] and "FusedBatchNormV3" not in plain[4]
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-4, atol=1e-4)  # outputs
    for got, want in zip(fused[1], plain[1]):  # d/dx, d/dgamma, d/dbeta
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fused[2], plain[2], rtol=1e-5)  # moving mean
    # Moving variance uses the biased batch variance, as Keras 3 does (numpy reference).
    layer = _fresh_bn(5, 1)
    expected = 0.9 * layer.moving_variance.numpy() + 0.1 * x.numpy().var(axis=(0, 1, 2))
    np.testing.assert_allclose(fused[3], expected, rtol=1e-5)
    np.testing.assert_allclose(plain[3], expected, rtol=1e-5)


def test_fused_batchnorm_matches_keras_in_inference(fused_bn):
    layer = _fresh_bn(3, 2)
    x = np.random.default_rng(3).normal(size=(4, 6, 6, 3)).astype("float32")
    fused = layer(x, training=False).numpy()
    reference = (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    reference = reference * layer.gamma.numpy() + layer.beta.numpy()
    np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-5)
    frozen = _fresh_bn(3, 2)
    frozen.trainable = False  # frozen layers normalise with the moving statistics even in training mode
    np.testing.assert_allclose(frozen(x, training=True).numpy(), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frozen.moving_mean.numpy(), layer.moving_mean.numpy())


@pytest.mark.parametrize("kwargs, shape", [({"renorm": True}, (4, 6, 6, 3)), ({}, (4, 3)), ({"axis": 1}, (4, 3, 6, 6))])
def test_unfusable_batchnorm_keeps_keras_path(fused_bn, kwargs, shape):
    layer = keras.layers.BatchNormalization(**kwargs)
    x = tf.constant(np.random.default_rng(4).normal(size=shape).astype("float32"))
    layer.build(x.shape)
    graph = tf.function(lambda v: layer(v, training=True)).get_concrete_function(x).graph
    assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}
    axes = tuple(i for i in range(len(shape)) if i != (layer.axis % len(shape)))
    out = layer(x, training=True).numpy()
    reference = (x.numpy() - x.numpy().mean(axis=axes, keepdims=True)) / np.sqrt(
        x.numpy().var(axis=axes, keepdims=True) + layer.epsilon)
    if not kwargs.get("renorm"):
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def _tiny_convnet(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))


def test_fused_training_gives_the_same_model(fused_bn):
    """A few SGD steps with and without the fused path end at the same weights (numerics unchanged)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 64)
    weights = {}
    for fused in (True, False):
        training.configure_runtime(fused_batchnorm=fused)
        model = _tiny_convnet(seed=1)
        model.compile(training.make_optimizer("sgd", 0.05, total_steps=8, schedule="constant"),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), **training.compile_kwargs())
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights[fused] = model.get_weights()
    assert len(weights[True]) == len(weights[False])
    for got, want in zip(weights[True], weights[False]):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
    assert not np.allclose(weights[True][0], _tiny_convnet(seed=1).get_weights()[0])  # it did train


def test_configure_runtime_reports_and_validates():
    before = training._RUNTIME["fused_batchnorm"]
    try:
        settings = training.configure_runtime(fused_batchnorm=False)
        assert settings["fused_batchnorm"] is False and settings["intra_op_threads"] >= 0
        assert training.configure_runtime()["fused_batchnorm"] is True
        with pytest.raises(MskdError, match="intra_op_threads=-1"):
            training.configure_runtime(intra_op_threads=-1)
    finally:
        training.configure_runtime(fused_batchnorm=before)


def test_compile_kwargs_defaults_and_overrides():
    defaults = training.compile_kwargs()
    assert defaults == training.COMPILE_KWARGS and defaults["jit_compile"] is False
    assert training.compile_kwargs(steps_per_execution=3)["steps_per_execution"] == 3
    assert training.compile_kwargs() == defaults  # overrides do not leak into the shared defaults


def test_make_optimizer_schedule_and_errors():
    opt = training.make_optimizer("sgd", 0.1, total_steps=100, schedule="cosine")
    assert math.isclose(float(opt.learning_rate), 0.1, rel_tol=1e-6)
    rate = opt._learning_rate  # the schedule: half-way down a cosine is half the peak
    assert math.isclose(float(rate(50)), 0.05, rel_tol=1e-4)
    with pytest.raises(MskdError, match="optimizer='adam'"):
        training.make_optimizer("adam", 0.1, total_steps=10)
    with pytest.raises(MskdError, match="total_steps=0"):
        training.make_optimizer("sgd", 0.1, total_steps=0)


def test_default_weight_decay_is_the_momentum_sgd_equivalent_everywhere():
    # One default for the library functions and the CLI/API Config (the Config module stays keras-free).
    from mskd_tf import distill, selection
    from mskd_tf.config import Config

    assert training.DEFAULT_WEIGHT_DECAY == Config().weight_decay == 5e-3
    for function in (training.make_optimizer, distill.distill, selection.select):
        assert inspect.signature(function).parameters["weight_decay"].default == training.DEFAULT_WEIGHT_DECAY
    # Decoupled decay: one step at lr 0.1 shrinks a kernel by lr * wd, and leaves BatchNorm's gamma alone.
    opt = training.make_optimizer("sgd", 0.1, total_steps=10, schedule="constant", momentum=0.0)
    kernel, gamma = keras.Variable(np.ones(4, "float32"), name="kernel"), keras.Variable(np.ones(4, "float32"), name="gamma")
    opt.apply_gradients([(tf.zeros(4), kernel), (tf.zeros(4), gamma)])
    np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * 5e-3, rtol=1e-6)
    np.testing.assert_allclose(gamma.numpy(), 1.0)


def test_nan_guard_stops_and_names_the_stage():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    guard = training.NanGuard()
    x = np.array([[1.0, np.nan]] * 8, "float32")
    model.fit(x, np.ones(8), batch_size=4, epochs=3, verbose=0, callbacks=[guard])
    assert guard.bad_at is not None and guard.bad_at[1] == 0
    with pytest.raises(MskdError, match="teacher: the training loss became nan at batch 0"):
        guard.raise_if_tripped("teacher")


def test_pipeline_crops_differ_per_epoch_and_half_are_flipped():
    """Track every image through two epochs of train_pipeline: fresh crop/flip each time, about half flipped."""
    rng = np.random.default_rng(7)
    x = rng.integers(1, 256, (256, 8, 8, 1)).astype(np.uint8)  # no zeros: the padding shows
    arrays = data.Arrays(x, np.arange(256))  # the label identifies the image
    ds = data.train_pipeline(arrays, 32, augment=True, seed=11)
    epochs = []
    for _ in range(2):
        found = {}
        for images, labels in ds:
            for image, label in zip(images.numpy(), labels.numpy()):
                found[int(label)] = _crop_and_flip_of(x[label] / 255.0, image)
        epochs.append(found)
    assert all(v is not None for e in epochs for v in e.values()), "every image is a pad-4 crop of itself"
    changed = np.mean([epochs[0][i] != epochs[1][i] for i in range(256)])
    assert changed > 0.9  # 162 possible (crop, flip) outcomes: repeats are rare
    assert len({v[:2] for v in epochs[0].values()}) > 40  # crops differ between images
    assert 0.38 < np.mean([v[2] for v in epochs[0].values()]) < 0.62


def test_seeded_block_is_reproducible_and_gives_the_callers_generators_back():
    import random

    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.eager import context

    from mskd_tf.training import seeded

    tf.random.set_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), float(np.random.random()))
    random.seed(5)
    np.random.seed(5)
    draws = []
    for _ in range(2):
        with seeded(42):
            draws.append((random.random(), float(np.random.random()), float(keras.random.uniform(())),
                          keras.initializers.GlorotUniform()((2, 2)).numpy().tolist()))
    assert draws[0] == draws[1]
    assert (random.random(), float(np.random.random())) == expected
    assert context.global_seed() == 5
    with pytest.raises(ValueError), seeded(1):
        raise ValueError("restored on error too")
    assert context.global_seed() == 5
