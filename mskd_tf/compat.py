"""The one place where ``tf_keras`` and ``tensorflow_model_optimization`` are imported (for QAT).

tfmot's quantization-aware training accepts only tf_keras (Keras 2) models, and
importing tfmot sets ``TF_USE_LEGACY_KERAS=1``, which changes what ``tf.keras``
means for the rest of the process. So, like tfmot's own ``compat.py``, every
Keras-2 choice is made here and nowhere else, and only when QAT is asked for:

* :func:`to_tf_keras` rebuilds a Keras 3 functional model layer by layer as a
  tf_keras model with identical weights;
* :func:`qat_int8` wraps it with ``tfmot.quantization.keras.quantize_model``
  semantics (layers tfmot's default 8-bit registry supports get fake-quant;
  others, such as ``Normalization``, stay float and are calibrated by the
  converter), fine-tunes it with the Distiller's loss (``alpha`` x CE +
  ``(1 - alpha)`` x T^2 KL to the teacher, the same Keras loss classes as
  :mod:`mskd_tf.distill`) and converts it to a full-int8 TFLite flatbuffer.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from mskd_tf.errors import MskdError


def load_tf_keras():
    """``(tf_keras, tfmot)``, imported lazily; restores ``TF_USE_LEGACY_KERAS`` afterwards."""
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as err:
        raise MskdError(
            "--qat needs the packages tf-keras and tensorflow-model-optimization "
            f"(pip install tf-keras tensorflow-model-optimization): {err}"
        ) from err
    finally:
        # tfmot sets it as an import side effect; the rest of mskd_tf uses Keras 3.
        if before is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = before
    return tf_keras, tfmot


# Keras 3 layer class -> the constructor arguments carried over to its tf_keras twin.
# Initializers/regularizers/constraints are left out: weights are copied afterwards.
_LAYER_ARGS = {
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "dilation_rate", "groups", "activation", "use_bias"),
    "DepthwiseConv2D": ("kernel_size", "strides", "padding", "depth_multiplier", "dilation_rate", "activation", "use_bias"),
    "Dense": ("units", "activation", "use_bias"),
    "BatchNormalization": ("axis", "momentum", "epsilon", "center", "scale"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Activation": ("activation",),
    "Add": (),
    "Multiply": (),
    "Concatenate": ("axis",),
    "Flatten": (),
    "GlobalAveragePooling2D": ("keepdims",),
    "GlobalMaxPooling2D": ("keepdims",),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "ZeroPadding2D": ("padding",),
    "Dropout": ("rate",),
    "Reshape": ("target_shape",),
    "Rescaling": ("scale", "offset"),
    "Softmax": ("axis",),
}


def _history_refs(value):
    """Names of the layers whose outputs feed a node (from the functional config's ``keras_history``)."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, _node, index = value["config"]["keras_history"]
            return [(name, index)]
        return [ref for v in value.values() for ref in _history_refs(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _history_refs(v)]
    return []


def _tf_keras_layer(tf_keras, layer, class_name):
    config = layer.get_config()
    if class_name == "Normalization":
        if getattr(layer, "invert", False):
            raise MskdError(f"layer {layer.name!r}: Normalization(invert=True) is not supported by the QAT rebuild.")
        return tf_keras.layers.Normalization(
            axis=config["axis"],
            mean=np.asarray(layer.adapt_mean),
            variance=np.asarray(layer.adapt_variance),
            name=layer.name,
        )
    if class_name not in _LAYER_ARGS:
        raise MskdError(
            f"layer {layer.name!r} ({class_name}) cannot be rebuilt in tf_keras for QAT; supported: "
            f"{', '.join(sorted([*_LAYER_ARGS, 'Normalization']))}. Export without --qat (post-training int8)."
        )
    kwargs = {key: config[key] for key in _LAYER_ARGS[class_name] if key in config}
    for key in ("activation",):
        if key in kwargs and not isinstance(kwargs[key], str):
            raise MskdError(f"layer {layer.name!r}: a custom {key} cannot be rebuilt in tf_keras for QAT.")
    if class_name == "ReLU" and kwargs.get("negative_slope") == 0.0:
        kwargs.pop("negative_slope")  # tf_keras' ReLU calls it the same, but tfmot matches the default only
    return getattr(tf_keras.layers, class_name)(name=layer.name, **kwargs)


def to_tf_keras(model):
    """Rebuild a Keras 3 functional model as a tf_keras functional model with the same weights.

    Supports single-input, single-output graphs of common CNN layers (see
    ``_LAYER_ARGS``, plus ``Normalization``); anything else raises
    :class:`MskdError` naming the layer. Each layer must be called once.
    """
    tf_keras, _ = load_tf_keras()
    config = model.get_config()
    ends = {key: _endpoints(config.get(key)) for key in ("input_layers", "output_layers")}
    if "layers" not in config or len(ends["input_layers"]) != 1 or len(ends["output_layers"]) != 1:
        raise MskdError(
            f"model {model.name!r} must be a functional model with one input and one output for the QAT rebuild."
        )
    outputs = {}
    for entry in config["layers"]:
        name, class_name = entry["name"], entry["class_name"]
        layer = model.get_layer(name)
        if class_name == "InputLayer":
            outputs[name] = tf_keras.Input(shape=tuple(layer.output.shape[1:]), name=name)
            continue
        nodes = entry.get("inbound_nodes", [])
        if len(nodes) != 1:
            raise MskdError(f"layer {name!r} is called {len(nodes)} times; the QAT rebuild needs each layer used once.")
        inputs = [outputs[ref] for ref, _ in _history_refs(nodes[0]["args"])]
        twin = _tf_keras_layer(tf_keras, layer, class_name)
        outputs[name] = twin(inputs if len(inputs) > 1 else inputs[0])
        if class_name != "Normalization":
            twin.set_weights([np.asarray(w) for w in layer.get_weights()])
    return tf_keras.Model(outputs[ends["input_layers"][0]], outputs[ends["output_layers"][0]], name=model.name)


def _endpoints(value):
    # Keras 3 writes one endpoint as ["name", 0, 0] and several as [["a", 0, 0], ...].
    if not value:
        return []
    return [value[0]] if isinstance(value[0], str) else [v[0] for v in value]


def quantize_aware(tf_keras_model):
    """tfmot QAT model: fake-quant on every layer tfmot's default 8-bit registry supports."""
    tf_keras, tfmot = load_tf_keras()
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    annotate = tfmot.quantization.keras.quantize_annotate_layer

    def clone(layer):
        return annotate(layer.__class__.from_config(layer.get_config())) if registry.supports(layer) else layer.__class__.from_config(layer.get_config())

    annotated = tf_keras.models.clone_model(tf_keras_model, clone_function=clone)
    annotated.set_weights(tf_keras_model.get_weights())
    return tfmot.quantization.keras.quantize_apply(annotated)


def qat_int8(
    model,
    *,
    train_ds,
    calibration_images: np.ndarray,
    teacher=None,
    epochs: int = 2,
    lr: float = 1e-4,
    temperature: float = 4.0,
    alpha: float = 0.5,
    steps_per_epoch: int | None = None,
) -> bytes:
    """Quantization-aware fine-tuning of a Keras 3 classifier, converted to a full-int8 .tflite.

    ``train_ds`` yields ``(images, labels)`` batches. With a ``teacher`` (Keras 3
    model with the same classes) the loss is the Distiller's
    ``alpha * CE + (1 - alpha) * T^2 KL(teacher/T || student/T)``; without one,
    plain CE. Adam at ``lr`` for ``epochs`` (of ``steps_per_epoch`` batches, or the
    whole dataset). ``calibration_images`` calibrate the layers left float.
    """
    import keras
    import tensorflow as tf

    from mskd_tf import quantize, training

    if epochs < 1 or not lr > 0:
        raise MskdError(f"QAT needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}.")
    if train_ds is None:
        raise MskdError("QAT needs train_ds (the training split as (images, labels) batches).")
    tf_keras, _ = load_tf_keras()
    qat_model = quantize_aware(to_tf_keras(model))
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kd = keras.distillation.LogitsDistillation(temperature, loss=keras.losses.KLDivergence())
    optimizer = tf_keras.optimizers.Adam(lr)

    @tf.function
    def step(batch):
        x, y = tf.cast(batch[0], tf.float32), batch[1]
        with tf.GradientTape() as tape:
            logits = qat_model(x, training=True)
            loss = ce(y, logits)
            if teacher is not None:
                loss = alpha * loss + (1.0 - alpha) * kd.compute_loss(tf.stop_gradient(teacher(x, training=False)), logits)
        grads = tape.gradient(loss, qat_model.trainable_variables)
        optimizer.apply_gradients(zip(grads, qat_model.trainable_variables))
        return loss

    per_epoch = steps_per_epoch or training.steps_per_epoch(train_ds, "QAT train_ds")
    _, bad_loss = training.run_steps(step, train_ds, epochs * per_epoch, batches_per_epoch=per_epoch,
                                     what="QAT train_ds")
    if bad_loss is not None:
        raise MskdError(f"QAT fine-tuning diverged (loss {bad_loss}); lower the QAT lr (now {lr}).")

    with tempfile.TemporaryDirectory(prefix="mskd_qat_") as tmp:
        input_spec = tf.TensorSpec([None, *qat_model.input_shape[1:]], tf.float32)
        serve = tf.function(lambda x: qat_model(x, training=False), input_signature=[input_spec])
        tf.saved_model.save(qat_model, tmp, signatures=serve.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        quantize.set_full_int8(converter, calibration_images)
        return converter.convert()
