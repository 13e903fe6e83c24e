"""One handler per layer type: how channels flow through it and how its weights are sliced.

A handler answers three questions for its layer type:

* ``propagate(layer, in_maps, ctx) -> out_maps``: which output channels are which input
  channels (pass-through), which are new (producers: ``ctx.new_atoms``), which must be removed
  together (``ctx.unite``), which may never be removed (``ctx.fix``).
* ``weight_axes(layer) -> {weight name: per-axis channel-map names}``: e.g. a Conv2D kernel is
  ``(None, None, "in", "out")``: axis 2 is sliced by the kept input channels, axis 3 by the kept
  output channels. ``clone.py`` slices, ``plan.py`` predicts the sliced shapes, from this one table.
* ``configure(layer, config, kept) -> config``: the config of the slimmer layer (``filters``,
  ``units``, reshape targets, pad amounts), from ``kept.count(map)`` / ``kept.positions(map)``.

A new layer type is one handler: ``register_handler(MyLayer, MyHandler())``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras.src.ops import numpy as numpy_ops  # the Operation classes behind `x + 3.0` etc.

from mskd_tf.errors import MskdError
from mskd_tf.pruning.channel_map import ChannelMap

_REGISTRY = {}

# Weights that are data statistics, not learned parameters (flops.count leaves them out too).
STATISTIC_WEIGHTS = frozenset({"moving_mean", "moving_variance", "mean", "variance", "count"})
# Weights whose size, times the positions a layer is applied at, is its MAC count.
MAC_WEIGHTS = frozenset({"kernel", "depthwise_kernel", "pointwise_kernel"})


def register_handler(layer_class, handler):
    """Use ``handler`` (a :class:`LayerHandler`) for layers of exactly ``layer_class``."""
    _REGISTRY[layer_class] = handler
    return handler


def handler_for(layer, path, overrides=None):
    """The handler of ``layer``'s exact class; MskdError naming the layer if there is none."""
    overrides = overrides or {}
    cls = type(layer)
    if cls in overrides:
        return overrides[cls]
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    how = (f"pass skip=[{path!r}] to build_graph/prune to keep its channels unpruned, or register a handler "
           f"with mskd_tf.pruning.register_handler({cls.__name__}, handler)")
    if isinstance(layer, keras.layers.Lambda):
        raise MskdError(f"layer {path!r} is a Lambda layer: its function is opaque to channel analysis. "
                        f"Replace it with built-in layers, or {how}.")
    raise MskdError(f"layer {path!r} of class {cls.__module__}.{cls.__name__} has no pruning handler; {how}.")


def _need_channels_last(layer, ctx, channel_map):
    if channel_map.axis != -1:
        raise MskdError(
            f"layer {ctx.path!r} ({type(layer).__name__}) receives channels moved to axis {channel_map.axis}; "
            "only Reshape -> ZeroPadding -> Reshape channel padding (option-A shortcut) may move the channel axis."
        )
    return channel_map.atoms


def _channels_last_format(layer, ctx):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        raise MskdError(f"layer {ctx.path!r} uses data_format='channels_first'; mskd_tf prunes channels_last "
                        "models only (keras.config.set_image_data_format('channels_last') before building).")


class LayerHandler:
    """Base handler: a pass-through layer without per-channel weights."""

    kind = "passthrough"  # producer | channelwise | activation | passthrough | fixed

    def propagate(self, layer, in_maps, ctx):
        _channels_last_format(layer, ctx)
        if len(in_maps) != 1:
            raise MskdError(f"layer {ctx.path!r} ({type(layer).__name__}) has {len(in_maps)} inputs; "
                            "its handler expects one.")
        return [in_maps[0]]

    def weight_axes(self, layer):
        return {}

    def configure(self, layer, config, kept):
        return config

    def consumed_maps(self, layer):
        """Maps indexing the in-axis of this layer's (first) kernel: the layer consumes them."""
        return ()

    def role(self, layer):
        """The layer's part in a group (``kind`` unless it depends on the layer's config)."""
        return self.kind


class ActivationHandler(LayerHandler):
    kind = "activation"


class ProducerHandler(LayerHandler):
    """Conv1D/2D/3D (incl. groups > 1), Dense, ConvTranspose: new output channels."""

    kind = "producer"

    def __init__(self, count_attr="filters", transpose=False):
        self.count_attr = count_attr
        self.transpose = transpose

    def propagate(self, layer, in_maps, ctx):
        _channels_last_format(layer, ctx)
        atoms = _need_channels_last(layer, ctx, in_maps[0])
        groups = getattr(layer, "groups", 1) or 1
        out_count = getattr(layer, self.count_attr)
        if self._is_channelwise(layer):
            # groups == input channels (ConvNeXt's depthwise conv): a depthwise conv in disguise.
            return [ChannelMap(np.repeat(atoms, out_count // groups))]
        if groups > 1:
            # Keras needs equal channel counts per conv group: couple rank r of every group, so
            # removing a channel removes it from all groups at once.
            per_group = len(atoms) // groups
            first = atoms[:per_group]
            for g in range(1, groups):
                ctx.unite(first, atoms[g * per_group : (g + 1) * per_group])
            ctx.set_map("in_group", first)
            out = np.tile(ctx.new_atoms(out_count // groups), groups)
        else:
            out = ctx.new_atoms(out_count)
        return [ChannelMap(out)]

    @staticmethod
    def _is_channelwise(layer):
        groups = getattr(layer, "groups", 1) or 1
        return groups > 1 and layer.kernel.shape[-2] == 1 and not isinstance(layer, keras.layers.Dense)

    def role(self, layer):
        return "channelwise" if self._is_channelwise(layer) else "producer"

    def _in_map(self, layer):
        if self._is_channelwise(layer):
            return None  # kernel in-axis has size 1
        return "in_group" if (getattr(layer, "groups", 1) or 1) > 1 else "in"

    def weight_axes(self, layer):
        rank = len(layer.kernel.shape)
        io = ("out", self._in_map(layer)) if self.transpose else (self._in_map(layer), "out")
        axes = {"kernel": (None,) * (rank - 2) + io}
        if getattr(layer, "use_bias", False):
            axes["bias"] = ("out",)
        return axes

    def configure(self, layer, config, kept):
        if self._is_channelwise(layer):
            config["groups"] = kept.count("in")
        config[self.count_attr] = kept.count("out")
        return config

    def consumed_maps(self, layer):
        return () if self._is_channelwise(layer) else (self._in_map(layer),)


class DepthwiseHandler(LayerHandler):
    """DepthwiseConv1D/2D: output channel c*m+k comes from input channel c."""

    kind = "channelwise"

    def propagate(self, layer, in_maps, ctx):
        _channels_last_format(layer, ctx)
        atoms = _need_channels_last(layer, ctx, in_maps[0])
        return [ChannelMap(np.repeat(atoms, layer.depth_multiplier))]

    def weight_axes(self, layer):
        rank = len(layer.kernel.shape)
        axes = {"kernel": (None,) * (rank - 2) + ("in", None)}
        if layer.use_bias:
            axes["bias"] = ("out",)
        return axes


class SeparableHandler(LayerHandler):
    """SeparableConv1D/2D: depthwise on the inputs, then a pointwise producer."""

    kind = "producer"

    def propagate(self, layer, in_maps, ctx):
        _channels_last_format(layer, ctx)
        atoms = _need_channels_last(layer, ctx, in_maps[0])
        ctx.set_map("mid", np.repeat(atoms, layer.depth_multiplier))
        return [ChannelMap(ctx.new_atoms(layer.filters))]

    def weight_axes(self, layer):
        rank = len(layer.depthwise_kernel.shape)
        axes = {"depthwise_kernel": (None,) * (rank - 2) + ("in", None),
                "pointwise_kernel": (None,) * (rank - 2) + ("mid", "out")}
        if layer.use_bias:
            axes["bias"] = ("out",)
        return axes

    def configure(self, layer, config, kept):
        config["filters"] = kept.count("out")
        return config

    def consumed_maps(self, layer):
        return ("in",)


class PerChannelHandler(LayerHandler):
    """BatchNormalization / LayerNormalization on the channel axis: 1-D per-channel weights."""

    kind = "channelwise"

    def propagate(self, layer, in_maps, ctx):
        rank = len(ctx.in_shapes[0])
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if [a % rank for a in axes] != [rank - 1]:
            raise MskdError(f"layer {ctx.path!r} ({type(layer).__name__}) normalises over axis {layer.axis}, "
                            "not only the channel axis (-1); skip it or set axis=-1.")
        _need_channels_last(layer, ctx, in_maps[0])
        return [in_maps[0]]

    def weight_axes(self, layer):
        return {w.name: ("out",) for w in layer.weights}


class LastAxisWeightsHandler(LayerHandler):
    """PReLU / Normalization: weights broadcast over the channel axis (sliced where it is > 1)."""

    def __init__(self, kind):
        self.kind = kind

    def weight_axes(self, layer):
        return {w.name: (None,) * (len(w.shape) - 1) + ("out",)
                for w in layer.weights if len(w.shape) and w.shape[-1] > 1}

    def configure(self, layer, config, kept):
        return _slice_config_values(config, ("mean", "variance"), kept)


class LayerScaleHandler(LayerHandler):
    """keras.applications ConvNeXt ``LayerScale``: ``x * gamma`` with one gamma per channel."""

    kind = "channelwise"

    def weight_axes(self, layer):
        return {w.name: ("out",) for w in layer.weights}

    def configure(self, layer, config, kept):
        config["projection_dim"] = kept.count("out")
        return config


class RescalingHandler(LayerHandler):
    """Rescaling: per-channel ``scale`` / ``offset`` lists are sliced like the channels."""

    def configure(self, layer, config, kept):
        return _slice_config_values(config, ("scale", "offset"), kept)


def _slice_config_values(config, keys, kept):
    for key in keys:
        value = config.get(key)
        if isinstance(value, dict):  # a serialized array
            continue
        array = np.asarray(value) if value is not None else None
        if array is not None and array.ndim and array.shape[-1] == kept.size("out") > 1:
            config[key] = array[..., kept.positions("out")].tolist()
    return config


class FlattenHandler(LayerHandler):
    """Flatten: channel c of spatial position s lands at s*C + c (channels_last)."""

    def propagate(self, layer, in_maps, ctx):
        atoms = _need_channels_last(layer, ctx, in_maps[0])
        spatial = ctx.in_shapes[0][1:-1]
        if any(d is None for d in spatial):
            raise MskdError(f"layer {ctx.path!r} (Flatten) has unknown spatial size {ctx.in_shapes[0]}; "
                            "build the model with a fixed input shape.")
        return [ChannelMap(np.tile(atoms, math.prod(spatial)))]


class ReshapeHandler(LayerHandler):
    """Reshape keeping the channel axis last, or the option-A pad pattern (channels to axis -2 and back)."""

    def propagate(self, layer, in_maps, ctx):
        channel_map = in_maps[0]
        n = len(channel_map.atoms)
        out_shape = ctx.out_shapes[0]
        if channel_map.axis == -1 and out_shape[-1] == n:
            return [channel_map]
        if channel_map.axis == -1 and len(out_shape) >= 3 and out_shape[-2:] == (n, 1):
            return [ChannelMap(channel_map.atoms, -2)]  # (HW, C) -> (HW, C, 1), before channel padding
        if channel_map.axis == -2 and ctx.in_shapes[0][-1] == 1 and out_shape[-1] == n:
            return [ChannelMap(channel_map.atoms, -1)]  # back to channels last, after channel padding
        # The channel axis is mixed with others: keep everything around it as it is.
        ctx.fix(channel_map.atoms, f"Reshape {ctx.path} mixes the channel axis")
        return [ChannelMap(ctx.new_atoms(out_shape[-1], kind="fixed", fixed=f"Reshape {ctx.path}"))]

    def configure(self, layer, config, kept):
        target = list(config["target_shape"])
        axis = kept.axis("out")
        target[axis] = kept.count("out")
        config["target_shape"] = tuple(target)
        return config


class ZeroPaddingHandler(LayerHandler):
    """ZeroPadding1D/2D/3D: spatial padding passes channels; padding the channel axis adds zero channels."""

    def propagate(self, layer, in_maps, ctx):
        channel_map = in_maps[0]
        if channel_map.axis == -1:
            return [channel_map]
        rank = len(ctx.in_shapes[0])
        padded_axis = rank + channel_map.axis  # positive
        below, above = self._pads(layer)[padded_axis - 1]
        atoms = np.concatenate([ctx.new_atoms(below, kind="pad"), channel_map.atoms, ctx.new_atoms(above, kind="pad")])
        return [ChannelMap(atoms, channel_map.axis)]

    @staticmethod
    def _pads(layer):
        padding = layer.padding
        if isinstance(padding, int):
            padding = ((padding, padding),)
        return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]

    def configure(self, layer, config, kept):
        if kept.axis("out") == -1:
            return config  # spatial padding
        rank = len(kept.record.in_shapes[0])
        axis = rank + kept.axis("out") - 1
        pads = self._pads(layer)
        below, above = pads[axis]
        kept_out = kept.positions("out")
        size = kept.size("out")
        pads[axis] = (int(np.sum(kept_out < below)), int(np.sum(kept_out >= size - above)))
        config["padding"] = tuple(pads)
        return config


class MergeHandler(LayerHandler):
    """Add / Subtract / Average / Maximum / Minimum / Multiply (layers and ops): unite position-wise.

    An input with one channel broadcasts (e.g. a scalar gate) and couples with nothing.
    """

    def propagate(self, layer, in_maps, ctx):
        sizes = [len(m.atoms) for m in in_maps]
        full = [m for m in in_maps if len(m.atoms) == max(sizes)]
        if max(sizes) > 1:
            for m in in_maps:
                if len(m.atoms) not in (1, max(sizes)):
                    raise MskdError(f"layer {ctx.path!r} ({type(layer).__name__}) combines channel counts {sizes}.")
        first = full[0]
        for other in full[1:]:
            if other.axis != first.axis:
                raise MskdError(f"layer {ctx.path!r} combines tensors with channels on different axes.")
            ctx.unite(first.atoms, other.atoms)
        return [first]


class ConcatenateHandler(LayerHandler):
    """Concatenate: on the channel axis the channel lists are joined; on other axes they unite."""

    def propagate(self, layer, in_maps, ctx):
        rank = len(ctx.out_shapes[0])
        if layer.axis % rank == (rank - 1):
            for m in in_maps:
                _need_channels_last(layer, ctx, m)
            return [ChannelMap(np.concatenate([m.atoms for m in in_maps]))]
        return MergeHandler.propagate(self, layer, in_maps, ctx)


class SkipHandler(LayerHandler):
    """An opaque layer the user excluded: all its channels are kept and its weights copied."""

    kind = "fixed"

    def propagate(self, layer, in_maps, ctx):
        for m in in_maps:
            ctx.fix(m.atoms, f"skipped layer {ctx.path}")
        return [ChannelMap(ctx.new_atoms(shape[-1], kind="fixed", fixed=f"skipped layer {ctx.path}"))
                for shape in ctx.out_shapes]


SKIP = SkipHandler()

L = keras.layers
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D):
    register_handler(_cls, ProducerHandler("filters"))
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_handler(_cls, ProducerHandler("filters", transpose=True))
register_handler(L.Dense, ProducerHandler("units"))
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register_handler(_cls, DepthwiseHandler())
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register_handler(_cls, SeparableHandler())
for _cls in (L.BatchNormalization, L.LayerNormalization):
    register_handler(_cls, PerChannelHandler())
register_handler(L.PReLU, LastAxisWeightsHandler("activation"))
register_handler(L.Normalization, LastAxisWeightsHandler("channelwise"))
register_handler(L.Rescaling, RescalingHandler())
register_handler(L.Flatten, FlattenHandler())
register_handler(L.Reshape, ReshapeHandler())
for _cls in (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D):
    register_handler(_cls, ZeroPaddingHandler())
register_handler(L.Concatenate, ConcatenateHandler())
for _cls in (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply,
             numpy_ops.Add, numpy_ops.Subtract, numpy_ops.Multiply, numpy_ops.TrueDivide,
             numpy_ops.Maximum, numpy_ops.Minimum):
    register_handler(_cls, MergeHandler())
for _cls in (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax):
    register_handler(_cls, ActivationHandler())
_PASSTHROUGH = (
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianDropout,
    L.GaussianNoise, L.AlphaDropout, L.ActivityRegularization, L.Identity,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    L.Resizing, L.CenterCrop, L.RandomFlip, L.RandomRotation, L.RandomZoom, L.RandomTranslation,
    L.RandomCrop, L.RandomContrast, L.RandomBrightness,
)
for _cls in _PASSTHROUGH:
    register_handler(_cls, LayerHandler())
del _cls


def _register_applications_layers():
    """The two custom layers keras.applications models use (their modules may move)."""
    try:
        from keras.src.applications.convnext import LayerScale
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
    except ImportError:  # pragma: no cover - other Keras versions
        return
    register_handler(LayerScale, LayerScaleHandler())
    register_handler(CustomScaleLayer, MergeHandler())  # inputs[0] + inputs[1] * scale


_register_applications_layers()
