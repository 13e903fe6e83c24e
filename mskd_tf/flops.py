"""MACs and parameter counts of Keras 3 functional models, as pruning papers count them.

:func:`count` walks the layer graph of a functional (or built ``Sequential``)
model, including nested functional models, and reads every layer call's
recorded input/output shapes (batch dimension ignored, i.e. batch = 1). No TF
graph is traced, so a ResNet-56 counts in milliseconds.

Conventions (the ones behind the published CIFAR figures such as ResNet-56
125.49M MACs / 0.85M params, VGG-16 313.73M / 14.98M):

* **MACs** are multiply-accumulates of convolutions and dense layers only
  (``Conv1D/2D/3D`` incl. ``groups > 1``, ``DepthwiseConv``, ``SeparableConv``
  = depthwise + pointwise, ``ConvTranspose``, ``Dense`` applied at every
  position of a >2-D input). Bias additions, BatchNormalization, activations,
  pooling, ``Add``/``Concatenate`` etc. count 0, as in the papers.
* **params** are the *learned* weights (PyTorch's ``parameters()``): trainable
  and frozen weights alike, but not the running statistics of
  ``BatchNormalization`` (moving mean/variance) nor the constants of a
  ``Normalization`` layer. ``model.count_params()`` includes those, so it is
  larger by 2 per BN channel (ResNet-56: 857,082 vs the papers' 853,018).

A layer type not known here that holds weights gets its params counted, 0 MACs
and a ``warnings.warn`` naming it, so new layers never silently skew a target.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras

from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import all_layers


@dataclasses.dataclass(frozen=True)
class Cost:
    """Compute and size of a model.

    Attributes:
        macs: multiply-accumulates for one input sample (conv + dense only).
        params: learned weights (BN moving statistics excluded).
        per_layer: layer name -> (macs, params); nested models' layers are
            named ``"outer_model/inner_layer"``.
    """

    macs: int
    params: int
    per_layer: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __str__(self):
        return f"{self.macs / 1e6:.2f}M MACs, {self.params / 1e6:.2f}M params"


_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
# Layers that hold weights but do no multiply-accumulates the papers count.
_ZERO_MAC_WEIGHTED = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.Normalization,
    keras.layers.PReLU,
    keras.layers.Embedding,  # a table lookup
)


def count(model: keras.Model) -> Cost:
    """Count MACs (per sample) and learned parameters of a functional model.

    Args:
        model: a Keras 3 functional model or a built ``keras.Sequential``;
            nested functional/Sequential sub-models are walked. Every spatial
            dimension must be known (build it with a fixed ``input_shape``).

    Returns:
        :class:`Cost` with ``macs``, ``params`` and ``per_layer``.

    Raises:
        MskdError: the model is subclassed / unbuilt, or a layer's shape has an
            unknown (None) non-batch dimension.
    """
    graph = _graph_of(model)
    if graph is None:
        raise MskdError(
            f"flops.count needs a functional or built Sequential model; {model.name!r} "
            f"({type(model).__name__}) has no layer graph. Build it with keras.Input(...) "
            "and keras.Model(inputs, outputs), or call the Sequential model on an input first."
        )
    per_layer: dict[str, tuple[int, int]] = {}
    _walk(graph, prefix="", per_layer=per_layer)
    # Weights can be shared between layers or sub-models: count each variable once.
    statistics = {id(v) for v in _statistics_of_model(model)}
    unique = {id(v): v for v in model.weights}
    params = sum(math.prod(v.shape) for key, v in unique.items() if key not in statistics)
    macs = sum(layer_macs for layer_macs, _ in per_layer.values())
    return Cost(macs=int(macs), params=int(params), per_layer=per_layer)


def _graph_of(operation):
    """The Functional behind a functional model or a built Sequential, else None."""
    if hasattr(operation, "_nodes_by_depth"):
        return operation
    functional = getattr(operation, "_functional", None)  # keras.Sequential once built
    if functional is not None and hasattr(functional, "_nodes_by_depth"):
        return functional
    return None


def _walk(graph, prefix, per_layer):
    """Add (macs, params) of every layer call in ``graph`` to ``per_layer``."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):  # inputs first
        for node in graph._nodes_by_depth[depth]:
            operation = node.operation
            if isinstance(operation, keras.layers.InputLayer):
                continue
            inner = _graph_of(operation)
            if inner is not None:
                _walk(inner, prefix=f"{prefix}{operation.name}/", per_layer=per_layer)
                continue
            name = prefix + operation.name
            macs = _node_macs(operation, node)
            earlier_macs, params = per_layer.get(name, (0, None))
            if params is None:  # first call of this layer: its weights count once
                params = _learned_params(operation)
            per_layer[name] = (earlier_macs + macs, params)


def _elements(tensor, layer):
    """Number of elements of one sample of a symbolic tensor."""
    dims = tuple(tensor.shape)[1:]
    if any(d is None for d in dims):
        raise MskdError(
            f"flops.count: layer {layer.name!r} has shape {tuple(tensor.shape)} with an unknown "
            "non-batch dimension; build the model with a fixed input_shape "
            "(e.g. keras.Input((32, 32, 3))) so MACs are defined."
        )
    return math.prod(dims)


def _node_macs(layer, node):
    """MACs of one call of ``layer``: kernel size times the positions it is applied at."""
    if isinstance(layer, keras.layers.Layer) and not layer.weights:
        return 0  # activations, pooling, Add, reshapes, ...: no weights, no counted MACs
    if isinstance(layer, (*_CONV, keras.layers.Dense)):
        # Conv (kh, kw, Cin/groups, Cout) or Dense (in, out): each output position
        # of each output channel costs kernel.size / Cout MACs.
        out = node.outputs[0]
        positions = _elements(out, layer) // layer.kernel.shape[-1]
        return math.prod(layer.kernel.shape) * positions
    if isinstance(layer, _DEPTHWISE):
        # kernel (kh, kw, Cin, multiplier): one k*k filter per output channel.
        kernel = layer.kernel.shape
        positions = _elements(node.outputs[0], layer) // (kernel[-2] * kernel[-1])
        return math.prod(kernel) * positions
    if isinstance(layer, _SEPARABLE):
        positions = _elements(node.outputs[0], layer) // layer.filters
        return (math.prod(layer.depthwise_kernel.shape) + math.prod(layer.pointwise_kernel.shape)) * positions
    if isinstance(layer, _TRANSPOSE):
        # Every *input* position scatters a full (k, k, Cout) patch per input channel.
        inputs = node.arguments.keras_tensors[0]
        positions = _elements(inputs, layer) // layer.kernel.shape[-1]
        return math.prod(layer.kernel.shape) * positions
    if isinstance(layer, _ZERO_MAC_WEIGHTED) or not getattr(layer, "weights", None):
        return 0
    warnings.warn(
        f"flops.count: layer {layer.name!r} of type {type(layer).__name__} has weights but no MAC "
        "rule; its params are counted and its MACs taken as 0.",
        stacklevel=3,
    )
    return 0


def _statistics(layer):
    """Weights of ``layer`` that are data statistics, not learned parameters."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [layer.moving_mean, layer.moving_variance]
    if isinstance(layer, keras.layers.Normalization):
        return list(layer.weights)  # mean, variance, count of the adapted data
    return []


def _statistics_of_model(model):
    return [v for layer in all_layers(model) for v in _statistics(layer)]


def _learned_params(layer):
    if not isinstance(layer, keras.layers.Layer):
        return 0  # a bare keras.ops call in the graph
    statistics = {id(v) for v in _statistics(layer)}
    return int(sum(math.prod(v.shape) for v in layer.weights if id(v) not in statistics))
