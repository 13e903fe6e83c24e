"""MobileNetV2 (Sandler et al. 2018) with a width multiplier and CIFAR strides.

For small inputs (shorter side <= 64 px, e.g. CIFAR 32x32) the stem conv and the
first down-sampling stage use stride 1, as in the common CIFAR ports, so a
32x32 image ends at 4x4 instead of 1x1. Larger inputs get the ImageNet strides.
"""

from __future__ import annotations

import keras

from mskd_tf.models.common import KERNEL_INIT, classifier_head, scaled

# (expansion t, output channels c, repeats n, first stride s) from the paper's Table 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
SMALL_INPUT = 64
DIVISOR = 8


def mobilenet_v2(x, num_classes, *, width=1.0, dropout=0.0):
    """Build the body and head on tensor ``x``; returns the logits tensor.

    Layers: ``stem_conv/_bn/_relu``, ``block{i}_expand_conv/_bn/_relu``,
    ``block{i}_dw_conv/_bn/_relu``, ``block{i}_project_conv/_bn``, ``block{i}_add``,
    ``head_conv/_bn/_relu``, ``gap``, [``dropout``], ``classifier``.
    """
    small = min(x.shape[1] or SMALL_INPUT + 1, x.shape[2] or SMALL_INPUT + 1) <= SMALL_INPUT
    x = _conv_bn_relu6(x, scaled(32, width, DIVISOR), 3, 1 if small else 2, "stem")
    block = 0
    for stage, (expansion, channels, repeats, stride) in enumerate(STAGES):
        if small and stage == 1:
            stride = 1  # CIFAR: keep 32x32 through the first down-sampling stage
        for repeat in range(repeats):
            block += 1
            x = _inverted_residual(
                x, scaled(channels, width, DIVISOR), stride if repeat == 0 else 1, expansion, f"block{block}"
            )
    # The paper keeps the 1280-channel head for width <= 1.
    x = _conv_bn_relu6(x, scaled(1280, max(width, 1.0), DIVISOR), 1, 1, "head")
    return classifier_head(x, num_classes, dropout)


def _conv_bn_relu6(x, filters, kernel_size, strides, name):
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False,
        kernel_initializer=KERNEL_INIT, name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)


def _inverted_residual(x, filters, strides, expansion, name):
    inputs = x
    if expansion != 1:
        x = _conv_bn_relu6(x, inputs.shape[-1] * expansion, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(
        3, strides=strides, padding="same", use_bias=False,
        depthwise_initializer=KERNEL_INIT, name=f"{name}_dw_conv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = keras.layers.Conv2D(
        filters, 1, use_bias=False, kernel_initializer=KERNEL_INIT, name=f"{name}_project_conv"
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_project_bn")(x)  # linear bottleneck: no ReLU
    if strides == 1 and inputs.shape[-1] == filters:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x
