"""Measured sensitivity: a group whose cut channels carry nothing costs nothing, and the allocation cuts it first."""

import keras
import numpy as np
import pytest

from mskd_tf.pruning import build_graph, plan_keep
from mskd_tf.pruning.criteria import rank
from mskd_tf.pruning.sensitivity import allocate, measure, predicted_loss
from pruning_helpers import L


def _model_with_dead_channels():
    """Three 16-channel convs; conv0's channels 8-15 output zeros, so cutting them changes nothing."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    x = inputs
    for i in range(3):
        x = L.Conv2D(16, 3, padding="same", name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    model = keras.Model(inputs, L.Dense(4, name="out")(L.GlobalAveragePooling2D()(x)))
    kernel, bias = model.get_layer("conv0").get_weights()
    kernel[..., 8:], bias[8:] = 0.0, 0.0
    model.get_layer("conv0").set_weights([kernel, bias])
    gamma, beta, mean, variance = model.get_layer("bn0").get_weights()
    gamma[8:], beta[8:], mean[8:] = 0.0, 0.0, 0.0
    model.get_layer("bn0").set_weights([gamma, beta, mean, variance])
    return model


def _group_of(graph, layer):
    return next(g.id for g in graph.groups if g.prunable and any(ref.layer == layer for ref in g.producers))


@pytest.fixture(scope="module")
def setup():
    model = _model_with_dead_channels()
    graph = build_graph(model)
    scores = rank(model, "l1", graph=graph)["l1"]
    images = np.random.default_rng(1).uniform(0, 1, (32, 10, 10, 3)).astype(np.float32)
    return model, graph, scores, measure(model, graph, scores, images, ratios=(0.5,), round_to=1)


def test_cutting_dead_channels_costs_nothing_and_live_ones_cost_something(setup):
    model, graph, _, sensitivity = setup
    dead, live = _group_of(graph, "conv0"), _group_of(graph, "conv2")
    assert set(sensitivity) == {g.id for g in graph.groups if g.prunable}
    assert sensitivity[dead][1.0] == 0.0 and sensitivity[dead][0.5] == pytest.approx(0.0, abs=1e-6)
    assert sensitivity[live][0.5] > 1e-4
    assert predicted_loss(sensitivity[live], 0.75) == pytest.approx(sensitivity[live][0.5] / 2)


def test_allocation_cuts_the_insensitive_group_first_and_meets_the_target(setup):
    _, graph, scores, sensitivity = setup
    target = plan_keep(graph, scores, keep_ratio={"conv0": 0.5}, mode="uniform", round_to=1).macs
    plan, ratios = allocate(graph, scores, sensitivity, target_macs=target, round_to=1)
    assert plan.macs <= target * 1.01
    assert ratios[_group_of(graph, "conv0")] == 0.5
    assert ratios[_group_of(graph, "conv1")] == ratios[_group_of(graph, "conv2")] == 1.0
    # The same MACs cut uniformly would cost predicted loss the measured allocation does not pay.
    uniform = plan_keep(graph, scores, target_macs=target, mode="uniform", round_to=1)
    assert uniform.macs <= target * 1.01
    assert len(uniform.keep[_group_of(graph, "conv2")]) < 16


def test_an_unreachable_target_is_refused(setup):
    _, graph, scores, sensitivity = setup
    from mskd_tf.errors import MskdError

    with pytest.raises(MskdError, match="sensitivity allocation: cutting every group as far as its minimum width allows leaves"):
        allocate(graph, scores, sensitivity, target_macs=10, round_to=1)


def test_a_cut_measured_on_the_zeroed_copy_is_the_pruned_clones_loss():
    """measure() zeroes the cut channels in one copy instead of building a clone per cut: through a residual add,
    a depthwise convolution and BatchNorm re-estimation, the loss it measures is the pruned clone's."""
    from mskd_tf.pruning import prune
    from mskd_tf.pruning.sensitivity import kl_divergence
    from mskd_tf.batchnorm import recalibrate_batchnorm

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    stem = L.ReLU(6.0)(L.BatchNormalization(name="bn_stem")(L.Conv2D(16, 3, padding="same", name="stem")(inputs)))
    x = L.ReLU(6.0)(L.BatchNormalization(name="bn_expand")(L.Conv2D(32, 1, name="expand")(stem)))
    x = L.ReLU(6.0)(L.BatchNormalization(name="bn_dw")(L.DepthwiseConv2D(3, padding="same", name="dw")(x)))
    x = L.BatchNormalization(name="bn_project")(L.Conv2D(16, 1, name="project")(x))
    x = L.Add()([stem, x])
    model = keras.Model(inputs, L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (24, 8, 8, 3)).astype(np.float32)
    for layer in model.layers:  # BatchNorm statistics far from the identity, so a wrong re-estimation shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    graph = build_graph(model)
    scores = rank(model, "l1", graph=graph)["l1"]
    batches = [(images[:12], None), (images[12:], None)]
    adapt = lambda m: recalibrate_batchnorm(m, batches, 2)  # noqa: E731
    sensitivity = measure(model, graph, scores, images, ratios=(0.5,), adapt=adapt, round_to=1)
    reference = keras.ops.convert_to_numpy(keras.ops.softmax(model(images)))
    for group in (g for g in graph.groups if g.prunable):
        plan = plan_keep(graph, scores, keep_ratio={group.id: 0.5}, mode="uniform", round_to=1)
        clone = prune(model, {group.id: plan.keep[group.id]}, graph)
        adapt(clone)
        assert sensitivity[group.id][0.5] == pytest.approx(kl_divergence(reference, clone, images), rel=1e-4,
                                                           abs=1e-7), group.id
    assert len(sensitivity) == 2  # the residual stream and the expansion (with its depthwise)
    assert all(curve[0.5] > 1e-4 for curve in sensitivity.values())
    np.testing.assert_array_equal(model.get_layer("expand").kernel.numpy() != 0, True)  # the model is not touched
