"""Pruning criteria: known orders on hand-set weights, numpy references, coupling, artifacts, errors."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mskd_tf.errors import MskdError
from mskd_tf.pruning import build_graph, plan_keep, prune
from mskd_tf.pruning.candidates import build_candidates, jaccard, layer_widths, overlap_matrix
from mskd_tf.pruning import criteria as C
from mskd_tf.pruning.rankings import load_rankings, save_rankings

EPS32 = float(np.finfo(np.float32).eps)


def conv_net(filters=4, kernel=1, channels=2, size=8, batchnorm=True, name="net"):
    """input -> conv -> [BN] -> ReLU -> GAP -> Dense(3): one prunable group ``conv``."""
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(filters, kernel, use_bias=False, name="conv")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def set_kernel(model, kernel):
    layer = model.get_layer("conv")
    layer.kernel.assign(np.asarray(kernel, np.float32).reshape(layer.kernel.shape))


def dataset(x, y, batch=8):
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y.astype(np.int64))).batch(batch)


def normalised(values):
    values = np.asarray(values, np.float64)
    return values / np.mean(np.abs(values))


# --------------------------------------------------------------------------- data-free


def test_l1_l2_filter_scaled_by_ten_ranks_first():
    model = conv_net(filters=4, kernel=3, channels=3)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4))
    kernel /= np.sqrt(np.square(kernel).sum(axis=(0, 1, 2)))  # equal L2 norms
    kernel[..., 2] *= 10
    set_kernel(model, kernel)
    scores = C.rank(model, ["l1", "l2"])
    flat = kernel.reshape(-1, 4).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(scores["l1"]["conv"], normalised(np.abs(flat).sum(0)), rtol=1e-6)
    np.testing.assert_allclose(scores["l2"]["conv"], normalised(np.sqrt(np.square(flat).sum(0))), rtol=1e-6)
    for name in ("l1", "l2"):
        assert np.argmax(scores[name]["conv"]) == 2


def test_fpgm_filter_at_the_median_ranks_last():
    model = conv_net(filters=5, kernel=1, channels=2)
    points = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0], [0.2, 0.1]])  # last: near the median
    set_kernel(model, points.T)
    score = C.rank(model, "fpgm")["fpgm"]["conv"]
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1).sum(1)
    np.testing.assert_allclose(score, normalised(distances), rtol=1e-5)
    assert np.argmin(score) == 4
    # fpgm is not a norm: a small filter far from the median beats larger ones near it.
    points = np.array([[5.0, 5.0], [5.5, 5.0], [5.0, 5.5], [5.5, 5.5], [0.5, 0.0]])
    set_kernel(model, points.T)
    assert np.argmax(C.rank(model, "fpgm")["fpgm"]["conv"]) == 4
    assert np.argmin(C.rank(model, "l1")["l1"]["conv"]) == 4


def test_bn_gamma_orders_by_abs_gamma_and_falls_back_to_l1_without_bn():
    model = conv_net(filters=4)
    model.get_layer("bn").gamma.assign(np.array([0.1, -2.0, 0.5, 1.0], np.float32))
    score = C.rank(model, "bn_gamma")["bn_gamma"]["conv"]
    np.testing.assert_allclose(score, normalised([0.1, 2.0, 0.5, 1.0]), rtol=1e-6)
    assert list(np.argsort(-score)) == [1, 3, 2, 0]

    plain = conv_net(filters=4, batchnorm=False)
    set_kernel(plain, [[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0]])
    scores = C.rank(plain, ["bn_gamma", "l1"])
    np.testing.assert_allclose(scores["bn_gamma"]["conv"], scores["l1"]["conv"])


def test_random_is_seeded_per_group():
    model = conv_net(filters=16)
    first = C.rank(model, "random", seed=1)["random"]["conv"]
    again = C.rank(model, "random", seed=1)["random"]["conv"]
    other = C.rank(model, "random", seed=2)["random"]["conv"]
    np.testing.assert_array_equal(first, again)
    assert first.shape == (16,) and not np.allclose(first, other)


# --------------------------------------------------------------------------- data-driven


def relu_conv_reference(x, kernel):
    """relu(1x1 conv) in numpy: (B, H, W, C)."""
    return np.maximum(np.einsum("bhwi,io->bhwo", x, kernel), 0.0)


def test_apoz_channel_always_zero_scores_zero():
    model = conv_net(filters=3, batchnorm=False)
    kernel = np.array([[1.0, -1.0, 1.0], [-0.5, -1.0, 0.3]])  # channel 1 is negative on positive inputs
    set_kernel(model, kernel)
    rng = np.random.default_rng(1)
    x = rng.random((24, 8, 8, 2))
    scores = C.rank(model, ["apoz", "activation"], dataset(x, np.zeros(24)), num_batches=3)
    activations = relu_conv_reference(x, kernel)
    nonzero = (activations > 0).mean(axis=(0, 1, 2))
    assert nonzero[1] == 0 and 0 < nonzero[0] < 1  # the data has the property the test is about
    np.testing.assert_allclose(scores["apoz"]["conv"], normalised(nonzero), rtol=1e-5)
    np.testing.assert_allclose(scores["activation"]["conv"], normalised(activations.mean(axis=(0, 1, 2))),
                               rtol=1e-4)
    assert np.argmin(scores["apoz"]["conv"]) == 1


def test_taylor_matches_numpy_reference():
    model = conv_net(filters=4, batchnorm=False)
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(2, 4))
    set_kernel(model, kernel)
    head = model.get_layer("head")
    x = rng.normal(size=(20, 8, 8, 2))
    y = rng.integers(0, 3, size=20)
    scores = C.rank(model, "taylor", dataset(x, y, batch=8), num_batches=3)["taylor"]["conv"]

    # Numpy: a = relu(conv); logits = mean_hw(a) @ W + b; dCE/dlogits = softmax - onehot.
    weight, bias = (np.asarray(v, np.float64) for v in head.get_weights())
    a = relu_conv_reference(x, kernel)
    logits = a.mean(axis=(1, 2)) @ weight + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dlogits = probs - np.eye(3)[y]
    grad = np.broadcast_to((dlogits @ weight.T)[:, None, None, :] / 64, a.shape)
    reference = np.abs((a * grad).mean(axis=(1, 2))).mean(axis=0)
    np.testing.assert_allclose(scores, normalised(reference), rtol=1e-3)


def test_hrank_matches_numpy_matrix_rank():
    model = conv_net(filters=4, batchnorm=False)
    set_kernel(model, [[1.0, 0.0, -1.0, 1.0], [0.0, 1.0, -1.0, 1.0]])
    rng = np.random.default_rng(3)
    rank_one = rng.random((12, 8, 1)) @ rng.random((12, 1, 8))  # channel 0 maps have rank 1
    x = np.stack([rank_one, rng.random((12, 8, 8))], axis=-1)
    scores = C.rank(model, "hrank", dataset(x, np.zeros(12), batch=5), num_batches=3)["hrank"]["conv"]
    maps = relu_conv_reference(x, np.array([[1.0, 0.0, -1.0, 1.0], [0.0, 1.0, -1.0, 1.0]]))
    maps = np.moveaxis(maps.astype(np.float32), -1, 1).astype(np.float64)  # (B, C, H, W)
    ranks = np.linalg.matrix_rank(maps, rtol=8 * EPS32).mean(axis=0)
    np.testing.assert_allclose(ranks, [1, 8, 0, 8])  # the maps have the ranks the test is about
    np.testing.assert_allclose(scores, normalised(ranks), rtol=1e-6)


def test_group_without_activation_reads_its_last_per_channel_layer():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    model.get_layer("bn").beta.assign(np.array([0.0, 5.0, -1.0], np.float32))
    x = np.random.default_rng(6).normal(size=(16, 8, 8, 2)).astype(np.float32)
    score = C.rank(model, "activation", dataset(x, np.zeros(16)), num_batches=2)["activation"]["conv"]
    bn_out = keras.Model(model.inputs, model.get_layer("bn").output).predict(x, verbose=0)
    np.testing.assert_allclose(score, normalised(np.abs(bn_out).mean(axis=(0, 1, 2))), rtol=1e-4)


def test_data_driven_criteria_share_one_pass():
    model = conv_net(filters=4)
    x = np.random.default_rng(4).random((40, 8, 8, 2))
    reads = []

    def batches():
        for start in range(0, 40, 8):
            reads.append(start)
            yield x[start : start + 8].astype(np.float32), np.zeros(8, np.int64)

    C.rank(model, ["apoz", "activation", "taylor", "hrank", "l1"], batches(), num_batches=4)
    assert reads == [0, 8, 16, 24]


def test_max_samples_caps_a_criterion():
    model = conv_net(filters=2, batchnorm=False)
    set_kernel(model, np.eye(2))
    x = np.ones((16, 8, 8, 2))
    x[8:, ..., 0] = 5.0  # channel 0 is larger only in the second batch

    @C.register_criterion("test_first_batch_mean", needs_data=True, max_samples=8)
    def first_batch_mean(activation, gradient):
        return keras.ops.mean(activation, axis=(0, 1, 2))

    try:
        capped = C.rank(model, ["test_first_batch_mean", "activation"], dataset(x, np.zeros(16)), num_batches=2)
    finally:
        del C.REGISTRY["test_first_batch_mean"]
    np.testing.assert_allclose(capped["test_first_batch_mean"]["conv"], [1.0, 1.0])
    np.testing.assert_allclose(capped["activation"]["conv"], normalised([3.0, 1.0]))


# --------------------------------------------------------------------------- coupling


def residual_net():
    """Two convs coupled by Add: one group of 4 channels with two producers and two BNs."""
    inputs = keras.Input((8, 8, 2))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(4, 1, use_bias=False, name="conv_a")(inputs))
    b = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Conv2D(4, 1, use_bias=False, name="conv_b")(inputs))
    x = keras.layers.ReLU(name="relu")(keras.layers.Add(name="add")([a, b]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def test_coupled_group_gets_one_score_per_channel_from_normalised_layers():
    model = residual_net()
    kernel_a = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    kernel_b = 100 * np.array([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.5]])  # 100x larger, opposite order
    model.get_layer("conv_a").kernel.assign(kernel_a.reshape(1, 1, 2, 4).astype(np.float32))
    model.get_layer("conv_b").kernel.assign(kernel_b.reshape(1, 1, 2, 4).astype(np.float32))
    graph = build_graph(model)
    (group,) = [g for g in graph.groups if g.prunable]
    assert {r.layer for r in group.producers} == {"conv_a", "conv_b"}
    score = C.rank(model, "l1", graph=graph)["l1"][group.id]
    expected = (normalised(np.abs(kernel_a).sum(0)) + normalised(np.abs(kernel_b).sum(0))) / 2
    np.testing.assert_allclose(score, expected, rtol=1e-6)
    # Unnormalised, the 100x larger conv_b alone would decide (channel 0); normalised, both count.
    assert np.argmax(np.abs(kernel_a).sum(0) + np.abs(kernel_b).sum(0)) == 0 and np.argmax(score) == 3


def test_resnet20_option_a_group_scores_every_channel_once():
    from mskd_tf import models

    model = models.build("resnet20", (32, 32, 3), 10)
    graph = build_graph(model)
    scores = C.rank(model, ["l1", "bn_gamma", "random"], graph=graph)
    prunable = {g.id: g.size for g in graph.groups if g.prunable}
    for name, per_group in scores.items():
        assert {g: s.shape[0] for g, s in per_group.items()} == prunable, name
        assert all(np.all(np.isfinite(s)) for s in per_group.values())
    # The stem group couples 16/32/64-channel stages; every one of its 64 channels gets a score > 0.
    assert prunable["stem_conv"] == 64 and np.all(scores["l1"]["stem_conv"] > 0)
    # Per-layer widths of a plan are what the pruned clone's convolutions have.
    plan = plan_keep(graph, scores["l1"], keep_ratio=0.5, mode="uniform")
    widths = layer_widths(graph, plan.keep)
    clone = prune(model, plan.keep, graph=graph)
    assert widths == {name: clone.get_layer(name).filters for name in widths}
    assert widths["stage1_block1_conv2"] < widths["stage3_block1_conv2"]


# --------------------------------------------------------------------------- registry and errors


def test_the_criteria_flag_default_is_the_built_in_registry():
    from mskd_tf.config import ALL_CRITERIA  # a plain tuple, so the flags load without TensorFlow

    assert tuple(C.REGISTRY)[:len(ALL_CRITERIA)] == ALL_CRITERIA


def test_user_criterion_registered_with_decorator():
    model = conv_net(filters=3)
    set_kernel(model, [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])

    @C.register_criterion("test_negative_l1")
    def negative_l1(group, context):
        return C.aggregate(group, [(ref, -np.abs(f).sum(1)) for ref in group.producers
                                   for f in context.layer_weights(ref)])

    try:
        scores = C.rank(model, ["test_negative_l1", "l1"])
    finally:
        del C.REGISTRY["test_negative_l1"]
    np.testing.assert_allclose(scores["test_negative_l1"]["conv"], -scores["l1"]["conv"])
    assert list(scores) == ["test_negative_l1", "l1"]


def test_errors_name_the_problem():
    model = conv_net()
    with pytest.raises(MskdError, match="'taylor' is data-driven"):
        C.rank(model, ["l1", "taylor"])
    with pytest.raises(MskdError, match=r"unknown \['l3'\]"):
        C.rank(model, ["l3"])
    images_only = tf.data.Dataset.from_tensor_slices(np.zeros((8, 8, 8, 2), np.float32)).batch(4)
    with pytest.raises(MskdError, match=r"\['taylor'\] need labels"):
        C.rank(model, "taylor", images_only)
    with pytest.raises(MskdError, match="empty"):
        C.rank(model, "apoz", images_only.take(0))

    @C.register_criterion("test_wrong_shape")
    def wrong_shape(group, context):
        return np.ones(group.size + 1)

    try:
        with pytest.raises(MskdError, match="'test_wrong_shape' returned"):
            C.rank(model, "test_wrong_shape")
    finally:
        del C.REGISTRY["test_wrong_shape"]
    with pytest.raises(MskdError, match="needs_data"):
        C.register_criterion("x", needs_gradient=True)


# --------------------------------------------------------------------------- artifacts


def test_rankings_json_round_trip_atomic_and_checked(tmp_path):
    model = residual_net()
    graph = build_graph(model)
    rankings = C.rank(model, ["l1", "random"], graph=graph)
    path = tmp_path / "work" / "rankings.json"
    save_rankings(path, rankings, graph)
    assert os.listdir(path.parent) == ["rankings.json"]  # no temp file left behind
    payload = json.loads(path.read_text())
    (group_id,) = payload["groups"]
    assert {"conv_a", "conv_b", "bn_a", "bn_b", "relu"} <= set(payload["groups"][group_id]["layers"])
    loaded = load_rankings(path, graph)
    for name in rankings:
        np.testing.assert_allclose(loaded[name][group_id], rankings[name][group_id])

    other = build_graph(conv_net())
    with pytest.raises(MskdError, match="belongs to another model"):
        load_rankings(path, other)
    path.write_text("{not json")
    with pytest.raises(MskdError, match="not valid JSON"):
        load_rankings(path)
    with pytest.raises(MskdError, match="does not exist"):
        load_rankings(tmp_path / "missing.json")


def test_jaccard():
    assert jaccard({"a": [0, 1, 2], "b": [0]}, {"a": [1, 2, 3], "b": [0]}) == pytest.approx(3 / 5)
    assert jaccard({"a": [0, 1]}, {"a": [0, 1]}) == 1.0
    assert jaccard({"a": [0]}, {"b": [0]}) == 0.0  # same index, different group
    assert jaccard({}, {}) == 1.0


def test_candidates_at_one_target_with_table():
    model = residual_net()
    graph = build_graph(model)
    rankings = C.rank(model, ["l1", "random"], graph=graph)
    x = np.random.default_rng(5).random((16, 8, 8, 2)).astype(np.float32)
    y = np.argmax(model.predict(x, verbose=0), axis=1)  # the unpruned model scores 100%

    def accuracy(clone):
        return float(np.mean(np.argmax(clone.predict(x, verbose=0), axis=1) == y))

    candidates = build_candidates(model, rankings, target_macs=0.5, graph=graph, evaluate=accuracy)
    assert [c.criterion for c in candidates] == ["l1", "random"]
    for c in candidates:
        assert c.widths == {"conv_a": 2, "conv_b": 2} and c.model.count_params() < model.count_params()
        assert 0.0 <= c.accuracy <= 1.0
    from mskd_tf import flops

    from mskd_tf import report

    base = flops.count(model).macs
    rows = [dict(c.row(), macs_ratio=c.macs / base, val_acc_before_finetune=c.accuracy) for c in candidates]
    table = report.candidates_table(rows)
    assert "| l1 | " in table and "| random | " in table and "| 0.500 |" in table
    overlap = overlap_matrix({c.criterion: c.keep for c in candidates})
    assert overlap["l1"]["l1"] == 1.0 and "| l1 | 1.00 |" in report.overlap_table(overlap)


# --------------------------------------------------------------------------- trained model


@pytest.mark.slow
def test_criteria_disagree_on_a_trained_model():
    """A small CNN trained ~100 steps on Fashion-MNIST: criteria must keep different channels."""
    from tests.tiny_fashion import fashion_split

    x, y = fashion_split("train", 3200)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for i, filters in enumerate((16, 32, 32)):
        h = keras.layers.Conv2D(filters, 3, strides=2 if i else 1, padding="same", use_bias=False, name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"r{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # 100 steps
    graph = build_graph(model)
    rankings = C.rank(model, list(C.REGISTRY), dataset(x[:1024], y[:1024], batch=128), graph=graph,
                      num_batches=8)
    keeps = {name: plan_keep(graph, scores, keep_ratio=0.5, mode="uniform").keep
             for name, scores in rankings.items()}
    from mskd_tf import report

    print("\n" + report.overlap_table(overlap_matrix(keeps)))
    names = list(keeps)
    overlaps = {(a, b): jaccard(keeps[a], keeps[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    assert all(v < 1.0 for (a, b), v in overlaps.items() if {a, b} != {"l1", "l2"}), overlaps
    # Unrelated families disagree clearly; the random control overlaps near chance (1/3 at half kept).
    assert overlaps[("l1", "taylor")] < 0.9 and overlaps[("l1", "apoz")] < 0.9
    assert max(v for (a, b), v in overlaps.items() if "random" in (a, b)) < 0.75


def test_data_driven_criteria_read_a_nested_models_layers_as_in_the_flat_model():
    """A keras.applications-style backbone called as one layer: every data-driven criterion scores its channels
    exactly as it scores the same layers (same weights) in a flat model."""
    import keras

    from mskd_tf.pruning import build_graph
    from mskd_tf.pruning.criteria import REGISTRY, rank

    def body(x):
        x = keras.layers.Conv2D(8, 3, name="c1")(x)
        x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
        x = keras.layers.Conv2D(6, 3, name="c2")(x)
        return keras.layers.ReLU(name="r2")(keras.layers.BatchNormalization(name="b2")(x))

    keras.utils.set_random_seed(0)
    flat_in = keras.Input((10, 10, 3))
    flat = keras.Model(flat_in, keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(body(flat_in))))
    inner_in = keras.Input((10, 10, 3))
    backbone = keras.Model(inner_in, body(inner_in), name="backbone")
    outer_in = keras.Input((10, 10, 3))
    nested = keras.Model(outer_in, keras.layers.Dense(4, name="head")(
        keras.layers.GlobalAveragePooling2D()(backbone(outer_in))))
    nested.set_weights(flat.get_weights())
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 10, 10, 3)).astype(np.float32), rng.integers(0, 4, 16)) for _ in range(2)]
    criteria = [name for name, criterion in REGISTRY.items() if criterion.needs_data]
    assert {"activation", "apoz", "taylor", "hrank"} <= set(criteria)
    flat_scores = rank(flat, criteria, batches, graph=build_graph(flat), num_batches=2)
    nested_scores = rank(nested, criteria, batches, graph=build_graph(nested), num_batches=2)
    for criterion in criteria:
        assert set(nested_scores[criterion]) == {f"backbone/{g}" for g in flat_scores[criterion]}
        for group, values in flat_scores[criterion].items():
            np.testing.assert_allclose(nested_scores[criterion][f"backbone/{group}"], values, rtol=1e-5, atol=1e-7)
            assert np.ptp(values) > 0, (criterion, group)  # the channels are told apart, not all tied
