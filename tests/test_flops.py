"""flops.count: exact MACs on hand-computed models, published figures within 1%."""

import time

import keras
import pytest

from mskd_tf import flops
from mskd_tf.errors import MskdError


def _tiny_model():
    """Grouped conv, depthwise conv, BN, dense; MACs/params worked out by hand below."""
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(inputs)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inputs, outputs, name="tiny")


# grouped: k*k*Cin/groups*Cout*H*W = 3*3*(4/2)*8*8*8; params 3*3*2*8 + 8 bias
GROUPED = (3 * 3 * 2 * 8 * 8 * 8, 3 * 3 * 2 * 8 + 8)
# depthwise, stride 2 -> 4x4: k*k*Cin*mult*H*W = 3*3*8*2*4*4; params 3*3*8*2 + 16 bias
DEPTHWISE = (3 * 3 * 8 * 2 * 4 * 4, 3 * 3 * 8 * 2 + 16)
# bn: gamma + beta learned (moving stats excluded), 0 MACs
BN = (0, 2 * 16)
# dense: 4*4*16 inputs -> 10
DENSE = (256 * 10, 256 * 10 + 10)
TINY_MACS = GROUPED[0] + DEPTHWISE[0] + DENSE[0]
TINY_PARAMS = GROUPED[1] + DEPTHWISE[1] + BN[1] + DENSE[1]


def test_tiny_model_exact_to_the_mac():
    cost = flops.count(_tiny_model())
    assert cost.macs == TINY_MACS == 14080
    assert cost.params == TINY_PARAMS == 2914
    assert cost.per_layer["grouped"] == GROUPED
    assert cost.per_layer["depthwise"] == DEPTHWISE
    assert cost.per_layer["bn"] == BN
    assert cost.per_layer["dense"] == DENSE
    assert cost.per_layer["relu"] == (0, 0)


def test_params_exclude_only_bn_moving_statistics():
    model = _tiny_model()
    # model.count_params() also holds the BN moving mean and variance (2 per channel).
    assert model.count_params() - flops.count(model).params == 2 * 16


def test_frozen_weights_still_count_as_params():
    model = _tiny_model()
    model.get_layer("dense").trainable = False
    assert flops.count(model).params == TINY_PARAMS


def test_separable_transpose_conv1d_and_dense_per_position():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.SeparableConv2D(5, 3, padding="valid", use_bias=False, name="sep")(inputs)  # 4x4x5
    x = keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same", use_bias=False, name="up")(x)  # 8x8x2
    x = keras.layers.Reshape((64, 2), name="seq")(x)
    x = keras.layers.Conv1D(4, 3, padding="valid", use_bias=False, name="conv1d")(x)  # 62x4
    outputs = keras.layers.Dense(7, use_bias=False, name="per_position")(x)  # 62x7
    cost = flops.count(keras.Model(inputs, outputs))
    assert cost.per_layer["sep"][0] == (3 * 3 * 3 + 3 * 5) * 4 * 4
    assert cost.per_layer["up"][0] == 3 * 3 * 5 * 2 * 4 * 4  # per input position
    assert cost.per_layer["conv1d"][0] == 3 * 2 * 4 * 62
    assert cost.per_layer["per_position"][0] == 4 * 7 * 62
    assert cost.macs == sum(m for m, _ in cost.per_layer.values())
    assert cost.params == 3 * 3 * 3 + 3 * 5 + 3 * 3 * 2 * 5 + 3 * 2 * 4 + 4 * 7


def test_nested_model_called_twice_counts_macs_twice_params_once():
    inner = _tiny_model()
    inputs = keras.Input((8, 8, 4))
    outputs = keras.layers.Add()([inner(inputs), inner(inputs)])
    cost = flops.count(keras.Model(inputs, outputs))
    assert cost.macs == 2 * TINY_MACS
    assert cost.params == TINY_PARAMS
    assert cost.per_layer["tiny/grouped"] == (2 * GROUPED[0], GROUPED[1])


def test_sequential_model():
    model = keras.Sequential(
        [keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3, padding="same", groups=2), keras.layers.Flatten()]
    )
    assert flops.count(model).macs == GROUPED[0]


def test_unknown_weighted_layer_warns_and_counts_params():
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.scale

    inputs = keras.Input((4, 4, 3))
    outputs = Scale(name="my_scale")(inputs)
    with pytest.warns(UserWarning, match="my_scale"):
        cost = flops.count(keras.Model(inputs, outputs))
    assert (cost.macs, cost.params) == (0, 3)


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(keras.ops.zeros((1, 3)))
    with pytest.raises(MskdError, match="functional or built Sequential"):
        flops.count(net)


def test_unknown_spatial_size_is_rejected():
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(4, 3, name="conv_any_size")(inputs)
    with pytest.raises(MskdError, match="conv_any_size.*fixed input_shape"):
        flops.count(keras.Model(inputs, outputs))


def test_mobilenet_v2_imagenet_about_300m_macs_3_5m_params():
    cost = flops.count(keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)))
    assert cost.macs == pytest.approx(300e6, rel=0.01)
    assert cost.params == pytest.approx(3.5e6, rel=0.01)


# Published CIFAR-10 figures (HRank / pruning literature): (MACs, params).
PUBLISHED = {
    ("resnet20", "A"): (40.55e6, 0.27e6),
    ("resnet20", "B"): (40.81e6, 0.27e6),
    ("resnet56", "A"): (125.49e6, 0.85e6),
    ("resnet110", "A"): (252.89e6, 1.72e6),
    ("vgg16", "A"): (313.73e6, 14.98e6),
}


@pytest.mark.parametrize("name,shortcut", sorted(PUBLISHED))
def test_published_cifar_figures_within_one_percent(name, shortcut):
    from mskd_tf import models

    cost = flops.count(models.build(name, (32, 32, 3), 10, shortcut=shortcut))
    macs, params = PUBLISHED[(name, shortcut)]
    assert cost.macs == pytest.approx(macs, rel=0.01)
    assert cost.params == pytest.approx(params, rel=0.01)


def test_resnet56_conv_dense_macs_exact_and_fast():
    from mskd_tf import models

    model = models.build("resnet56", (32, 32, 3), 10)
    start = time.perf_counter()
    cost = flops.count(model)
    assert time.perf_counter() - start < 0.5
    # stem + 18 convs 16->16 @32x32 + (16->32 + 17 convs 32->32) @16x16 + (32->64 + 17 64->64) @8x8 + fc
    stage = 3 * 3 * 16 * 16 * 32 * 32  # every 3x3 conv that keeps the stage width costs this
    first = 3 * 3 * 16 * 32 * 16 * 16  # the down-sampling conv of stages 2 and 3 costs this
    expected = 3 * 3 * 3 * 16 * 32 * 32 + 18 * stage + 2 * (first + 17 * stage) + 64 * 10
    assert cost.macs == expected == 125_485_696


def test_normalization_constants_are_not_params():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Normalization(mean=[0.5, 0.5, 0.5], variance=[0.04, 0.04, 0.04], name="normalize")(inputs)
    outputs = keras.layers.Conv2D(2, 1, use_bias=False, name="pointwise")(x)
    cost = flops.count(keras.Model(inputs, outputs))
    assert (cost.macs, cost.params) == (3 * 2 * 4 * 4, 3 * 2)
    assert cost.per_layer["normalize"] == (0, 0)
