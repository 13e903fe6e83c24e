"""Shared builders and checks for the pruning tests (no tests of its own)."""

import keras
import numpy as np

from mskd_tf import flops
from mskd_tf.pruning import build_graph, mask_channels, plan_keep, prune

L = keras.layers


def toy_model(input_shape=(16, 16, 3), classes=10):
    """Every coupling kind in a few hundred MACs: residual Add, depthwise x2 + SE Multiply,
    Concatenate, option-A channel zero-pad shortcut, Flatten -> Dense."""
    inputs = keras.Input(input_shape, name="image")
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    y = L.Conv2D(8, 3, padding="same", name="res_conv")(x)
    y = L.BatchNormalization(name="res_bn")(y)
    x = L.ReLU(name="res_relu")(L.Add(name="res_add")([x, y]))
    z = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    z = L.BatchNormalization(name="dw_bn")(z)
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(z)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    z = L.Multiply(name="se_mul")([z, s])
    side = L.Conv2D(6, 1, name="side")(x)
    side = L.BatchNormalization(name="side_bn")(side)
    z = L.Concatenate(name="cat")([z, side])
    z = L.MaxPooling2D(4, name="pool")(z)  # 4x4x22
    # Option-A shortcut 22 -> 32 channels: zero channels 5 below and 5 above.
    sc = L.AveragePooling2D(1, strides=2, name="sc_pool")(z)
    sc = L.Reshape((4, 22, 1), name="sc_flat")(sc)
    sc = L.ZeroPadding2D(((0, 0), (5, 5)), name="sc_pad")(sc)
    sc = L.Reshape((2, 2, 32), name="sc_unflat")(sc)
    w = L.Conv2D(32, 3, strides=2, padding="same", name="wide")(z)
    w = L.BatchNormalization(name="wide_bn")(w)
    w = L.ReLU(name="wide_relu")(L.Add(name="wide_add")([w, sc]))
    f = L.Flatten(name="flat")(w)
    outputs = L.Dense(classes, name="classifier")(f)
    return keras.Model(inputs, outputs, name="toy")


def randomize_batchnorm(model, seed=0):
    """Non-trivial BN statistics, so a wrongly kept channel changes the outputs."""
    rng = np.random.default_rng(seed)
    values = {"gamma": lambda n: rng.uniform(0.5, 1.5, n), "beta": lambda n: rng.normal(0, 0.2, n),
              "moving_mean": lambda n: rng.normal(0, 0.2, n), "moving_variance": lambda n: rng.uniform(0.5, 1.5, n)}
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([values[w.name](w.shape[0]) for w in layer.weights])
    return model


def random_scores(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.uniform(0.1, 1.0, g.size) for g in graph.groups if g.prunable}


def check_pruning(model, input_shape, target_macs=0.5, seed=0, **plan_options):
    """Identity, masking equivalence and cost checks; returns the measured numbers."""
    randomize_batchnorm(model, seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (2, *input_shape)).astype("float32")
    graph = build_graph(model)
    reference = keras.ops.convert_to_numpy(model(x, training=False))

    identical = prune(model, {}, graph=graph)
    identity_diff = np.abs(keras.ops.convert_to_numpy(identical(x, training=False)) - reference).max()

    plan = plan_keep(graph, random_scores(graph, seed), target_macs=target_macs, **plan_options)
    pruned = prune(model, plan.keep, graph=graph)
    masked = mask_channels(model, plan.keep, graph=graph)
    out_pruned = keras.ops.convert_to_numpy(pruned(x, training=False))
    out_masked = keras.ops.convert_to_numpy(masked(x, training=False))
    relative = np.abs(out_pruned - out_masked).max() / (np.abs(out_masked).max() + 1e-12)
    changed = np.abs(out_masked - reference).max()
    return dict(graph=graph, plan=plan, pruned=pruned, cost=flops.count(pruned), identity_diff=identity_diff,
                relative=relative, changed=changed)
