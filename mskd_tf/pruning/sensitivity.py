"""Measured layer sensitivity: what cutting one channel group alone costs, and the allocation that follows.

``uniform`` cuts every group alike; ``global`` compares raw scores across groups that are not on one scale. Here
each prunable group is cut *alone* to a few keep ratios under one criterion's ranking (in one copy of the model
whose cut channels' weights are zeroed: the pruned clone's function, traced once), its BatchNorm statistics are
re-estimated (``adapt``), and the KL divergence of its predictions from the model's on a few
calibration batches is that group's predicted loss at that ratio: the zero-cost signal that ranked trained
candidates best on CIFAR-10 ResNet-20 (BENCHMARKS.md). :func:`allocate` then lowers, one step of a 1/8 ladder at a
time, the group whose next step costs the least predicted loss per MAC saved, until the plan meets the MACs
target, and gives back steps that still fit. Nothing is trained.
"""

from __future__ import annotations

import numpy as np

from mskd_tf.errors import MskdError
from mskd_tf.pruning.masking import MaskedCopy
from mskd_tf.pruning.plan import plan_keep

RATIOS = (0.25, 0.5, 0.75)  # measured keep ratios; the loss between them is interpolated
LADDER = tuple(step / 8 for step in range(8, 0, -1))  # 1, 0.875, ..., 0.125: the allocation's steps


def _probabilities(model, images):
    from mskd_tf.training import forward_function, outputs_probabilities

    outputs = np.asarray(forward_function(model)(images), dtype=np.float64)
    if outputs_probabilities(model):
        return np.clip(outputs, 1e-12, 1.0)
    outputs = outputs - outputs.max(axis=-1, keepdims=True)
    exp = np.exp(outputs)
    return exp / exp.sum(axis=-1, keepdims=True)


def kl_divergence(reference, model, images) -> float:
    """Mean KL(reference || model) over the images, ``reference`` the reference model's probabilities."""
    mine = np.clip(_probabilities(model, images), 1e-12, 1.0)
    return float(np.mean(np.sum(reference * (np.log(np.clip(reference, 1e-12, 1.0)) - np.log(mine)), axis=-1)))


def measure(model, graph, scores, images, *, ratios=RATIOS, adapt=None, **plan_options) -> dict:
    """``{group id: {keep ratio: predicted loss}}`` for every prunable group, 1.0 -> 0.

    Args:
        model: the trained model (not modified); ``graph``: its dependency graph.
        scores: one criterion's ``{group id: channel scores}`` (which channels a cut removes).
        images: a float array of calibration images the KL divergence is measured on.
        ratios: keep ratios each group is cut to alone (rounded like any plan's widths).
        adapt: ``fn(model)`` run on each cut model first, e.g. BatchNorm re-estimation (it sees a copy of
            ``model`` with the cut channels' weights zeroed, which computes what the pruned clone computes).
        **plan_options: ``round_to``, ``min_channels``, ``protect`` ... as for ``plan_keep``.
    """
    reference = _probabilities(model, images)
    masked = MaskedCopy(model)
    sensitivity = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        curve = {1.0: 0.0}
        for ratio in ratios:
            plan = plan_keep(graph, scores, keep_ratio={group.id: ratio}, mode="uniform", **plan_options)
            kept = len(plan.keep.get(group.id, ()))
            if kept >= group.size:  # protected, or rounding keeps every channel: nothing to measure
                continue
            masked.cut({group.id: plan.keep[group.id]})
            if adapt is not None:
                adapt(masked.model)
            curve[kept / group.size] = kl_divergence(reference, masked.model, images)
        sensitivity[group.id] = curve
    return sensitivity


def predicted_loss(curve: dict, ratio: float) -> float:
    """The measured loss at ``ratio``, linear between measured ratios and beyond the lowest."""
    points = sorted(curve.items())
    ratios, losses = [p[0] for p in points], [p[1] for p in points]
    if len(points) == 1:
        return losses[0]
    if ratio <= ratios[0]:  # extrapolate along the lowest segment, never below the lowest measured loss
        slope = (losses[1] - losses[0]) / (ratios[1] - ratios[0])
        return max(losses[0], losses[0] + slope * (ratio - ratios[0]))
    return float(np.interp(ratio, ratios, losses))


def allocate(graph, scores, sensitivity, *, target_macs, tolerance=0.01, **plan_options):
    """The plan whose per-group keep ratios meet ``target_macs`` with the least summed predicted loss (greedy).

    Returns ``(plan, {group id: keep ratio})``. Raises :class:`MskdError` when even the lowest step of every group
    stays above the target.
    """
    def plan_for(ratios):
        return plan_keep(graph, scores, keep_ratio=ratios, mode="uniform", **plan_options)

    ratios = {group_id: 1.0 for group_id in sensitivity}
    current = plan_for(ratios)
    goal = target_macs * current.base_macs if target_macs <= 1 else float(target_macs)

    def lower(group_id):
        """The next ladder ratio below the group's that changes the plan (rounding can make steps equal), with it."""
        for ratio in (r for r in LADDER if r < ratios[group_id] - 1e-9):
            trial = plan_for({**ratios, group_id: ratio})
            if trial.macs < current.macs:
                return ratio, trial
        return None, None

    def step_cost(group_id, ratio):
        curve = sensitivity[group_id]
        return predicted_loss(curve, ratio) - predicted_loss(curve, ratios[group_id])

    while current.macs > goal * (1 + tolerance):
        best = None
        for group_id in ratios:
            ratio, trial = lower(group_id)
            if ratio is None:
                continue
            value = max(step_cost(group_id, ratio), 0.0) / (current.macs - trial.macs)
            if best is None or value < best[0]:
                best = (value, group_id, ratio, trial)
        if best is None:
            raise MskdError(f"sensitivity allocation: cutting every group as far as its minimum width allows leaves "
                            f"{current.macs} MACs, above the target {goal:.0f}; raise the target or lower "
                            "--min_channels / --round_to.")
        _, group_id, ratio, current = best
        ratios[group_id] = ratio
    # Give back the steps that still fit under the target, the most loss saved (most negative cost) first.
    raise_to = {group_id: min(1.0, ratio + 1 / 8) for group_id, ratio in ratios.items() if ratio < 1.0}
    for group_id in sorted(raise_to, key=lambda g: step_cost(g, raise_to[g])):
        raised = raise_to[group_id]
        trial = plan_for({**ratios, group_id: raised})
        if trial.macs <= goal * (1 + tolerance):
            ratios[group_id], current = raised, trial
    return current, ratios
