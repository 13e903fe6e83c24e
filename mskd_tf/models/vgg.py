"""CIFAR VGG-11/16/19 with BatchNorm, as in the HRank / network-slimming experiments.

Every 3x3 conv is followed by BN and ReLU, ``"M"`` is 2x2 max-pooling; the last
conv block is not pooled but averaged (2x2 -> 1x1 for 32x32 input, done here by
global average pooling so other input sizes work), then the classifier
Dense(512) -> BN -> ReLU -> Dense(num_classes). At 32x32 with 10 classes VGG-16
has 313.46M conv+dense MACs and 14.99M learned params (published: 313.73M /
14.98M; the papers' convs carry biases, these are followed by BN instead).
"""

from __future__ import annotations

import keras

from mskd_tf.models.common import conv_bn, scaled

CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}
HIDDEN_UNITS = 512


def vgg_cifar(x, num_classes, *, depth, width=1.0, dropout=0.0):
    """Build the body and head on tensor ``x``; returns the logits tensor.

    Layers: ``block{b}_conv{i}/_bn{i}/_relu{i}``, ``block{b}_pool``, ``gap``,
    ``fc1``, ``fc1_bn``, ``fc1_relu``, [``dropout``], ``classifier``.
    """
    block, index = 1, 1
    for item in CONFIGS[depth]:
        if item == "M":
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            block, index = block + 1, 1
            continue
        x = conv_bn(x, scaled(item, width), 3, 1, name=f"block{block}", index=index)
        index += 1
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(scaled(HIDDEN_UNITS, width), name="fc1")(x)
    x = keras.layers.BatchNormalization(name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.layers.Dense(num_classes, name="classifier")(x)
