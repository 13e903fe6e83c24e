"""Teacher architectures as plain Keras 3 functional models.

``build(name, input_shape, num_classes)`` returns a functional model made of
built-in layers only (no Lambda, no subclassed layers), with stable layer names
and logits from a final ``Dense`` named ``classifier``. ``available()`` lists
the names.
"""

from __future__ import annotations

import functools

import keras

from mskd_tf.errors import MskdError
from mskd_tf.models.common import model_input
from mskd_tf.models.mobilenet import mobilenet_v2
from mskd_tf.models.resnet import SHORTCUTS, resnet_cifar
from mskd_tf.models.small_cnn import small_cnn
from mskd_tf.models.vgg import vgg_cifar

# name -> function(x, num_classes, *, width, dropout, [shortcut]) returning logits.
_ARCHITECTURES = {
    **{f"resnet{depth}": functools.partial(resnet_cifar, depth=depth) for depth in (20, 32, 56, 110)},
    **{f"vgg{depth}": functools.partial(vgg_cifar, depth=depth) for depth in (11, 16, 19)},
    "mobilenet_v2": mobilenet_v2,
    "small_cnn": small_cnn,
}


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(_ARCHITECTURES)


def build(
    name: str,
    input_shape,
    num_classes: int,
    *,
    normalization=None,
    shortcut: str = "A",
    width: float = 1.0,
    dropout: float = 0.0,
) -> keras.Model:
    """Build an untrained teacher network.

    Args:
        name: one of :func:`available` (``resnet20/32/56/110``, ``vgg11/16/19``,
            ``mobilenet_v2``, ``small_cnn``).
        input_shape: ``(height, width, channels)`` of one image, e.g. ``(32, 32, 3)``.
        num_classes: number of logits of the ``classifier`` layer (>= 2).
        normalization: ``(mean, std)`` per channel; adds a first ``Normalization``
            layer named ``normalize`` computing ``(x - mean) / std`` so the model
            takes images scaled to [0, 1]. None: no such layer.
        shortcut: ResNets only: ``"A"`` (parameter-free zero-padding, default) or
            ``"B"`` (1x1 conv + BN projection).
        width: channel multiplier of every conv / hidden dense layer (for
            MobileNetV2 the usual alpha, channels rounded to multiples of 8).
        dropout: dropout rate before the classifier (0 = no Dropout layer).

    Returns:
        A ``keras.Model`` named ``name`` producing logits (no softmax).

    Raises:
        MskdError: unknown name or invalid argument.
    """
    if name not in _ARCHITECTURES:
        raise MskdError(f"unknown model {name!r}; available models: {', '.join(available())}")
    input_shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise MskdError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if shortcut not in SHORTCUTS:
        raise MskdError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 conv projection), got {shortcut!r}")
    if not isinstance(width, (int, float)) or width <= 0:
        raise MskdError(f"width must be a positive channel multiplier (e.g. 0.5, 1.0), got {width!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise MskdError(f"dropout must be a rate in [0, 1), got {dropout!r}")

    options = {"width": float(width), "dropout": float(dropout)}
    if name.startswith("resnet"):
        options["shortcut"] = shortcut
    inputs, x = model_input(input_shape, normalization)
    logits = _ARCHITECTURES[name](x, num_classes, **options)
    return keras.Model(inputs, logits, name=name)


def _check_input_shape(input_shape):
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise MskdError(
            f"input_shape must be (height, width, channels) of positive integers, e.g. (32, 32, 3); "
            f"got {input_shape!r}"
        )
    return shape
