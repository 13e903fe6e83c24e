"""BatchNorm statistics: re-estimating them on a few batches, and repairing a teacher whose statistics lag.

Pruning changes what later layers sum over, and a teacher trained for few steps per epoch can carry moving
statistics that lag its weights: both are fixed by averaging fresh batch statistics without a gradient step.
Candidates, the sensitivity measurement, selection's scores and the teacher stage all use :func:`recalibrate_batchnorm`.
"""

from __future__ import annotations

import keras

from mskd_tf import training
from mskd_tf.keras_utils import all_layers, copy_with_weights


def batchnorms(model) -> list:
    """Every BatchNormalization layer of ``model``, nested models included."""
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model, dataset, num_batches: int) -> int:
    """Re-estimate every BatchNormalization's moving mean/variance on ``num_batches`` batches.

    Pruning removes channels that later layers summed over, so the teacher's BN
    statistics no longer describe the clone's activations, and an un-tuned clone
    scores near chance. Averaging fresh batch statistics (no gradient step: the
    "adaptive BN" of EagleEye, Li et al. 2020) restores a meaningful accuracy
    before any fine-tuning, which makes the candidates' early comparison fair.
    ``dataset``: a dataset of ``(images, labels)`` batches or a list of them.
    Returns the number of batches used.
    """
    layers = batchnorms(model)
    if not layers or num_batches < 1:
        return 0
    saved = [layer.momentum for layer in layers]
    sums, used = None, 0
    try:
        for layer in layers:  # momentum 0: each forward pass leaves exactly its batch's statistics
            layer.momentum = 0.0
        # Traced with momentum 0 (set above on every call), so one trace serves every recalibration of this model.
        forward = training.forward_function(model, training=True)
        for images, _ in dataset[:num_batches] if isinstance(dataset, list) else dataset.take(num_batches):
            forward(images)
            stats = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
            sums = stats if sums is None else [(m + dm, v + dv) for (m, v), (dm, dv) in zip(sums, stats)]
            used += 1
        for layer, (mean, variance) in zip(layers, sums or []):  # the average over the batches
            layer.moving_mean.assign(mean / used)
            layer.moving_variance.assign(variance / used)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return used


# Batches of un-augmented training data for re-estimating the teacher's BatchNorm statistics.
# A constant, not a flag: the teacher stage's inputs (and so every trained teacher) stay valid.
TEACHER_BN_BATCHES = 20
# The recalibrated teacher replaces the trained one only when it is this much better on validation.
TEACHER_BN_MARGIN = 0.005


def repair_batchnorm(teacher, calibration, val):
    """The teacher, or a copy with re-estimated BatchNorm statistics when that copy is clearly better.

    With few steps per epoch the moving statistics lag the weights, and a teacher that fits its
    training set can score near chance in inference mode; distilling from it would teach the student
    its mistakes. Candidates are scored after the same recalibration, so teacher and candidates are
    compared alike. The caller's model is never modified. Returns ``(model, record)``.
    """
    if val is None or not batchnorms(teacher):
        return teacher, None
    before = training.accuracy(teacher, val)
    copy = copy_with_weights(teacher)
    used = recalibrate_batchnorm(copy, calibration, TEACHER_BN_BATCHES)
    after = training.accuracy(copy, val)
    applied = after > before + TEACHER_BN_MARGIN
    record = {"val_acc_before": before, "val_acc_recalibrated": after, "batches": used, "applied": applied}
    if applied:
        print(f"teacher: BatchNorm statistics re-estimated on {used} training batches: validation accuracy "
              f"{100 * before:.2f}% -> {100 * after:.2f}% (the moving statistics lagged the weights)", flush=True)
    return (copy if applied else teacher), record
