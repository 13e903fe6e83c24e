"""The data pass of the data-driven criteria: per-channel means over calibration batches.

One multi-output ``keras.Model`` (the probe) returns the model's first output and every
tapped feature map; ``tf.GradientTape`` gives the gradients of the loss w.r.t. those maps
only when a criterion needs them. Every data-driven criterion shares this one pass: each
is a per-batch function ``fn(activation, gradient) -> (C,)`` (see
:mod:`mskd_tf.pruning.criteria`), and its batch values are averaged, weighted by batch size.

Which tensors are tapped (:func:`tap_refs`): a group's activation layers (ReLU, ...), or, if
it has none, its last per-channel layer's output, else its producers' outputs.
"""

from __future__ import annotations

import functools
import itertools

import keras
import numpy as np

from mskd_tf.errors import MskdError
from mskd_tf.pruning.graph import functional_of
from mskd_tf.training import outputs_probabilities


def tap_refs(group):
    """Where to read a group's feature maps: activations, else last per-channel layer, else producers."""
    if group.activations:
        return group.activations
    if group.channelwise:
        last = group.channelwise[-1].layer
        return tuple(r for r in group.channelwise if r.layer == last)
    return group.producers


def channel_means(model, graph, groups, criteria, calibration, num_batches, loss):
    """Run the calibration batches once through ``model``, scoring every tapped tensor with every criterion.

    Args:
        model: the functional model ``graph`` was built from.
        graph: its dependency graph.
        groups: the groups whose tensors to tap (:func:`tap_refs`).
        criteria: registered data-driven criteria (``name``, ``fn``, ``needs_gradient``, ``max_samples``).
        calibration: iterable of ``(images, labels)`` batches (labels needed by gradient criteria only).
        num_batches: batches to read at most; a criterion stops early at its ``max_samples``.
        loss: ``loss(labels, outputs) -> per-sample losses`` for gradient criteria, or None for
            sparse cross-entropy (from logits, or probabilities for a softmax head).

    Returns:
        ``{criterion name: {tapped layer path: np.ndarray of the per-position mean over the samples seen}}``.
    """
    import tensorflow as tf  # the gradient tape; this project runs on the TF backend

    if int(num_batches) < 1:
        raise MskdError(f"num_batches={num_batches} must be >= 1.")
    taps = {}  # layer path -> index in the probe's tap outputs
    for group in groups:
        for ref in tap_refs(group):
            taps.setdefault(ref.layer, len(taps))

    functional = functional_of(model)
    if len(functional.outputs) != 1 and loss is None:
        if any(c.needs_gradient for c in criteria):
            raise MskdError(f"model {model.name!r} has {len(functional.outputs)} outputs; pass loss=... "
                            "for gradient criteria.")
    if any("/" in path for path in taps):  # a nested model's layers: tap them in a flat replay of the graph
        inputs, outputs, found = _flat_replay(functional)
        missing = [path for path in taps if path not in found]
        if missing:
            raise MskdError(f"layer {missing[0]!r} is not reached by the model's graph; cannot read its output.")
        tensors = [found[path] for path in taps]
    else:
        inputs, outputs = functional.inputs, functional.outputs
        tensors = [_output_tensor(graph, path) for path in taps]
    probe = keras.Model(inputs, [outputs[0], *tensors], name="criteria_probe")
    need_gradient = any(c.needs_gradient for c in criteria)
    loss_fn = loss if loss is not None else _default_loss(model)

    def step(images, labels, active):
        if any(criteria[i].needs_gradient for i in active):
            with tf.GradientTape() as tape:
                tape.watch(images)  # records every op, also when the model's weights are frozen
                outputs = probe(images, training=False)
                total = tf.reduce_sum(loss_fn(labels, outputs[0]))
            gradients = tape.gradient(total, outputs[1:])
        else:
            outputs = probe(images, training=False)
            gradients = [None] * len(tensors)
        return [[criteria[i].fn(a, g if criteria[i].needs_gradient else None)
                 for a, g in zip(outputs[1:], gradients)] for i in active]

    traced = {}  # active criteria -> tf.function: a capped criterion drops out with one retrace
    sums = [[0.0] * len(tensors) for _ in criteria]
    seen = [0] * len(criteria)
    for batch in itertools.islice(calibration, int(num_batches)):
        images, labels = _split_batch(batch)
        if need_gradient and labels is None:
            names = [c.name for c in criteria if c.needs_gradient]
            raise MskdError(f"criteria {names} need labels: calibration batches must be (images, labels).")
        size = int(tf.shape(images)[0])
        labels = labels if labels is not None else tf.zeros([size], tf.int64)
        active = tuple(i for i, c in enumerate(criteria) if c.max_samples is None or seen[i] < c.max_samples)
        if not active:
            break
        if active not in traced:
            traced[active] = tf.function(functools.partial(step, active=active), reduce_retracing=True)
        values = traced[active](tf.convert_to_tensor(images, probe.inputs[0].dtype), labels)
        for i, per_tap in zip(active, values):
            for j, value in enumerate(per_tap):
                sums[i][j] = sums[i][j] + size * np.asarray(value, dtype=np.float64)
            seen[i] += size
    if not any(seen):
        raise MskdError("calibration data is empty: it yielded no batches.")
    return {criterion.name: {path: sums[i][taps[path]] / seen[i] for path in taps}
            for i, criterion in enumerate(criteria)}


def _flat_replay(functional):
    """The functional graph replayed on new inputs with every nested model's layers called in place.

    A nested model's inner tensors are not reachable from the outer model's inputs (the outer graph calls
    the nested model as one layer), so a probe could not return them. Calling the same layer objects (same
    weights) in one flat graph computes the same outputs and gives every layer's output a tensor. Returns
    ``(inputs, outputs, {layer path: its first output tensor})``, paths as in the dependency graph.
    """
    from keras import tree

    found = {}

    def replay(graph, prefix, inputs):
        def call(operation, *args, **kwargs):
            inner = functional_of(operation)
            if inner is not None:
                outputs = replay(inner, f"{prefix}{operation.name}/", list(args) if len(args) > 1 else args[0])
            else:
                outputs = operation(*args, **kwargs)
            found.setdefault(prefix + operation.name, tree.flatten(outputs)[0])
            return outputs

        return graph._run_through_graph(inputs, call_fn=call)  # Keras' own replay; no public equivalent

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in functional.inputs]
    outputs = tree.flatten(replay(functional, "", inputs if len(inputs) > 1 else inputs[0]))
    return inputs, outputs, found


def _output_tensor(graph, path):
    nodes = getattr(graph.get_layer(path), "_inbound_nodes", [])
    if not nodes:
        raise MskdError(f"layer {path!r} has never been called; cannot read its output.")
    return nodes[0].outputs[0]


def _default_loss(model):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model), reduction="none")


def _split_batch(batch):
    if isinstance(batch, dict):
        raise MskdError("calibration batches must be (images, labels) tuples, not dicts.")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None
