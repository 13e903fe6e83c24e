"""Candidates: one pruned clone per ranking at one MACs target, and how much their kept channels overlap.

The algorithm side of MS-KD's pruning (the criteria that score channels live in
:mod:`mskd_tf.pruning.criteria`): each ranking is cut to the target by
:func:`~mskd_tf.pruning.plan.plan_keep` and cloned by :func:`~mskd_tf.pruning.clone.prune`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mskd_tf import flops
from mskd_tf.pruning.clone import prune
from mskd_tf.pruning.graph import build_graph
from mskd_tf.pruning.plan import plan_keep


@dataclasses.dataclass
class Candidate:
    """One slimmer clone: the ranking it came from, its plan, cost and accuracy before fine-tuning."""

    criterion: str
    model: object
    keep: dict
    macs: int
    params: int
    widths: dict  # producer layer name -> output channels it keeps
    accuracy: float | None = None

    def row(self):
        """JSON-ready summary (no model)."""
        return {"criterion": self.criterion, "macs": self.macs, "params": self.params,
                "widths": self.widths, "accuracy": self.accuracy}


def build_candidates(model, rankings, *, target_macs, graph=None, evaluate=None, adapt=None, planner=None,
                     **plan_options):
    """One pruned clone per criterion, all at the same MACs target.

    Args:
        model: the model the rankings were computed on (not modified).
        rankings: ``{criterion: {group_id: scores}}`` from :func:`mskd_tf.pruning.criteria.rank`.
        target_macs: fraction of the model's MACs (or absolute MACs), see ``plan_keep``.
        graph: ``build_graph(model)`` if already built.
        evaluate: optional ``fn(clone) -> accuracy`` run on each clone before any fine-tuning.
        adapt: optional ``fn(clone)`` run on each clone first (e.g. BatchNorm recalibration).
        planner: optional ``fn(scores) -> Plan`` replacing ``plan_keep`` (e.g. the measured-sensitivity
            allocation, :func:`mskd_tf.pruning.sensitivity.allocate`).
        **plan_options: passed to ``plan_keep`` (``mode``, ``round_to``, ``min_channels``, ``protect``...).

    Returns:
        list of :class:`Candidate` in the order of ``rankings``; MACs and params are those of
        ``flops.count`` on the built clone.
    """
    graph = graph if graph is not None else build_graph(model)
    cost = flops.count(model)
    candidates = []
    for name, scores in rankings.items():
        plan = (planner(scores) if planner is not None
                else plan_keep(graph, scores, target_macs=target_macs, cost=cost, **plan_options))
        clone = prune(model, plan.keep, graph=graph)
        clone_cost = flops.count(clone)
        if adapt is not None:
            adapt(clone)
        accuracy = float(evaluate(clone)) if evaluate is not None else None
        candidates.append(Candidate(name, clone, plan.keep, int(clone_cost.macs), int(clone_cost.params),
                                    layer_widths(graph, plan.keep), accuracy))
    return candidates


def layer_widths(graph, keep):
    """``{producer layer: output channels kept}`` over prunable groups, in graph order.

    Per layer, not per group: an option-A shortcut couples stages of different widths.
    """
    widths = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        kept = np.asarray(keep.get(group.id, np.arange(group.size)))
        for ref in group.producers:
            widths[ref.layer] = int(np.isin(ref.indices, kept).sum())
    return widths


def jaccard(keep_a, keep_b):
    """Overlap |A & B| / |A | B| of two keep dicts' kept channels (``(group, index)`` pairs, all groups).

    Groups missing from one dict count as keeping nothing there; two empty sets give 1.0.
    """
    def pairs(keep):
        return {(g, int(i)) for g, kept in keep.items() for i in np.asarray(kept).reshape(-1)}

    a, b = pairs(keep_a), pairs(keep_b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def overlap_matrix(keeps):
    """Pairwise :func:`jaccard` overlaps ``{a: {b: overlap}}`` of ``{criterion: keep dict}``.

    Rendered by :func:`mskd_tf.report.overlap_table`.
    """
    return {a: {b: jaccard(keeps[a], keeps[b]) for b in keeps} for a in keeps}
