"""Formulations of a MobileNet step's depthwise and BatchNorm + ReLU6 work, timed on the model's own shapes.

Each lever computes the same values as the layer Keras builds (checked here, outputs and gradients); blocks of
the formulations alternate so they share the machine's load, and each pair gives a ratio to the baseline.

  depthwise (forward + input and filter gradients, batch ``--batch_size``) over every DepthwiseConv2D of the model:
    native    tf.nn.depthwise_conv2d (what keras.layers.DepthwiseConv2D runs)
    grouped   tf.nn.conv2d with groups = channels (oneDNN's grouped convolution)
    xla       the native op in a jit_compile'd function
    nchw      the native op on channels-first tensors (transposes not timed)
  BatchNorm (training) + ReLU6, forward + gradients, on the model's largest such tensor:
    fused     FusedBatchNormV3 + Relu6 (what mskd_tf's training runs)
    xla       the same ops jit_compile'd (XLA fuses them into loops)
  plus ``copy`` (x * 2) on that tensor: the memory bandwidth every one of these is bounded by.

    .venv/bin/python benchmarks/depthwise_levers.py --model=mobilenet_v2 --width=0.5
"""

from __future__ import annotations

import os
import statistics
import time

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "mobilenet_v2", "mskd_tf.models.build name.")
flags.DEFINE_float("width", 0.5, "Width multiplier.")
flags.DEFINE_integer("batch_size", 128, "Batch of every timed call.")
flags.DEFINE_integer("pairs", 5, "Alternating rounds over the formulations.")
flags.DEFINE_integer("repeats", 5, "Calls per block (the block's figure is their mean).")
flags.DEFINE_bool("xla", True, "Include the XLA formulations (slow: each block takes seconds).")


def depthwise_shapes(model):
    import keras

    return [(tuple(layer.input.shape[1:]), tuple(layer.strides), layer.kernel_size)
            for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]


def gradients_of(op):
    import tensorflow as tf

    def run(x, w, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = op(x, w)
        return tape.gradient(y, [x, w], output_gradients=dy)

    return run


def depthwise_formulations(shape, strides, kernel):
    """{name: (tf.function(x, w, dy) -> gradients, arguments)} for one layer's shape."""
    import tensorflow as tf

    height, width, channels = shape
    batch = FLAGS.batch_size
    x = tf.random.normal([batch, height, width, channels], seed=1)
    w = tf.random.normal([*kernel, channels, 1], seed=2)
    y_shape = tf.nn.depthwise_conv2d(x, w, [1, *strides, 1], "SAME").shape
    dy = tf.random.normal(y_shape, seed=3)
    step = [1, *strides, 1]
    native = lambda x, w: tf.nn.depthwise_conv2d(x, w, step, "SAME")  # noqa: E731
    grouped = lambda x, w: tf.nn.conv2d(x, tf.reshape(w, [*kernel, 1, channels]), step, "SAME")  # noqa: E731
    nchw = lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, *strides], "SAME", data_format="NCHW")  # noqa: E731
    to_nchw = lambda t: tf.transpose(t, [0, 3, 1, 2])  # noqa: E731
    variants = {
        "native": (tf.function(gradients_of(native)), (x, w, dy)),
        "grouped": (tf.function(gradients_of(grouped)), (x, w, dy)),
        "nchw": (tf.function(gradients_of(nchw)), (to_nchw(x), w, to_nchw(dy))),
    }
    if FLAGS.xla:
        variants["xla"] = (tf.function(gradients_of(native), jit_compile=True), (x, w, dy))
    return variants


def batchnorm_formulations(shape):
    import tensorflow as tf

    x = tf.random.normal([FLAGS.batch_size, *shape], seed=4)
    gamma, beta = tf.ones([shape[-1]]), tf.zeros([shape[-1]])
    dy = tf.random.normal(x.shape, seed=5)

    def bn_relu6(x, gamma, beta):
        y, *_ = tf.raw_ops.FusedBatchNormV3(x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                                            epsilon=1e-3, exponential_avg_factor=1.0, data_format="NHWC",
                                            is_training=True)
        return tf.nn.relu6(y)

    def gradients(x, gamma, beta, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = bn_relu6(x, gamma, beta)
        return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    variants = {"fused": (tf.function(gradients), (x, gamma, beta, dy)),
                "copy": (tf.function(lambda x: x * 2.0), (x,))}
    if FLAGS.xla:
        variants["xla"] = (tf.function(gradients, jit_compile=True), (x, gamma, beta, dy))
    return variants


def block_ms(function, arguments):
    start = time.perf_counter()
    for _ in range(FLAGS.repeats):
        outputs = function(*arguments)
    [t.numpy() for t in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    return 1000 * (time.perf_counter() - start) / FLAGS.repeats


def check_same(variants, reference="native"):
    """Every formulation's gradients equal the reference's up to float rounding (layouts converted back)."""
    import numpy as np

    base = [t.numpy() for t in variants[reference][0](*variants[reference][1])]
    for name, (function, arguments) in variants.items():
        got = [t.numpy() for t in function(*arguments)]
        if name == "nchw":
            got[0] = got[0].transpose(0, 2, 3, 1)
        for b, g in zip(base, got):
            scale = max(float(np.abs(b).max()), 1e-12)
            if float(np.abs(b - g).max()) / scale > 1e-4:
                raise AssertionError(f"{name} differs from {reference} by {float(np.abs(b - g).max()) / scale:.2e}")


def measure(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mskd_tf import models

    model = models.build(FLAGS.model, (32, 32, 3), 10, width=FLAGS.width)
    layers = [depthwise_formulations(*spec) for spec in depthwise_shapes(model)]
    for variants in layers:
        check_same(variants)
        for function, arguments in variants.values():  # trace and warm up
            function(*arguments)
    names = list(layers[0])
    totals = {name: [] for name in names}
    for _ in range(FLAGS.pairs):
        for name in names:
            totals[name].append(sum(block_ms(*variants[name]) for variants in layers))
    print(f"depthwise, forward + gradients over {len(layers)} layers, batch {FLAGS.batch_size} (ms per step):")
    summary = {"depthwise": {}, "batchnorm_relu6": {}}
    for name, values in totals.items():
        ratios = [v / b for v, b in zip(values, totals["native"])]
        summary["depthwise"][name] = {"ms": values, "over_native": ratios}
        print(f"  {name:8s} {statistics.median(values):8.1f} ms   x native {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")

    largest = max((tuple(layer.output.shape[1:]) for layer in model.layers if type(layer).__name__ == "ReLU"),
                  key=lambda s: s[0] * s[1] * s[2])
    variants = batchnorm_formulations(largest)
    for function, arguments in variants.values():
        function(*arguments)
    times = {name: [] for name in variants}
    for _ in range(FLAGS.pairs):
        for name, (function, arguments) in variants.items():
            times[name].append(block_ms(function, arguments))
    megabytes = FLAGS.batch_size * largest[0] * largest[1] * largest[2] * 4 / 1e6
    print(f"BatchNorm (training) + ReLU6, forward + gradients, on {FLAGS.batch_size} x {largest} "
          f"({megabytes:.0f} MB per tensor):")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times["fused"])]
        summary["batchnorm_relu6"][name] = {"ms": values, "over_fused": ratios}
        print(f"  {name:8s} {statistics.median(values):8.2f} ms   x fused {statistics.median(ratios):.2f}")
    copy_gbps = 2 * megabytes / statistics.median(times["copy"])
    print(f"  copy moves {copy_gbps:.1f} GB/s (read + write); fused BatchNorm + ReLU6 costs "
          f"{statistics.median(times['fused']) / statistics.median(times['copy']):.1f} copies")
    results_io.write_results(f"depthwise_levers_{FLAGS.model}_w{FLAGS.width:g}", {
        "model": FLAGS.model, "width": FLAGS.width, "batch_size": FLAGS.batch_size, "pairs": FLAGS.pairs,
        "depthwise_layers": [list(map(list, spec[:2])) for spec in depthwise_shapes(model)],
        "batchnorm_shape": list(largest), "copy_gb_per_s": copy_gbps, **summary})


if __name__ == "__main__":
    app.run(measure)
