"""Peak activation memory of a pruned model, predicted from a channel mask without building it.

A microcontroller runtime (TFLite Micro) keeps every tensor in one arena, and its planner lets tensors whose
lifetimes do not overlap share bytes, so the arena's activation part is set by the operation at which the
live tensors are largest: usually one high-resolution layer with its input and output (and a residual
branch's tensor waiting for its Add). This module replays the model's graph in execution order with each
tensor's width under a plan (kept channels x its spatial size, one byte per int8 value) and returns that
peak and where it is. Layers an int8 converter fuses into the operation before them (BatchNormalization,
activations, Dropout) write no tensor of their own. Every planner needs at least this peak; TFLM's greedy
one can need more where its placement fragments (``tests/test_device_targets.py`` bounds the gap). A
prediction, not a measurement: the candidates' TFLM runs are what a target is checked against; the planner
uses this to search.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from mskd_tf.pruning.graph import functional_of

# Layers whose output an int8 TFLite graph does not hold as a tensor of its own: folded into the
# preceding convolution (BatchNormalization), fused as its activation, or dropped at inference.
_IN_PLACE = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.Dropout,
             keras.layers.LeakyReLU, keras.layers.Identity, keras.layers.SpatialDropout2D)


@dataclasses.dataclass
class Peak:
    """The largest sum of live tensor bytes at one operation, and that operation's layer path."""

    bytes: int
    layer: str


def _operations(graph):
    """``(path, layer, input tensor ids, output tensors)`` in execution order, nested models walked."""
    ops, alias = [], {}

    def walk(functional, prefix):
        for depth in sorted(functional._nodes_by_depth, reverse=True):  # inputs first
            for node in functional._nodes_by_depth[depth]:
                operation = node.operation
                if node.is_input or isinstance(operation, keras.layers.InputLayer):
                    continue
                inputs = [alias.get(id(t), id(t)) for t in node.input_tensors]
                inner = functional_of(operation)
                if inner is not None:  # the nested model's tensors are the outer ones it is called on
                    for tensor, outer in zip(inner.inputs, inputs):
                        alias[id(tensor)] = outer
                    walk(inner, f"{prefix}{operation.name}/")
                    for tensor, inner_out in zip(node.outputs, inner.outputs):
                        alias[id(tensor)] = alias.get(id(inner_out), id(inner_out))
                    continue
                ops.append((prefix + operation.name, operation, inputs, list(node.outputs)))

    functional = functional_of(graph.model)
    walk(functional, "")
    return functional, ops, alias


def activation_peak(graph, keep=None, *, bytes_per_value: int = 1) -> Peak:
    """The predicted peak of live activation bytes of ``prune(graph.model, keep)`` at batch 1.

    ``keep``: ``{group id: kept indices}`` as in a plan (absent groups keep every channel).
    """
    mask = graph.keep_mask(keep)
    functional, ops, alias = _operations(graph)

    def size(tensor) -> int:
        """Its bytes scaled by the kept share of its channel map (whose axis is not always the last: a
        reshaped shortcut carries its channels on another one)."""
        values = math.prod(int(d) for d in tuple(tensor.shape)[1:])
        atoms = graph.tensor_maps[id(tensor)].atoms
        kept = int(np.count_nonzero(mask[graph.channel_of_atom[atoms]]))
        return values * kept // max(len(atoms), 1) * bytes_per_value

    buffer_of = dict(alias)  # tensor id -> the id of the buffer holding it
    sizes, born, last = {}, {}, {}
    for tensor in functional.inputs:
        sizes[id(tensor)], born[id(tensor)] = size(tensor), -1
    for step, (_, layer, inputs, outputs) in enumerate(ops):
        inputs = [buffer_of.get(t, t) for t in inputs]
        for buffer in inputs:
            last[buffer] = step
        if isinstance(layer, _IN_PLACE) and len(inputs) == 1 and len(outputs) == 1:
            buffer_of[id(outputs[0])] = inputs[0]
            continue
        for tensor in outputs:
            sizes[id(tensor)], born[id(tensor)] = size(tensor), step
    for tensor in functional.outputs:  # the model's outputs are read after the last operation
        last[buffer_of.get(id(tensor), id(tensor))] = len(ops)
    best = Peak(0, "")
    for step, (path, *_rest) in enumerate(ops):
        live = sum(sizes[b] for b in sizes if born[b] <= step <= last.get(b, born[b]))
        if live > best.bytes:
            best = Peak(live, path)
    return best
