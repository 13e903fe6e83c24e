"""Channel dependency graph: couplings, index maps, errors for what it cannot analyse."""

import keras
import numpy as np
import pytest

from mskd_tf.errors import MskdError
from mskd_tf.pruning import build_graph, prune
from pruning_helpers import L, toy_model


@pytest.fixture(scope="module")
def toy_graph():
    return build_graph(toy_model())


def _ref(refs, layer):
    (ref,) = [r for r in refs if r.layer == layer]
    return ref


def test_groups_of_the_toy_model(toy_graph):
    sizes = {g.id: (g.size, g.prunable) for g in toy_graph.groups}
    # stem, the residual conv, SE expand, the concatenated side conv and the wide conv are one
    # coupled group: 8 (stem) + 6 (side) + 10 zero-padded channels that exist only in "wide".
    assert sizes == {"stem": (24, True), "se_reduce": (4, True), "classifier": (10, False)}
    assert toy_graph.group("classifier").reason == "model output"
    stem = toy_graph.group("stem")
    assert {r.layer for r in stem.producers} == {"stem", "res_conv", "se_expand", "side", "wide"}
    assert {r.layer for r in stem.batchnorms} == {"stem_bn", "res_bn", "dw_bn", "side_bn", "wide_bn"}
    assert {r.layer for r in stem.activations} == {"stem_relu", "res_relu", "wide_relu"}
    assert {r.layer for r in stem.consumers} == {"res_conv", "se_reduce", "side", "wide", "classifier"}


def test_index_maps_follow_depthwise_concat_zero_pad_and_flatten(toy_graph):
    stem = toy_graph.group("stem")
    stem_idx = _ref(stem.producers, "stem").indices
    side_idx = _ref(stem.producers, "side").indices
    wide_idx = _ref(stem.producers, "wide").indices
    np.testing.assert_array_equal(_ref(stem.producers, "res_conv").indices, stem_idx)  # residual Add
    np.testing.assert_array_equal(_ref(stem.producers, "se_expand").indices, np.repeat(stem_idx, 2))  # SE x dw
    # wide's channels 5..26 are the padded shortcut: depthwise pairs of stem, then side.
    np.testing.assert_array_equal(wide_idx[5:27], np.concatenate([np.repeat(stem_idx, 2), side_idx]))
    assert len(set(wide_idx[:5]) | set(wide_idx[27:]) | set(stem_idx) | set(side_idx)) == 24
    flat = _ref(stem.consumers, "classifier")  # Flatten of 2x2x32: position s*32 + c
    np.testing.assert_array_equal(flat.indices, np.tile(wide_idx, 4))
    np.testing.assert_array_equal(flat.positions, np.arange(128))
    dw = _ref(stem.channelwise, "dw")
    np.testing.assert_array_equal(dw.indices, np.repeat(stem_idx, 2))


def test_zero_pad_amounts_become_kept_counts_below_and_above(toy_graph):
    wide_idx = _ref(toy_graph.group("stem").producers, "wide").indices
    below, above = set(wide_idx[:5].tolist()), set(wide_idx[27:].tolist())
    removed = sorted(below)[:2] + sorted(above)[:1] + [int(wide_idx[5])]  # and one real shortcut channel
    keep = {"stem": np.setdiff1d(np.arange(24), removed)}
    pruned = prune(toy_graph.model, keep, graph=toy_graph)
    assert pruned.get_layer("sc_pad").get_config()["padding"] == ((0, 0), (3, 4))
    assert pruned.get_layer("sc_flat").get_config()["target_shape"] == (4, 20, 1)  # 22 - depthwise pair
    assert pruned.get_layer("sc_unflat").get_config()["target_shape"] == (2, 2, 27)
    assert pruned.get_layer("wide").get_config()["filters"] == 27


def test_grouped_conv_couples_ranks_across_conv_groups():
    inputs = keras.Input((8, 8, 8))
    x = L.Conv2D(8, 1, name="a")(inputs)
    x = L.Conv2D(12, 3, groups=4, name="grouped")(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(L.GlobalAveragePooling2D()(x)))
    graph = build_graph(model)
    a, grouped = graph.group("a"), graph.group("grouped")
    assert (a.size, grouped.size) == (2, 3)  # 8 inputs = 4 groups x 2 ranks; 12 filters = 4 x 3
    np.testing.assert_array_equal(_ref(a.producers, "a").indices, np.tile([0, 1], 4))
    pruned = prune(model, {"a": [1], "grouped": [0, 2]}, graph=graph)
    assert tuple(pruned.get_layer("grouped").kernel.shape) == (3, 3, 1, 8)
    assert tuple(pruned.get_layer("a").kernel.shape) == (1, 1, 8, 4)


def test_conv_with_one_channel_per_group_is_depthwise():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 1, name="a")(inputs)
    x = L.Conv2D(12, 3, groups=6, name="dw_like")(x)  # ConvNeXt's depthwise, multiplier 2
    model = keras.Model(inputs, L.Dense(3, name="out")(L.GlobalAveragePooling2D()(x)))
    graph = build_graph(model)
    assert [g.id for g in graph.groups] == ["a", "out"]
    assert graph.group("a").size == 6 and [r.layer for r in graph.group("a").channelwise] == ["dw_like"]
    pruned = prune(model, {"a": [0, 4, 5]}, graph=graph)
    assert pruned.get_layer("dw_like").get_config()["groups"] == 3
    np.testing.assert_array_equal(pruned.get_layer("dw_like").kernel.numpy(),
                                  model.get_layer("dw_like").kernel.numpy()[..., [0, 1, 8, 9, 10, 11]])


def test_nested_functional_model_and_sequential_are_walked():
    block_in = keras.Input((8, 8, 6))
    block = keras.Model(block_in, L.ReLU(name="inner_relu")(L.Conv2D(5, 3, padding="same", name="inner")(block_in)),
                        name="block")
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="outer")(inputs)
    x = block(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(x)))
    graph = build_graph(model)
    assert {g.id for g in graph.groups} == {"outer", "block/inner", "out"}
    assert _ref(graph.group("outer").consumers, "block/inner").map == "in"
    pruned = prune(model, {"outer": [0, 2, 4], "block/inner": [1, 3]}, graph=graph)
    inner = pruned.get_layer("block").get_layer("inner")
    assert tuple(inner.kernel.shape) == (3, 3, 3, 2)
    np.testing.assert_allclose(inner.kernel.numpy(), block.get_layer("inner").kernel.numpy()[:, :, [0, 2, 4]][..., [1, 3]])

    sequential = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="c"), L.ReLU(), L.Flatten(),
                                   L.Dense(2, name="d")])
    graph = build_graph(sequential)
    pruned = prune(sequential, {"c": [0, 3]}, graph=graph)
    assert tuple(pruned.get_layer("d").kernel.shape) == (36 * 2, 2)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = L.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


class Scale(L.Layer):
    def call(self, x):
        return x * 2.0


def test_subclassed_model_is_rejected_with_how_to_fix():
    model = Subclassed()
    model(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(MskdError, match=r"Subclassed.*subclassed.*keras\.Model\(inputs, outputs\)"):
        build_graph(model)


@pytest.mark.parametrize("layer, pattern", [
    (L.Lambda(lambda t: t * 2.0, name="twice"), r"'twice' is a Lambda layer.*skip=\['twice'\]"),
    (Scale(name="scale"), r"'scale' of class .*Scale has no pruning handler.*skip=\['scale'\].*register_handler"),
])
def test_opaque_layers_are_named_and_can_be_skipped(layer, pattern):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="before")(inputs)
    x = layer(x)
    x = L.Conv2D(6, 3, name="after")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(MskdError, match=pattern):
        build_graph(model)
    graph = build_graph(model, skip=[layer.name])
    before = graph.group("before")
    assert not before.prunable and "skipped layer" in before.reason
    assert graph.group("after").prunable  # channels behind the opaque layer still prune
    pruned = prune(model, {"after": [0, 5]}, graph=graph)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    expected = model.get_layer("after").kernel.numpy()[..., [0, 5]]
    np.testing.assert_allclose(pruned.get_layer("after").kernel.numpy(), expected)
    assert pruned(x).shape == (2, 2)


def test_unknown_skip_name_and_bad_keep_are_errors(toy_graph):
    with pytest.raises(MskdError, match=r"skip names \['nope'\]"):
        build_graph(toy_graph.model, skip=["nope"])
    with pytest.raises(MskdError, match=r"'classifier' is not prunable \(model output\)"):
        toy_graph.keep_mask({"classifier": [0, 1]})
    with pytest.raises(MskdError, match=r"outside 0\.\.23"):
        toy_graph.keep_mask({"stem": [24]})
    with pytest.raises(MskdError, match=r"removes every channel of layer 'se_reduce'"):
        prune(toy_graph.model, {"se_reduce": []}, graph=toy_graph)
