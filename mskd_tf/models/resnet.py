"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/56/110.

3x3 stem conv with 16 channels, three stages of n = (depth - 2) / 6 basic blocks
with 16/32/64 channels (stride 2 at the first block of stages 2 and 3), global
average pooling, Dense logits.

Shortcut when the shape changes:

* ``"A"`` (default, parameter-free, what the pruning literature reports):
  subsample with a 1x1 stride-2 average pool, zero-pad the new channels. The
  padding is built from built-in layers only: ``Reshape((H*W, C, 1))`` ->
  ``ZeroPadding2D`` on the channel axis -> ``Reshape((H, W, C + pad))``.
* ``"B"``: 1x1 stride-2 conv + BN projection.
"""

from __future__ import annotations

import keras

from mskd_tf.errors import MskdError
from mskd_tf.models.common import KERNEL_INIT, classifier_head, conv_bn, scaled

STAGE_CHANNELS = (16, 32, 64)
SHORTCUTS = ("A", "B")


def blocks_per_stage(depth: int) -> int:
    """n for a CIFAR ResNet of ``depth`` layers (6n + 2)."""
    if (depth - 2) % 6:
        raise MskdError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
    return (depth - 2) // 6


def resnet_cifar(x, num_classes, *, depth, width=1.0, dropout=0.0, shortcut="A"):
    """Build the body and head on tensor ``x``; returns the logits tensor."""
    if shortcut not in SHORTCUTS:
        raise MskdError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 conv projection), got {shortcut!r}")
    n = blocks_per_stage(depth)
    x = conv_bn(x, scaled(STAGE_CHANNELS[0], width), 3, 1, name="stem")
    for stage, base in enumerate(STAGE_CHANNELS, start=1):
        filters = scaled(base, width)
        for block in range(1, n + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, strides, shortcut, name=f"stage{stage}_block{block}")
    return classifier_head(x, num_classes, dropout)


def _basic_block(x, filters, strides, shortcut, name):
    residual = conv_bn(x, filters, 3, strides, name=name, index=1)
    residual = conv_bn(residual, filters, 3, 1, name=name, index=2, relu=False)
    if strides != 1 or x.shape[-1] != filters:
        x = _shortcut_a(x, filters, strides, name) if shortcut == "A" else _shortcut_b(x, filters, strides, name)
    x = keras.layers.Add(name=f"{name}_add")([residual, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _shortcut_a(x, filters, strides, name):
    x = keras.layers.AveragePooling2D(pool_size=1, strides=strides, name=f"{name}_shortcut_pool")(x)
    height, width, channels = x.shape[1:]
    if height is None or width is None:
        raise MskdError(
            f"shortcut 'A' needs a fixed spatial input size to zero-pad channels at {name!r}; "
            "give input_shape with height and width, or use shortcut='B'."
        )
    extra = filters - channels
    if extra < 0:
        raise MskdError(f"shortcut 'A' at {name!r} cannot shrink {channels} channels to {filters}")
    # Channels become the width axis of a 2-D "image" so ZeroPadding2D can pad them.
    x = keras.layers.Reshape((height * width, channels, 1), name=f"{name}_shortcut_flat")(x)
    x = keras.layers.ZeroPadding2D(((0, 0), (extra // 2, extra - extra // 2)), name=f"{name}_shortcut_pad")(x)
    return keras.layers.Reshape((height, width, filters), name=f"{name}_shortcut_unflat")(x)


def _shortcut_b(x, filters, strides, name):
    x = keras.layers.Conv2D(
        filters, 1, strides=strides, use_bias=False, kernel_initializer=KERNEL_INIT, name=f"{name}_shortcut_conv"
    )(x)
    return keras.layers.BatchNormalization(name=f"{name}_shortcut_bn")(x)
