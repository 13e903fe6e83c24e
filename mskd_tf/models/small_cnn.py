"""A small CNN for the Fashion-MNIST quickstart (about 11M MACs at 28x28).

conv-BN-ReLU 32 -> max-pool -> residual block 32 (two convs + Add, so the
quickstart prunes coupled channels) -> conv-BN-ReLU 64 -> max-pool ->
conv-BN-ReLU 128 -> global average pooling -> Dense logits. The residual block
sits after the first pooling: at full resolution it cost two thirds of the MACs.
"""

from __future__ import annotations

import keras

from mskd_tf.models.common import classifier_head, conv_bn, scaled


def small_cnn(x, num_classes, *, width=1.0, dropout=0.0):
    """Build the body and head on tensor ``x``; returns the logits tensor.

    Layers: ``stem_conv/_bn/_relu``, ``pool1``, ``res_conv1/_bn1/_relu1``, ``res_conv2/_bn2``,
    ``res_add``, ``res_out``, ``block2_conv/_bn/_relu``, ``pool2``,
    ``block3_conv/_bn/_relu``, ``gap``, [``dropout``], ``classifier``.
    """
    channels = [scaled(c, width) for c in (32, 64, 128)]
    x = conv_bn(x, channels[0], 3, 1, name="stem")
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    residual = conv_bn(x, channels[0], 3, 1, name="res", index=1)
    residual = conv_bn(residual, channels[0], 3, 1, name="res", index=2, relu=False)
    x = keras.layers.Add(name="res_add")([residual, x])
    x = keras.layers.ReLU(name="res_out")(x)
    x = conv_bn(x, channels[1], 3, 1, name="block2")
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = conv_bn(x, channels[2], 3, 1, name="block3")
    return classifier_head(x, num_classes, dropout)
