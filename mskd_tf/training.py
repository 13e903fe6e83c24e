"""Shared training pieces: optimizer + schedule, callbacks, NaN guard.

Teacher training, candidate fine-tuning (selection) and distillation all build
their optimizer and callbacks here, so one flag means the same thing in every
stage.
"""

from __future__ import annotations

import math
import os

import keras

from mskd_tf.errors import MskdError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


def make_optimizer(
    name: str = "sgd",
    lr: float = 0.1,
    *,
    total_steps: int,
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
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
                "nothing was saved for this stage. Lower --lr, check the data for NaN/inf, "
                "or use a warm-up."
            )


def standard_callbacks(log_dir: str | None, *, checkpoint: str | None = None, monitor: str = "val_accuracy"):
    """CSV + TensorBoard logs and a best-on-validation checkpoint (when paths are given)."""
    callbacks = []
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(log_dir, "history.csv")))
        callbacks.append(keras.callbacks.TensorBoard(log_dir=os.path.join(log_dir, "tensorboard"), write_graph=False))
    if checkpoint:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(checkpoint, monitor=monitor, mode="max", save_best_only=True)
        )
    return callbacks
