"""Knowledge distillation: train the selected sub-network from the original network.

The :class:`Distiller` is a ``keras.Model`` whose ``train_step`` runs the frozen
teacher in inference mode and trains the student on::

    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))
      + feature_kd * mean over stage pairs of MSE(teacher_feature, proj(student_feature))

The KL term is ``keras.distillation.LogitsDistillation`` with an explicit
``keras.losses.KLDivergence()`` instance (its default ``"kl_divergence"`` string
resolves to a plain function, which skips the softmax and the T^2 factor), and
the hint term is ``keras.distillation.FeatureDistillation`` with a
``MeanSquaredError()`` instance. Both are Keras ``Loss`` objects, so each replica's
value is scaled by 1/replicas and summed gradients under ``MirroredStrategy``
equal the single-device ones; logged values are unscaled again.

We do not subclass ``keras.distillation.Distiller``: it runs the student a second
time to extract features (double BatchNorm updates), logs replica-scaled losses
under a strategy and saves the teacher with the student.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import copy_with_weights, with_synchronized_batchnorm
from mskd_tf.training import (DEFAULT_WEIGHT_DECAY, NanGuard, StopAfterSteps, budget_steps, compile_kwargs,
                              fit_across_workers, fused_batchnorm, is_softmax, make_optimizer, one_pass_per_epoch,
                              outputs_probabilities, seeded, steps_per_epoch)

OUTPUT_KINDS = ("auto", "logits", "probabilities")
_TINY = 1e-30  # floor before log(probabilities); far below any softmax value that matters at T >= 1


class LogitsTap:
    """One forward pass of a classifier that yields logits plus chosen intermediate tensors.

    Softmax heads are undone exactly where the graph allows it (a ``Softmax`` /
    ``Activation('softmax')`` layer: take its input; a ``Dense(..., 'softmax')``:
    recompute the pre-activation from its kernel). Otherwise probabilities are
    turned into log-probabilities, which are valid logits (same softmax).
    """

    def __init__(self, model: keras.Model, role: str, feature_layers=(), output_kind: str = "auto"):
        self.model = model
        head = model.layers[-1] if getattr(model, "layers", None) else None
        softmax_head = head is not None and is_softmax(head)
        if output_kind == "logits" and softmax_head:
            raise MskdError(
                f"output_kind='logits' but the {role}'s last layer {head.name!r} applies softmax; "
                "use output_kind='auto' or 'probabilities'."
            )
        self.probabilities = softmax_head or output_kind == "probabilities"
        self.dense_head = None
        has_graph = getattr(model, "inputs", None) is not None and len(model.outputs) == 1
        if feature_layers and not has_graph:
            raise MskdError(f"feature distillation needs a functional {role} with one output; {model.name!r} is not.")
        if not has_graph:
            self.graph, self.exact = None, False
            return
        final = model.outputs[0]
        self.exact = True
        if softmax_head and isinstance(head, (keras.layers.Softmax, keras.layers.Activation)):
            final = head.input
        elif softmax_head and isinstance(head, keras.layers.Dense):
            final, self.dense_head = head.input, head
        else:
            self.exact = not self.probabilities
        features = [model.get_layer(name).output for name in feature_layers]
        # ``model.inputs``, not ``model.input``: a keras.Sequential has no ``input`` of its own.
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.graph = keras.Model(inputs, [final, *features], name=f"{model.name}_tap")

    def __call__(self, x, training):
        """Returns ``(logits, [features...])``."""
        if self.graph is None:
            out, features = self.model(x, training=training), []
        else:
            outputs = self.graph(x, training=training)
            # A one-output functional model returns a bare tensor, not a list.
            out, *features = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        if self.dense_head is not None:
            out = ops.matmul(out, self.dense_head.kernel)
            if self.dense_head.use_bias:
                out = out + self.dense_head.bias
        elif self.probabilities and not self.exact:
            out = ops.log(ops.maximum(out, _TINY))
        return out, features


# Layers whose 4-D output is an image-like feature map on the main path.
_FEATURE_MAP_LAYERS = (
    keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.Add,
    keras.layers.Concatenate, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
)


def stage_ends(model: keras.Model) -> list[str]:
    """Names of the last layer at each spatial resolution (4-D outputs), in depth order.

    For ResNet/VGG/MobileNet-style networks these are the outputs of each stage,
    the usual FitNets hint points.
    """
    last_at = {}
    for layer in model.layers:
        if not isinstance(layer, _FEATURE_MAP_LAYERS):  # skips reshapes/padding that fake 4-D shapes
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # shared layers have no single output
            continue
        if len(shape) == 4:
            last_at.pop((shape[1], shape[2]), None)  # re-insert to keep depth order of last occurrence
            last_at[(shape[1], shape[2])] = layer.name
    return list(last_at.values())


def default_feature_pairs(teacher: keras.Model, student: keras.Model) -> list[tuple[str, str]]:
    """Pair the teacher's and the student's stage outputs.

    By name first (pruned clones keep layer names), otherwise by position when
    both have the same number of stages at the same resolutions.
    """
    t_ends, s_ends = stage_ends(teacher), stage_ends(student)
    s_names = {layer.name for layer in student.layers}
    if t_ends and all(name in s_names for name in t_ends):
        pairs = [(name, name) for name in t_ends]
    elif t_ends and len(t_ends) == len(s_ends):
        pairs = list(zip(t_ends, s_ends))
    else:
        raise MskdError(
            f"cannot pair stage outputs for feature distillation: teacher stages {t_ends}, student stages "
            f"{s_ends}. Pass feature_pairs=[(teacher_layer, student_layer), ...] explicitly."
        )
    for t_name, s_name in pairs:
        t_shape, s_shape = teacher.get_layer(t_name).output.shape, student.get_layer(s_name).output.shape
        if len(t_shape) != 4 or tuple(t_shape[1:3]) != tuple(s_shape[1:3]):
            raise MskdError(
                f"feature pair ({t_name!r}, {s_name!r}) has shapes {t_shape} vs {s_shape}; the spatial "
                "sizes must match. Pass feature_pairs explicitly."
            )
    return pairs


class Distiller(keras.Model):
    """Trains ``student`` from a frozen ``teacher`` (logit KD plus optional FitNets hints).

    Args:
        teacher: trained classifier; frozen (``trainable=False``) and always run
            with ``training=False``.
        student: classifier with the same input and number of classes.
        feature_pairs: ``None`` (no hint loss), ``"auto"`` (stage outputs, see
            :func:`default_feature_pairs`) or a list of ``(teacher_layer,
            student_layer)`` names. Where the student has fewer channels a learned
            1x1 convolution projects it to the teacher's width.
        output_kind: ``"auto"`` (softmax heads are detected), ``"logits"`` or
            ``"probabilities"`` (for both models), or a ``(teacher_kind,
            student_kind)`` pair.

    ``fit``/``evaluate`` log ``loss`` (total), ``student_loss`` (CE),
    ``distillation_loss`` (T^2 KL), ``feature_loss`` (when hints are on) and the
    compiled metrics. ``save()`` writes the student only, so checkpoints load
    without custom objects.
    """

    def __init__(self, teacher, student, *, feature_pairs=None, output_kind="auto", name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise MskdError(f"{role} must be a keras.Model, got {type(model).__name__}.")
        kinds = (output_kind, output_kind) if isinstance(output_kind, str) else tuple(output_kind)
        if len(kinds) != 2 or any(kind not in OUTPUT_KINDS for kind in kinds):
            raise MskdError(
                f"output_kind={output_kind!r} is unknown; use one of {', '.join(OUTPUT_KINDS)} "
                "or a (teacher_kind, student_kind) pair."
            )
        t_classes, s_classes = (getattr(m, "outputs", None) and m.outputs[0].shape[-1] for m in (teacher, student))
        if t_classes and s_classes and t_classes != s_classes:
            raise MskdError(
                f"teacher {teacher.name!r} predicts {t_classes} classes but student {student.name!r} "
                f"predicts {s_classes}; distillation needs the same classes."
            )
        teacher.trainable = False
        self.teacher, self.student = teacher, student
        if feature_pairs == "auto":
            feature_pairs = default_feature_pairs(teacher, student)
        self.feature_pairs = [tuple(pair) for pair in (feature_pairs or [])]
        for t_name, s_name in self.feature_pairs:
            for role, model, layer_name in (("teacher", teacher, t_name), ("student", student, s_name)):
                if layer_name not in {layer.name for layer in model.layers}:
                    raise MskdError(f"feature pair layer {layer_name!r} is not a layer of the {role} {model.name!r}.")
        self._teacher_tap = LogitsTap(teacher, "teacher", [t for t, _ in self.feature_pairs], kinds[0])
        self._student_tap = LogitsTap(student, "student", [s for _, s in self.feature_pairs], kinds[1])
        self.projections = [
            self._projection(i, teacher.get_layer(t).output.shape, student.get_layer(s).output.shape)
            for i, (t, s) in enumerate(self.feature_pairs)
        ]
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.student_tracker = keras.metrics.Mean(name="student_loss")
        self.distill_tracker = keras.metrics.Mean(name="distillation_loss")
        self.feature_tracker = keras.metrics.Mean(name="feature_loss") if self.feature_pairs else None
        self.temperature, self.alpha, self.feature_kd = 4.0, 0.5, 0.0

    def _projection(self, index, t_shape, s_shape):
        if t_shape[-1] == s_shape[-1]:
            return None
        projection = keras.layers.Conv2D(t_shape[-1], 1, use_bias=False, name=f"hint_projection_{index}")
        projection.build(tuple(s_shape))
        return projection

    def compile(
        self, optimizer="sgd", metrics=("accuracy",), *, temperature=4.0, alpha=0.5, feature_kd=0.0, **kwargs
    ):
        """Set the optimizer, metrics and the loss mix (``temperature`` T, ``alpha``, ``feature_kd``)."""
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise MskdError(f"temperature={temperature!r} must be a positive number (typical: 2-8).")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise MskdError(f"alpha={alpha!r} must be in [0, 1] (1 = plain cross-entropy).")
        if not (isinstance(feature_kd, (int, float)) and feature_kd >= 0):
            raise MskdError(f"feature_kd={feature_kd!r} must be >= 0.")
        if feature_kd and not self.feature_pairs:
            raise MskdError("feature_kd > 0 needs feature pairs: build the Distiller with feature_pairs='auto'.")
        self.temperature, self.alpha, self.feature_kd = float(temperature), float(alpha), float(feature_kd)
        self._ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._kd = keras.distillation.LogitsDistillation(self.temperature, loss=keras.losses.KLDivergence())
        self._hint = keras.distillation.FeatureDistillation(loss=keras.losses.MeanSquaredError())
        # XLA gives nothing on this CPU and fails under MirroredStrategy on logical CPUs.
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=optimizer, metrics=list(metrics or []), **kwargs)

    @property
    def metrics(self):
        # Our own "loss" tracker replaces Keras' compiled one, which this model never updates.
        trackers = [self.total_tracker, self.student_tracker, self.distill_tracker]
        if self.feature_tracker is not None:
            trackers.append(self.feature_tracker)
        others = [m for m in super().metrics if m.name != "loss" and all(m is not t for t in trackers)]
        return trackers + others

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def _loss_terms(self, y, teacher_out, student_out):
        """Per-replica (1/replicas-scaled) loss terms and their weighted total."""
        (t_logits, t_features), (s_logits, s_features) = teacher_out, student_out
        t_logits = ops.stop_gradient(t_logits)
        terms = {"student_loss": self._ce(y, s_logits)}
        terms["distillation_loss"] = self._kd.compute_loss(t_logits, s_logits)
        total = self.alpha * terms["student_loss"] + (1.0 - self.alpha) * terms["distillation_loss"]
        if self.feature_pairs:
            hints = [
                self._hint.compute_loss(ops.stop_gradient(t), s if proj is None else proj(s))
                for t, s, proj in zip(t_features, s_features, self.projections)
            ]
            terms["feature_loss"] = ops.mean(ops.stack(hints))
            total = total + self.feature_kd * terms["feature_loss"]
        terms["loss"] = total
        return terms

    def _log_terms(self, terms, x):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = ops.shape(x)[0]
        trackers = {"loss": self.total_tracker, "student_loss": self.student_tracker}
        trackers.update(distillation_loss=self.distill_tracker, feature_loss=self.feature_tracker)
        for key, value in terms.items():
            trackers[key].update_state(value * replicas, sample_weight=batch)

    def _trained_variables(self):
        variables = list(self.student.trainable_variables)
        if self.feature_kd:
            variables += [v for p in self.projections if p is not None for v in p.trainable_variables]
        return variables

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _reject_sample_weight(sample_weight)
        teacher_out = self._teacher_tap(x, training=False)
        variables = self._trained_variables()
        with tf.GradientTape() as tape:
            student_out = self._student_tap(x, training=True)
            terms = self._loss_terms(y, teacher_out, student_out)
            scaled = self.optimizer.scale_loss(terms["loss"])
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        self._log_terms(terms, x)
        return self.compute_metrics(x, y, student_out[0])

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _reject_sample_weight(sample_weight)
        teacher_out = self._teacher_tap(x, training=False)
        student_out = self._student_tap(x, training=False)
        self._log_terms(self._loss_terms(y, teacher_out, student_out), x)
        return self.compute_metrics(x, y, student_out[0])

    def save(self, filepath, *args, **kwargs):
        """Saves the student only (teacher and hint projections are training aids)."""
        return self.student.save(filepath, *args, **kwargs)


def _reject_sample_weight(sample_weight):
    if sample_weight is not None:
        raise MskdError("Distiller does not support sample weights / class_weight; rebalance the dataset instead.")


def _in_scope(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose variables belong to the current strategy scope."""
    return copy_with_weights(model)


def kd_per_example(teacher_logits, student_logits, temperature: float):
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per example (shape ``(batch,)``).

    The per-example form of the Distiller's ``distillation_loss`` (its batch mean is
    ``LogitsDistillation(T, KLDivergence())``), for loops that sum losses over a global
    batch themselves (selection's :class:`~mskd_tf.candidate_training.Finetuner`).
    """
    t = ops.softmax(ops.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_s = ops.log_softmax(student_logits / temperature, axis=-1)
    log_t = ops.log(ops.maximum(t, _TINY))
    return temperature**2 * ops.sum(t * (log_t - log_s), axis=-1)


# A cross-entropy run ships instead of the distilled one only when validation shows it better beyond this
# two-sided p-value of the paired sign test; below it the difference is within noise and KD ships.
KD_CE_SIGNIFICANCE = 0.05


def paired_sign_test(kd_correct, ce_correct) -> dict:
    """The two runs compared image by image on one validation set (McNemar's exact test).

    Only the images exactly one run gets right tell them apart: ``kd_only`` and ``ce_only`` of them. Under "equally
    good" each is a fair coin flip, so the two-sided p-value is that of a count as uneven as this one in
    ``kd_only + ce_only`` flips. 140 validation images that split 7 to 5 do not show a difference; 5000 that
    split 120 to 60 do.
    """
    kd_correct, ce_correct = np.asarray(kd_correct, bool), np.asarray(ce_correct, bool)
    if kd_correct.shape != ce_correct.shape:
        raise MskdError(f"paired_sign_test: {kd_correct.shape} vs {ce_correct.shape} predictions; the runs must be "
                        "scored on the same images.")
    kd_only, ce_only = int(np.sum(kd_correct & ~ce_correct)), int(np.sum(ce_correct & ~kd_correct))
    flips, fewer = kd_only + ce_only, min(kd_only, ce_only)
    p_value = 1.0 if flips == 0 else min(1.0, 2 * sum(math.comb(flips, k) for k in range(fewer + 1)) / 2 ** flips)
    return {"kd_only": kd_only, "ce_only": ce_only, "p_value": p_value}


@fused_batchnorm()
def distill(
    teacher,
    student,
    train_ds,
    val_ds,
    *,
    epochs,
    steps=None,
    temperature=4.0,
    alpha=0.5,
    feature_kd=0.0,
    kd=True,
    optimizer="sgd",
    lr=0.01,
    weight_decay=DEFAULT_WEIGHT_DECAY,
    strategy=None,
    callbacks=(),
    seed=0,
    verbose="auto",
):
    """The ``distill`` stage: train ``student`` from ``teacher``; returns ``(student, history)``.

    ``epochs`` may be fractional; ``steps`` (optimizer steps) overrides it, so a
    budget that selection has partly spent can be honoured exactly. The learning
    rate decays (cosine) to zero over exactly that many steps.
    ``kd=False`` is the baseline: the same student, optimizer, schedule and
    steps, plain cross-entropy and no teacher, so the gain of KD is measurable.
    ``feature_kd`` > 0 adds FitNets hints on the stage outputs with that weight.
    Datasets yield ``(images, int labels)`` batches. With a ``strategy`` the
    models are copied into its scope and the trained copy is returned.
    Raises :class:`MskdError` on bad arguments or when the loss becomes NaN.
    """
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise MskdError(f"epochs={epochs!r} must be a positive number (--student_epochs).")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise MskdError(f"steps={steps!r} must be a positive integer (optimizer steps).")
    with seeded(seed):  # reproducible, and the caller's RNGs are given back
        per_epoch = steps_per_epoch(train_ds)
        total_steps = steps if steps is not None else budget_steps(epochs, per_epoch)
        fit_epochs = math.ceil(total_steps / per_epoch)
        strategy = strategy or tf.distribute.get_strategy()
        copy = strategy is not tf.distribute.get_strategy()
        across_workers = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        teacher_was_trainable = teacher.trainable
        with strategy.scope():
            if across_workers:  # global-batch BatchNorm statistics: the maths of one process (and equal workers)
                student = with_synchronized_batchnorm(student, True)
            elif copy:
                student = _in_scope(student)
                teacher = _in_scope(teacher) if kd else teacher
            opt = make_optimizer(optimizer, lr, total_steps=total_steps, weight_decay=weight_decay)
            if kd:
                model = Distiller(teacher, student, feature_pairs="auto" if feature_kd else None)
                model.compile(opt, temperature=temperature, alpha=alpha, feature_kd=feature_kd, **compile_kwargs())
            else:
                model = student
                model.compile(
                    opt, keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(student)),
                    metrics=["accuracy"], **compile_kwargs(),
                )
        try:
            if not model.built:  # a BackupAndRestore among the callbacks restores into a built model only
                model(np.zeros((1, *student.input_shape[1:]), np.float32))
            if across_workers:
                history = fit_across_workers(model, train_ds, val_ds, epochs=fit_epochs, strategy=strategy,
                                             total_steps=total_steps, callbacks=callbacks, what="distill",
                                             advice="Lower --finetune_lr")
                # A plain copy: Keras' predict/evaluate on the strategy's variables would need fit's machinery.
                return with_synchronized_batchnorm(student, False), history
            guard = NanGuard()
            history = model.fit(
                **one_pass_per_epoch(train_ds), validation_data=val_ds, epochs=fit_epochs,
                callbacks=[guard, StopAfterSteps(total_steps), *callbacks], verbose=verbose,
                shuffle=False,  # tf.data input: shuffling is the pipeline's job
            )
            guard.raise_if_tripped("distill")
            return student, history.history
        finally:
            teacher.trainable = teacher_was_trainable  # the Distiller froze it; it may be the caller's own model
