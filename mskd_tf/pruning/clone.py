"""Build the slimmer model: same layers, names and configs except channel counts, sliced weights.

The functional graph is replayed with ``keras.models.clone_model``; each layer is re-created
from its config as its handler adjusts it (``filters``, ``units``, pad amounts, ...), then gets
its original weights sliced along the axes its handler names. Nested functional models are
cloned recursively on inputs of their pruned width.
"""

from __future__ import annotations

import keras
import numpy as np
from keras.src.saving.serialization_lib import SafeModeScope

from mskd_tf.errors import MskdError
from mskd_tf.pruning.graph import DependencyGraph, KeptChannels, build_graph, functional_of


def prune(model, keep, graph: DependencyGraph | None = None, skip=()):
    """Return a new functional model with only the kept channels.

    Args:
        model: the Keras functional (or Sequential) model to prune; it is not modified.
        keep: ``{group_id: kept group channel indices}`` (e.g. from ``plan_keep``); groups not
            listed keep every channel.
        graph: the model's :class:`DependencyGraph` if already built (saves rebuilding it).
        skip: layer names to treat as opaque when the graph is built here.

    Returns:
        A new ``keras.Model`` whose layers have the original names and configs except channel
        counts, holding the original weights sliced to the kept channels. It saves as
        ``.keras`` without custom objects.

    Raises:
        MskdError: a group id that does not exist, indices out of range, pruning a group
            that is not prunable, or a layer left with no channels.
    """
    graph = graph if graph is not None else build_graph(model, skip=skip)
    if graph.model is not model:
        raise MskdError("prune(): `graph` was built from a different model; pass graph=build_graph(model).")
    mask = graph.keep_mask(keep)
    for record in graph.records.values():
        for name, channel_map in record.maps.items():
            if len(channel_map.atoms) and not mask[graph.channel_of_atom[channel_map.atoms]].any():
                raise MskdError(f"keep removes every channel of layer {record.path!r} ({name}); "
                                "keep at least one channel per group.")
    created = []
    pruned = _clone(model, "", graph, mask, created, input_tensors=None)
    for record, new_layer in created:
        _set_sliced_weights(graph, record, new_layer, mask)
    return pruned


def _clone(model, prefix, graph, mask, created, input_tensors):
    def clone_layer(layer):
        path = prefix + layer.name
        record = graph.records.get(path)
        inner = functional_of(layer)
        if record is None and inner is not None:
            inputs = [
                keras.Input(batch_shape=tuple(t.shape[:-1]) + (_kept_count(graph, mask, t),), dtype=t.dtype)
                for t in inner.inputs
            ]
            return _clone(layer, path + "/", graph, mask, created, inputs if len(inputs) > 1 else inputs[0])
        config = layer.get_config()
        if record is not None:
            config = record.handler.configure(layer, config, KeptChannels(graph, record, mask))
        with SafeModeScope(not isinstance(layer, keras.layers.Lambda)):  # a user-skipped Lambda
            new_layer = layer.__class__.from_config(config)
        if record is not None:
            created.append((record, new_layer))
        return new_layer

    return keras.models.clone_model(model, input_tensors=input_tensors, clone_function=clone_layer)


def _kept_count(graph, mask, tensor):
    channel_map = graph.tensor_maps[id(tensor)]
    return int(np.count_nonzero(mask[graph.channel_of_atom[channel_map.atoms]]))


def sliced_weights(graph, record, mask):
    """The layer's weights (numpy, in ``layer.weights`` order) sliced to the kept channels."""
    kept = KeptChannels(graph, record, mask)
    axes = record.handler.weight_axes(record.layer)
    arrays = []
    for weight in getattr(record.layer, "weights", []):
        array = np.asarray(weight.numpy())
        for axis, map_name in enumerate(axes.get(weight.name, ())):
            if map_name is not None:
                array = np.take(array, kept.positions(map_name), axis=axis)
        arrays.append(array)
    return arrays


def _set_sliced_weights(graph, record, new_layer, mask):
    arrays = sliced_weights(graph, record, mask)
    expected = [tuple(w.shape) for w in getattr(new_layer, "weights", [])]
    got = [a.shape for a in arrays]
    if expected != got:
        raise MskdError(f"layer {record.path!r} ({type(record.layer).__name__}): sliced weights {got} do not fit "
                        f"the pruned layer {expected}; its pruning handler is wrong, skip the layer.")
    if arrays:
        new_layer.set_weights(arrays)
