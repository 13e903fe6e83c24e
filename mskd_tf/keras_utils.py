"""Small helpers over Keras models that several stages need: walk nested layers, copy, fingerprint."""

from __future__ import annotations

import hashlib

import keras
import numpy as np


def all_layers(model):
    """Every layer of ``model``, nested models included: a nested model, then its own layers."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def copy_with_weights(model):
    """A fresh copy of ``model`` with the same weights (its variables in the current strategy scope)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def with_synchronized_batchnorm(model, synchronized: bool):
    """A copy of ``model`` (variables in the current strategy scope) with every BatchNorm's ``synchronized`` set.

    Synchronized BatchNorm computes batch statistics over the global batch, so a step on N replicas
    equals the step on one device; the artifacts are saved with it off (a training aid, not the model).
    """

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = synchronized
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def weights_digest(model) -> str:
    """16 hex digits identifying the model's weights (a changed model restarts what was resumed from it)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]
