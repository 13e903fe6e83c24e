"""Pieces shared by the teacher architectures: input + normalization, conv-BN-ReLU, head.

Everything is a built-in Keras layer (no Lambda, no subclassing) so the pruning
engine can rebuild the graph, ``.keras`` files load without custom objects and
TFLite conversion works.
"""

from __future__ import annotations

import numpy as np
import keras

from mskd_tf.errors import MskdError

# He et al. initialization; L2 regularization is the optimizer's weight decay.
KERNEL_INIT = "he_normal"


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (never below it).

    Rounding down by more than 10% is avoided, as in MobileNetV2's ``_make_divisible``.
    """
    value = channels * width
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def model_input(input_shape, normalization):
    """``keras.Input`` plus, when ``normalization=(mean, std)`` is given, a
    ``Normalization`` layer named ``normalize`` computing ``(x - mean) / std``.

    Returns:
        (inputs, x): the Input tensor and the tensor the network body starts from.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    if normalization is None:
        return inputs, inputs
    try:
        mean, std = normalization
        mean = np.asarray(mean, dtype="float32").reshape(-1)
        std = np.asarray(std, dtype="float32").reshape(-1)
    except (TypeError, ValueError) as error:
        raise MskdError(
            f"normalization must be (mean, std) with one value per channel, got {normalization!r}"
        ) from error
    channels = input_shape[-1]
    if mean.size != channels or std.size != channels:
        raise MskdError(
            f"normalization mean/std have {mean.size}/{std.size} values but the input has "
            f"{channels} channels (input_shape={tuple(input_shape)}); give one value per channel."
        )
    if np.any(std <= 0):
        raise MskdError(f"normalization std must be positive, got {std.tolist()}")
    layer = keras.layers.Normalization(mean=mean, variance=np.square(std), name="normalize")
    return inputs, layer(inputs)


def conv_bn(x, filters, kernel_size, strides, name, index="", relu=True):
    """Conv (no bias, he_normal) -> BatchNorm [-> ReLU].

    Layers are named ``{name}_conv{index}``, ``{name}_bn{index}``, ``{name}_relu{index}``.
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=KERNEL_INIT,
        name=f"{name}_conv{index}",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn{index}")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


def classifier_head(x, num_classes, dropout):
    """Global average pooling [-> Dropout] -> Dense logits named ``classifier``."""
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.layers.Dense(num_classes, name="classifier")(x)
