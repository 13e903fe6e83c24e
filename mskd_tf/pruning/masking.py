"""Soft pruning: a same-shape copy of the model whose removed channels output zero.

Zeroing the removed channels' producer filters and biases, and the gamma, beta and moving mean
of every per-channel layer on them (BatchNormalization, LayerNormalization, depthwise bias), makes each
removed channel 0 after its normalisation, and 0 stays 0 through ReLU/swish/pooling/products.
The masked model then computes what the pruned model computes: ``tests`` use it to prove that
``prune`` kept the right weights, and a sensitivity criterion can use it to try a removal
without rebuilding the model. Not exact when a removed channel's only producers end in an
activation with f(0) != 0 (sigmoid) that feeds a layer other than a product.
"""

from __future__ import annotations

import numpy as np

from mskd_tf.keras_utils import copy_with_weights
from mskd_tf.pruning.graph import DependencyGraph, build_graph

# Zeroed too on removed channels: a BN without gamma (scale=False, Inception) maps the zero
# input of a removed channel to 0 only if its moving mean is 0 as well.
_KEEP_AS_IS = frozenset({"moving_variance", "variance", "count", "mean"})


def mask_channels(model, keep, graph: DependencyGraph | None = None):
    """Copy of ``model`` (same shapes) in which the channels not in ``keep`` contribute zero.

    Args:
        model: functional model (not modified).
        keep: ``{group_id: kept indices}`` as for :func:`mskd_tf.pruning.prune`.
        graph: its dependency graph, if already built.

    Returns:
        A cloned ``keras.Model`` with the original weights, removed channels zeroed.
    """
    graph = graph if graph is not None else build_graph(model)
    mask = graph.keep_mask(keep)
    masked = copy_with_weights(model)
    for record in graph.records.values():
        if record.handler.role(record.layer) not in ("producer", "channelwise"):
            continue
        axes = record.handler.weight_axes(record.layer)
        removed = np.flatnonzero(~mask[graph.channel_of_atom[record.maps["out"].atoms]])
        if not removed.size:
            continue
        layer = _find(masked, record.path)
        arrays = []
        for weight in layer.weights:
            array = np.array(weight.numpy())
            for axis, map_name in enumerate(axes.get(weight.name, ())):
                if map_name == "out" and weight.name not in _KEEP_AS_IS:
                    index = [slice(None)] * array.ndim
                    index[axis] = removed
                    array[tuple(index)] = 0.0
            arrays.append(array)
        layer.set_weights(arrays)
    return masked


def _find(model, path):
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


__all__ = ["mask_channels"]
