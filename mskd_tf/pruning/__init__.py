"""Structured channel pruning for Keras 3 functional models.

``build_graph`` finds which channels are coupled, ``plan_keep`` decides how many of each
group to keep, ``prune`` builds the slimmer functional model with sliced weights, and
``mask_channels`` zeroes the same channels in a same-shape copy (soft pruning).
"""

from mskd_tf.pruning.clone import prune
from mskd_tf.pruning.graph import ChannelGroup, ChannelRef, DependencyGraph, build_graph
from mskd_tf.pruning.layers import LayerHandler, register_handler
from mskd_tf.pruning.masking import mask_channels
from mskd_tf.pruning.plan import CostModel, Plan, plan_keep

__all__ = [
    "ChannelGroup", "ChannelRef", "CostModel", "DependencyGraph", "LayerHandler", "Plan",
    "build_graph", "mask_channels", "plan_keep", "prune", "register_handler",
]
