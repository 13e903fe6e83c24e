"""Structured channel pruning for Keras 3 functional models.

``build_graph`` finds which channels are coupled, ``plan_keep`` decides how many of each
group to keep, ``prune`` builds the slimmer functional model with sliced weights.
"""

from mskd_tf.pruning.graph import ChannelGroup, ChannelRef, DependencyGraph, build_graph
from mskd_tf.pruning.layers import LayerHandler, register_handler

__all__ = ["ChannelGroup", "ChannelRef", "DependencyGraph", "LayerHandler", "build_graph", "register_handler"]
