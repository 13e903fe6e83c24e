"""plan_keep(): ratios, global ranking, MACs targets, rounding, minimum widths, protection."""

import keras
import numpy as np
import pytest

from mskd_tf import flops, models
from mskd_tf.errors import MskdError
from mskd_tf.pruning import build_graph, plan_keep, prune
from pruning_helpers import L, random_scores


def _chain(widths=(16, 24, 32)):
    """Convs with no coupling: every group is one layer."""
    inputs = keras.Input((12, 12, 3))
    x = inputs
    for i, width in enumerate(widths):
        x = L.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="out")(x))


@pytest.fixture(scope="module")
def chain_graph():
    return build_graph(_chain())


@pytest.fixture(scope="module")
def resnet_graph():
    return build_graph(models.build("resnet20", (32, 32, 3), 10))


def test_uniform_ratio_keeps_the_top_scores_of_every_group(chain_graph):
    scores = random_scores(chain_graph, seed=3)
    plan = plan_keep(chain_graph, scores, keep_ratio=0.25, mode="uniform")
    assert plan.widths() == {"conv0": 4, "conv1": 6, "conv2": 8}
    for group_id, kept in plan.keep.items():
        np.testing.assert_array_equal(kept, np.sort(np.argsort(-scores[group_id])[: len(kept)]))


def test_global_ranking_uses_mean_normalised_scores(chain_graph):
    rng = np.random.default_rng(5)
    # Raw scales differ 100x between groups; normalisation makes them comparable.
    scores = {"conv0": rng.uniform(0, 1, 16) * 100, "conv1": rng.uniform(0, 1, 24), "conv2": rng.uniform(0, 1, 32) ** 3}
    plan = plan_keep(chain_graph, scores, keep_ratio=0.5, mode="global")
    pooled = np.concatenate([scores[g] / np.mean(np.abs(scores[g])) for g in ("conv0", "conv1", "conv2")])
    threshold = np.sort(pooled)[::-1][35]  # 36 = half of the 72 channels
    for group_id in ("conv0", "conv1", "conv2"):
        normalised = scores[group_id] / np.mean(np.abs(scores[group_id]))
        np.testing.assert_array_equal(plan.keep[group_id], np.flatnonzero(normalised >= threshold))


def test_per_layer_ratio_names_must_be_producers(chain_graph):
    with pytest.raises(MskdError, match="'bn2' is neither a group id nor a layer producing"):
        plan_keep(chain_graph, keep_ratio={"conv1": 0.5, "bn2": 0.25}, mode="uniform")


def test_per_layer_ratio_dict(chain_graph):
    plan = plan_keep(chain_graph, keep_ratio={"conv1": 0.5}, mode="uniform")
    assert plan.widths() == {"conv0": 16, "conv1": 12, "conv2": 32}


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.5, 0.3])
def test_macs_target_is_hit_within_one_percent_and_matches_flops(resnet_graph, mode, target):
    plan = plan_keep(resnet_graph, random_scores(resnet_graph, 1), target_macs=target, mode=mode)
    assert abs(plan.macs / (target * plan.base_macs) - 1) <= 0.01
    assert plan.base_macs == flops.count(resnet_graph.model).macs
    cost = flops.count(prune(resnet_graph.model, plan.keep, graph=resnet_graph))
    assert (cost.macs, cost.params) == (plan.macs, plan.params)


def test_round_to_minimum_width_and_protect(chain_graph):
    plan = plan_keep(chain_graph, random_scores(chain_graph), target_macs=0.4, round_to=8, protect=["conv2"])
    assert plan.widths()["conv2"] == 32
    assert all(width % 8 == 0 for width in plan.widths().values())
    plan = plan_keep(chain_graph, keep_ratio=0.05, mode="uniform", min_channels=3)
    assert plan.widths() == {"conv0": 3, "conv1": 3, "conv2": 3}
    plan = plan_keep(chain_graph, keep_ratio=0.05, mode="uniform", min_ratio=0.5)
    assert plan.widths() == {"conv0": 8, "conv1": 12, "conv2": 16}


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_round_to_holds_for_every_slice_of_a_coupled_residual_stream(resnet_graph, mode):
    # ResNet-20's option-A stream is one 64-channel group whose stage-1 / stage-2 layers produce
    # 16- / 32-channel slices; rounding only the group width left those slices at 7 and 17.
    plan = plan_keep(resnet_graph, random_scores(resnet_graph, 2), target_macs=0.5, mode=mode, round_to=8)
    checked = 0
    for group in resnet_graph.groups:
        for ref in group.producers if group.prunable else ():
            kept = np.isin(np.unique(ref.indices), plan.keep[group.id]).sum()
            assert kept % 8 == 0, (ref.layer, kept)
            checked += len(group.producers) > 1
    assert checked >= 10  # the stream's producers were among them
    assert abs(plan.macs / (0.5 * plan.base_macs) - 1) <= 0.05
    model = prune(resnet_graph.model, plan.keep, graph=resnet_graph)
    assert all(layer.filters % 8 == 0 for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


def _producer_widths(graph, plan):
    return {ref.layer: int(np.isin(np.unique(ref.indices), plan.keep[group.id]).sum())
            for group in graph.groups if group.prunable for ref in group.producers}


def test_a_uniform_plan_has_the_same_widths_whatever_the_ranking(resnet_graph):
    # Ranked over the whole option-A stream, one ranking kept 8 of stage 1's 16 channels and another 16:
    # two criteria's "uniform" ResNet-20s at 50% MACs had 133k and 168k params.
    plans = [plan_keep(resnet_graph, random_scores(resnet_graph, seed), target_macs=0.5, mode="uniform", round_to=8)
             for seed in (0, 1, 2)]
    widths = [_producer_widths(resnet_graph, plan) for plan in plans]
    assert widths[0] == widths[1] == widths[2]
    assert len({plan.params for plan in plans}) == 1
    assert any(not np.array_equal(plans[0].keep[g], plans[1].keep[g]) for g in plans[0].keep)  # channels differ
    # Every stage's slice of the stream keeps its share of the common ratio, not what the ranking left it.
    stream = {layer: width for layer, width in widths[0].items() if layer.endswith("conv2")}
    assert {stream[f"stage{s}_block1_conv2"] for s in (1, 2, 3)} == {16, 32, 56}


def test_unreachable_target_names_the_smallest_reachable_macs(chain_graph):
    smallest = plan_keep(chain_graph, keep_ratio=0.01, mode="uniform", min_channels=8)
    expected = f"smallest reachable is {smallest.macs / 1e6:.3f}M MACs"
    with pytest.raises(MskdError, match=expected.replace(".", r"\.")):
        plan_keep(chain_graph, target_macs=0.05, min_channels=8)


def test_coupled_producers_each_keep_their_minimum(resnet_graph):
    plan = plan_keep(resnet_graph, target_macs=0.2, min_channels=2)
    for group in resnet_graph.groups:
        for ref in group.producers if group.prunable else ():
            assert np.isin(np.unique(ref.indices), plan.keep[group.id]).sum() >= 2, ref.layer


def test_bad_arguments_are_errors(chain_graph):
    with pytest.raises(MskdError, match="exactly one of keep_ratio"):
        plan_keep(chain_graph, keep_ratio=0.5, target_macs=0.5)
    with pytest.raises(MskdError, match=r"keep_ratio=1\.5 must be in \(0, 1\]"):
        plan_keep(chain_graph, keep_ratio=1.5)
    with pytest.raises(MskdError, match=r"scores\['conv0'\] must be 16 finite numbers"):
        plan_keep(chain_graph, {"conv0": np.ones(3)}, keep_ratio=0.5)
    with pytest.raises(MskdError, match="protect: 'nope'"):
        plan_keep(chain_graph, keep_ratio=0.5, protect=["nope"])
    with pytest.raises(MskdError, match="mode='best'"):
        plan_keep(chain_graph, keep_ratio=0.5, mode="best")


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_round_to_uses_a_finer_power_of_two_in_narrow_groups(mode):
    # Rounded to 8, layers of 6 / 10 / 12 channels had one choice each (all, or 8): with the default round_to=8 a
    # tiny model could not reach a 50% target at all ("unreachable: the smallest reachable is 65.7%"). Their steps
    # are now 2 / 4 / 4; a layer of 16 or more keeps multiples of 8.
    graph = build_graph(_chain((6, 10, 12, 32)))
    plan = plan_keep(graph, random_scores(graph, 4), target_macs=0.5, mode=mode, round_to=8)
    widths = plan.widths()
    assert [widths[f"conv{i}"] % step for i, step in enumerate((2, 4, 4, 8))] == [0, 0, 0, 0], widths
    assert abs(plan.macs / (0.5 * plan.base_macs) - 1) <= 0.1, (widths, plan.macs_ratio)


def test_round_to_one_still_gives_exact_widths(chain_graph):
    plan = plan_keep(chain_graph, keep_ratio=0.3, mode="uniform", round_to=1)
    assert plan.widths() == {"conv0": 5, "conv1": 7, "conv2": 10}


def test_a_target_the_width_steps_cannot_hit_is_a_budget_never_exceeded():
    # Two 16-wide convs rounded to 8: the reachable MACs are 26% / 50% / 53% / 100% of the
    # original. These scores make the global threshold land on 53% and no single step gets
    # closer; the planner must cut under the target instead of shipping 6% over it.
    inputs = keras.Input((16, 16, 1))
    x = L.ReLU()(L.Conv2D(16, 3, padding="same", name="c0")(inputs))
    x = L.ReLU()(L.Conv2D(16, 3, padding="same", name="c1")(x))
    graph = build_graph(keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x))))
    scores = {"c0": np.ones(16), "c1": np.r_[np.full(8, 5.0), np.full(8, 0.01)]}
    for mode in ("global", "uniform"):
        plan = plan_keep(graph, scores, target_macs=0.5, mode=mode, round_to=8)
        assert plan.macs <= 0.5 * 1.01 * plan.base_macs, mode
        assert plan.widths() == {"c0": 8, "c1": 16}, mode  # the widest plan under the budget
