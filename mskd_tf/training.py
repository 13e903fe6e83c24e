"""Shared training pieces: runtime settings, optimizer + schedule, callbacks, NaN guard.

Teacher training, candidate fine-tuning (selection) and distillation all build
their optimizer and callbacks here, so one flag means the same thing in every
stage. Every training entry point (the stage runner, ``distill.distill``,
``selection.select``) runs inside :func:`fused_batchnorm` and passes
``**compile_kwargs()`` to ``compile``: the speed settings measured in
``benchmarks/throughput.py`` live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf

from mskd_tf.errors import MskdError

# Keras decays decoupled (w -= lr * wd * w, outside the momentum), so the classic SGD recipe's L2 5e-4
# through momentum 0.9 is about 5e-4 / (1 - 0.9) = 5e-3 here. Measured on the full CIFAR-10 ResNet-20
# teacher (BENCHMARKS.md): 5e-4 overfit to 85.31% test, 5e-3 gave 87.00%. Config.weight_decay equals it.
DEFAULT_WEIGHT_DECAY = 5e-3


def is_softmax(layer) -> bool:
    """A ``Softmax`` layer, or any layer whose ``activation`` is softmax (``Dense(10, "softmax")``, ``Activation``)."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "") == "softmax"


def outputs_probabilities(model) -> bool:
    """Whether ``model`` ends in softmax (so losses must not treat its outputs as logits)."""
    return bool(model.layers) and is_softmax(model.layers[-1])

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


# ----------------------------------------------------------------------------- runtime

# Measured on this project's 2-core machine (BENCHMARKS.md, "Training throughput"): Keras 3's
# BatchNormalization runs as ~15 small element-wise ops per layer and direction
# on the TF backend; TF's FusedBatchNormV3 does the same in one kernel each way
# (and oneDNN folds the following ReLU into it).
# Keras' own call, even if this module is reloaded after patching the class.
_ORIGINAL_BN_CALL = getattr(keras.layers.BatchNormalization.call, "keras_call",
                            keras.layers.BatchNormalization.call)
_RUNTIME_LOCK = threading.Lock()
# "fused_batchnorm": whether the fused path is wanted; "depth": how many fused_batchnorm() blocks are open.
_RUNTIME = {"fused_batchnorm": True, "threads": None, "depth": 0}


def _fusable(layer, inputs, mask) -> bool:
    """Whether FusedBatchNormV3 computes exactly what ``layer`` would (else Keras' own path)."""
    return (
        keras.backend.backend() == "tensorflow"
        and mask is None
        and not layer.renorm
        and not layer.synchronized
        and len(inputs.shape) == 4
        and layer.axis in (-1, 3)
        and keras.backend.standardize_dtype(inputs.dtype) == "float32"
        and keras.backend.standardize_dtype(layer.moving_mean.dtype) == "float32"
        and layer.epsilon > 1.001e-5  # the fused kernel's lower bound
    )


def _batchnorm_call(self, inputs, training=None, mask=None):
    """``BatchNormalization.call`` through TF's fused kernel; same maths as Keras 3's.

    Normalises with the biased batch variance and updates the moving averages with
    it (as Keras 3 does; the fused kernel itself would apply Bessel's correction).
    Anything the fused kernel cannot do exactly goes through the original ``call``.
    """
    import tensorflow as tf

    if not (_RUNTIME["fused_batchnorm"] and _fusable(self, inputs, mask)):
        return _ORIGINAL_BN_CALL(self, inputs, training=training, mask=mask)
    gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
    beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
    if training and self.trainable:
        outputs, mean, unbiased_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
        )
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), unbiased_variance.dtype)
        variance = unbiased_variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs
    outputs, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta, mean=self.moving_mean, variance=self.moving_variance,
        epsilon=self.epsilon, data_format="NHWC", is_training=False,
    )
    return outputs


_batchnorm_call.keras_call = _ORIGINAL_BN_CALL


@contextlib.contextmanager
def fused_batchnorm():
    """Inside this block, ``keras.layers.BatchNormalization`` runs through TF's fused kernel.

    Only while mskd_tf trains: Keras' own ``call`` is put back when the outermost block
    exits, normally or by an exception, so a program that calls ``mskd_tf.compress`` keeps
    Keras' BatchNorm everywhere else. Blocks nest and may be entered from several threads
    (a counter under a lock); a model traced inside keeps the fused ops in that traced
    graph, which computes the same values. ``configure_runtime(fused_batchnorm=False)``
    makes the blocks use Keras' own implementation.
    """
    with _RUNTIME_LOCK:
        if _RUNTIME["depth"] == 0:
            keras.layers.BatchNormalization.call = _batchnorm_call
        _RUNTIME["depth"] += 1
    try:
        yield
    finally:
        with _RUNTIME_LOCK:
            _RUNTIME["depth"] -= 1
            if _RUNTIME["depth"] == 0:
                keras.layers.BatchNormalization.call = _ORIGINAL_BN_CALL


@contextlib.contextmanager
def seeded(seed: int):
    """Seed every RNG Keras draws from (Python, NumPy, TF, Keras' global SeedGenerator) inside this block.

    Library stages must be reproducible from their ``seed`` but must not reseed the caller's program:
    on exit (normal or by an exception) the Python and NumPy generator states, TF's global seed and
    Keras' global seed and SeedGenerator are put back as they were. Blocks nest.
    """
    from keras.src.backend.common import global_state  # Keras keeps its global seed here (no public getter)
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    from tensorflow.python.eager import context  # the global seed TF ops derive theirs from (no public getter)

    saved_python, saved_numpy, saved_tf = random.getstate(), np.random.get_state(), context.global_seed()
    saved_keras = {name: global_state.get_global_attribute(name)
                   for name in (rng_utils.GLOBAL_RANDOM_SEED, seed_generator.GLOBAL_SEED_GENERATOR)}
    keras.utils.set_random_seed(int(seed))
    try:
        yield
    finally:
        random.setstate(saved_python)
        np.random.set_state(saved_numpy)
        tf.random.set_seed(saved_tf)
        for name, value in saved_keras.items():
            global_state.set_global_attribute(name, value)


def configure_runtime(*, fused_batchnorm: bool = True, intra_op_threads: int | None = None,
                      inter_op_threads: int | None = None) -> dict:
    """Choose the speed settings for training on this CPU.

    * ``fused_batchnorm``: inside :func:`fused_batchnorm` blocks (every mskd_tf training
      entry point opens one), run ``keras.layers.BatchNormalization`` (4-D input, channels
      last, float32, no renorm/synchronized/mask) through TF's fused kernel. Layers,
      weights and saved files are unchanged; only the op graph traced inside differs.
      ``False`` keeps Keras' own implementation there too. Outside the blocks Keras'
      own BatchNorm always runs: nothing is changed for the rest of the process.
    * ``intra_op_threads`` / ``inter_op_threads``: TF thread pools; ``None`` keeps
      TF's default (one thread per core). They can only be set before TF runs its
      first op; later calls keep the pools TF already has (reported in the result).

    Idempotent. Returns the settings in effect, e.g. for a run report.
    """
    import tensorflow as tf

    with _RUNTIME_LOCK:
        _RUNTIME["fused_batchnorm"] = bool(fused_batchnorm)
        wanted = (intra_op_threads, inter_op_threads)
        if wanted != (None, None) and _RUNTIME["threads"] != wanted:
            for value, name in ((intra_op_threads, "intra_op_threads"), (inter_op_threads, "inter_op_threads")):
                if value is not None and (not isinstance(value, int) or value < 0):
                    raise MskdError(f"{name}={value!r} must be a non-negative integer (0 = TF's default).")
            try:
                if intra_op_threads is not None:
                    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
                if inter_op_threads is not None:
                    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
                _RUNTIME["threads"] = wanted
            except RuntimeError:  # TF already started: its pools are fixed for this process
                pass
        return {
            "fused_batchnorm": _RUNTIME["fused_batchnorm"],
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }


# Measured (BENCHMARKS.md, "Training throughput"): XLA on this CPU trains at about half the speed
# (its convolutions replace oneDNN's) and fails under MirroredStrategy on logical CPUs;
# steps_per_execution > 1 gained nothing (dispatch is ~1% of a step) and would make
# NanGuard and batch-level logs see only every n-th step.
COMPILE_KWARGS = {"jit_compile": False, "steps_per_execution": 1}


def compile_kwargs(**overrides) -> dict:
    """Keyword arguments every stage passes to ``Model.compile``: ``model.compile(..., **compile_kwargs())``."""
    settings = dict(COMPILE_KWARGS)
    settings.update(overrides)
    return settings


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(
    name: str = "sgd",
    lr: float = 0.1,
    *,
    total_steps: int,
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_steps: int = 0,
) -> keras.optimizers.Optimizer:
    """SGD with Nesterov momentum or AdamW, with decoupled weight decay.

    ``total_steps`` is the number of optimizer steps the schedule spans (epochs x
    steps per epoch). Weight decay is Keras' decoupled decay, applied to kernels
    only (BatchNorm and bias parameters are excluded by name, as is customary).
    """
    if name not in OPTIMIZERS:
        raise MskdError(f"optimizer={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")
    if schedule not in SCHEDULES:
        raise MskdError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise MskdError(f"lr={lr!r} must be a positive number.")
    if total_steps < 1:
        raise MskdError(f"total_steps={total_steps} must be >= 1 (is the training set empty?).")
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else lr,
            decay_steps=max(1, total_steps - warmup_steps),
            warmup_target=lr if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    elif schedule == "onecycle":
        # One-cycle: linear warm-up over 30% of the steps, then cosine to ~0.
        rise = max(1, int(0.3 * total_steps))
        rate = keras.optimizers.schedules.CosineDecay(
            lr / 25.0, decay_steps=max(1, total_steps - rise), warmup_target=lr, warmup_steps=rise
        )
    else:
        rate = lr
    if name == "sgd":
        opt = keras.optimizers.SGD(rate, momentum=momentum, nesterov=True, weight_decay=weight_decay or None)
    else:
        opt = keras.optimizers.AdamW(rate, weight_decay=weight_decay)
    if weight_decay:
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "moving_mean", "moving_variance"])
    return opt


def steps_per_epoch(dataset, what: str = "train_ds") -> int:
    """Batches in one pass of a finite ``tf.data`` dataset (counted when TF cannot tell)."""
    import tensorflow as tf

    steps = int(dataset.cardinality())
    if steps == tf.data.INFINITE_CARDINALITY:
        raise MskdError(f"{what} is infinite; pass a finite dataset (one epoch), e.g. without .repeat().")
    if steps == tf.data.UNKNOWN_CARDINALITY:
        steps = sum(1 for _ in dataset)  # e.g. after .filter(); counts one pass
    if steps < 1:
        raise MskdError(f"{what} is empty; check the data source and the batch size.")
    return steps


def one_pass_per_epoch(dataset, what: str = "train_ds") -> dict:
    """``fit`` arguments under which epoch ``k`` reads pass ``k`` of the one-epoch ``dataset``.

    A training pipeline re-shuffles and re-augments each time it is iterated, and Keras' ``fit``
    iterates a finite dataset twice per epoch (it opens the next epoch's iterator at the end of each
    epoch, then another at its start), so epoch ``k`` read pass ``2k`` and a resumed run, whose first
    epoch is pass 0 of a pipeline built for it, could not continue that sequence. One repeated stream
    read ``steps_per_epoch`` batches at a time is pass ``k`` at epoch ``k`` whatever Keras does.
    """
    return {"x": dataset.repeat(), "steps_per_epoch": steps_per_epoch(dataset, what)}


def correct_predictions(model, dataset, what: str = "evaluation data") -> np.ndarray:
    """Whether each example of a dataset of (images, labels) batches is classified right (top-1), in order."""
    predict = forward_function(model)
    right = [np.argmax(predict(images).numpy(), axis=-1) == np.reshape(labels.numpy(), -1)
             for images, labels in dataset]
    if not right or not sum(len(r) for r in right):
        raise MskdError(f"{what} is empty.")
    return np.concatenate(right)


def accuracy(model, dataset, what: str = "evaluation data") -> float:
    """Top-1 accuracy of a logits/probabilities model on a dataset of (images, labels) batches."""
    return float(np.mean(correct_predictions(model, dataset, what)))


def per_instance_function(fn):
    """``tf.function(fn)`` (no autograph, ``reduce_retracing``) whose retracing TensorFlow counts on its own.

    TensorFlow counts traces per *code object*, so one method or lambda traced once for each of nine models
    (nine candidates, a few steps each) looks like one function retracing nine times and it warns on every
    model. A ``functools.partial`` has no ``__code__``: TF then keys its counts by this callable itself. No
    autograph: the library's steps have no tensor-dependent Python control flow, and one full-suite run failed
    inside autograph's converted_call with a bound step called without ``self`` ("missing 'labels'").
    """
    return tf.function(functools.partial(fn), reduce_retracing=True, autograph=False)


# One traced forward per model and mode, reused by every call (selection re-estimates BatchNorm and scores each
# candidate at every rung). Keras' own predict_on_batch would do for inference, but its predict function shares
# one code object across models, so scoring many candidates logs false "retracing" warnings.
_FORWARD_FUNCTIONS = weakref.WeakKeyDictionary()


def forward_function(model, *, training: bool = False):
    """``model(images, training=training)`` traced once per model and mode (see :func:`per_instance_function`).

    Python attributes the layers read while tracing (a BatchNormalization's ``momentum``) are frozen at the
    first call: ``batchnorm.recalibrate_batchnorm`` sets momentum 0 before every call of the training mode.
    """
    per_mode = _FORWARD_FUNCTIONS.setdefault(model, {})
    if training not in per_mode:
        owner = weakref.ref(model)  # a strong reference in the value would keep the key (and the model) alive
        per_mode[training] = per_instance_function(lambda images: owner()(images, training=training))
    return per_mode[training]


def run_steps(step, dataset, steps: int, *, strategy=None, start: int = 0,
              batches_per_epoch: int | None = None, what: str = "train_ds") -> tuple[dict, float | None]:
    """The library's one hand-written training loop, for where Keras ``fit`` cannot serve.

    Selection's fine-tunes (checkpointed mid-epoch and resumed), distillation across workers
    (Keras 3 ``fit`` crashes under MultiWorkerMirroredStrategy, keras-team/keras#20585) and the
    tf_keras QAT fine-tune all run here. ``step`` is a traced function of one batch that returns
    the loss or a dict of logs with a ``"loss"``; with a ``strategy`` the batches are distributed
    (``step`` then calls ``strategy.run`` itself). ``steps`` batches of the finite, one-epoch
    ``dataset`` are run beginning at batch ``start`` counted across epochs (``start`` = 10 on a
    4-batch dataset begins at batch 2 of a fresh pass, so a resumed run continues where it stopped);
    each new pass re-iterates the dataset, which reshuffles itself. Stops at the first non-finite
    loss. Returns ``(the last step's logs as floats, that bad loss or None)``.
    """
    per_epoch = batches_per_epoch or steps_per_epoch(dataset, what)
    logs, position, stop = {}, start, start + steps
    while position < stop:
        offset = position % per_epoch
        chunk = min(stop - position, per_epoch - offset)
        batches = dataset.skip(offset).take(chunk) if offset else dataset.take(chunk)
        if strategy is not None:
            batches = strategy.experimental_distribute_dataset(batches)
        for batch in batches:
            out = step(batch)
            logs = {k: float(v) for k, v in (out.items() if isinstance(out, dict) else [("loss", out)])}
            if not math.isfinite(logs.get("loss", 0.0)):
                return logs, logs["loss"]
        position += chunk
    return logs, None


def fit_across_workers(model, train_ds, val_ds, *, epochs: int, strategy, total_steps: int | None = None,
                       callbacks=(), what: str = "training", advice: str = "Lower the learning rate") -> dict:
    """``model.fit`` for ``MultiWorkerMirroredStrategy``, where Keras 3's own ``fit`` crashes (keras-team/keras#20585).

    Runs the compiled model's own ``train_step`` / ``test_step`` in every replica, as ``fit`` does, through
    :func:`run_steps`, and drives Keras ``callbacks`` from it (``on_train_begin``, per batch, per epoch with
    the ``val_*`` logs, ``on_train_end``), so CSV/TensorBoard logs, checkpoints, ``BackupAndRestore``
    (resuming at the epoch it saved) and :class:`NanGuard` work as under ``fit``. Logs are the replica mean
    of what the steps return. A non-finite loss stops every worker alike (the logged loss is all-reduced)
    and raises :class:`MskdError`. Returns the history (``{log: [one value per epoch]}``).
    """
    def replicated(step):
        def run(batch):
            logs = strategy.run(step, args=(batch,))
            return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in logs.items()}

        return tf.function(run, reduce_retracing=True)

    train_step, test_step = replicated(model.train_step), replicated(model.test_step)
    per_epoch = steps_per_epoch(train_ds)
    total_steps = epochs * per_epoch if total_steps is None else total_steps
    hooks = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=epochs, steps=per_epoch, verbose=0)
    model.stop_training = False
    model._initial_epoch = None  # BackupAndRestore.on_train_begin sets it when it restores a backup
    hooks.on_train_begin()
    first = model._initial_epoch or 0
    history, done, logs = {}, min(total_steps, first * per_epoch), {}
    for epoch in range(first, epochs):
        if done >= total_steps or model.stop_training:
            break
        hooks.on_epoch_begin(epoch)
        for metric in model.metrics:
            metric.reset_state()
        batch_index = iter(range(per_epoch))

        def step(batch):
            out = {k: float(v) for k, v in train_step(batch).items()}
            hooks.on_train_batch_end(next(batch_index), out)
            return out

        steps = min(per_epoch, total_steps - done)
        logs, bad_loss = run_steps(step, train_ds, steps, strategy=strategy, start=done, batches_per_epoch=per_epoch)
        done += steps
        if bad_loss is not None:
            raise MskdError(f"{what}: the training loss became {bad_loss} in epoch {epoch + 1}; nothing was saved "
                            f"for this stage. {advice} or check the data.")
        if val_ds is not None:
            for metric in model.metrics:
                metric.reset_state()
            for batch in strategy.experimental_distribute_dataset(val_ds):
                val_logs = test_step(batch)
            logs.update({f"val_{k}": float(v) for k, v in val_logs.items()})
        hooks.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
    hooks.on_train_end(logs)
    return history


def epochs_backed_up(folder) -> int:
    """How many epochs the ``BackupAndRestore`` backup in ``folder`` holds (0: none, or unreadable)."""
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(folder) / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class RestoreOnly(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that restores but never writes: for the workers that are not the chief.

    Every worker must resume at the same epoch with the same weights, and only the chief may write
    into the shared backup folder.
    """

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


def budget_steps(epochs: float, steps_in_epoch: int) -> int:
    """Optimizer steps in ``epochs`` (fractional) epochs of ``steps_in_epoch`` batches, at least 1."""
    return max(1, int(round(epochs * steps_in_epoch)))


class StopAfterSteps(keras.callbacks.Callback):
    """Ends ``fit`` after exactly ``steps`` optimizer steps (a budget that is not a whole number of epochs).

    Counted by the optimizer's own step counter, which a resumed run restores with the weights.
    """

    def __init__(self, steps: int):
        super().__init__()
        self.steps = int(steps)

    def on_train_batch_end(self, batch, logs=None):
        # Through numpy: under a distribution strategy the counter is a MirroredVariable, which int() refuses.
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.steps:
            self.model.stop_training = True


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where.

    Unlike ``keras.callbacks.TerminateOnNaN`` it lets the caller raise a clear
    :class:`MskdError` afterwards instead of silently saving a broken model.
    """

    def __init__(self):
        super().__init__()
        self.bad_at = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_at = (self.params.get("epochs"), batch, float(loss))
            self.model.stop_training = True

    def raise_if_tripped(self, stage: str):
        if self.bad_at is not None:
            raise MskdError(
                f"{stage}: the training loss became {self.bad_at[2]} at batch {self.bad_at[1]}; "
                "nothing was saved for this stage. Lower --teacher_lr, check the data for NaN/inf, "
                "or use a warm-up."
            )


def standard_callbacks(log_dir: str | None, *, checkpoint: str | None = None, monitor: str = "val_accuracy",
                       append: bool = False, best_so_far: float | None = None):
    """CSV + TensorBoard logs and a best-on-validation checkpoint (when paths are given).

    ``append`` and ``best_so_far`` continue an interrupted run: the CSV keeps its earlier epochs and
    the checkpoint is replaced only by an epoch better than the best one already saved.
    """
    callbacks = []
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(log_dir, "history.csv"), append=append))
        callbacks.append(keras.callbacks.TensorBoard(log_dir=os.path.join(log_dir, "tensorboard"), write_graph=False))
    if checkpoint:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(checkpoint, monitor=monitor, mode="max", save_best_only=True,
                                            initial_value_threshold=best_so_far)
        )
    return callbacks


def history_from_csv(path) -> dict:
    """A CSVLogger file as a Keras history (key -> values per epoch); {} when there is none."""
    import csv

    try:
        with open(path) as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}
