"""The teacher stage: train ``--model`` (resuming from its epoch backup), or load and check a given teacher."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mskd_tf.context import Context, cost, evaluate, pct, verbose
from mskd_tf.errors import MskdError


def check_teacher_fits(model, info, where: str):
    if tuple(model.input_shape[1:]) != tuple(info.image_shape):
        raise MskdError(f"{where}: the model takes inputs of shape {model.input_shape[1:]}, but the data has "
                        f"images of shape {info.image_shape}.")
    if int(model.output_shape[-1]) != info.num_classes:
        raise MskdError(f"{where}: the model has {model.output_shape[-1]} outputs, but the data has "
                        f"{info.num_classes} classes.")


def given_teacher(ctx: Context):
    """The ``--teacher`` file, loaded once and checked against the data."""
    import keras

    cfg = ctx.cfg
    key = f"--teacher={cfg.teacher}"
    if key not in ctx._models:
        import zipfile

        if not os.path.isfile(cfg.teacher):
            raise MskdError(f"--teacher={cfg.teacher}: no such file; give the path of a saved .keras model.")
        if str(cfg.teacher).endswith(".keras") and not zipfile.is_zipfile(cfg.teacher):
            raise MskdError(f"--teacher={cfg.teacher}: the file exists but is not a whole .keras archive (truncated "
                            "or another format); save the model again with model.save(path).")
        try:
            teacher = keras.models.load_model(cfg.teacher)
        except Exception as exc:
            raise MskdError(f"--teacher={cfg.teacher}: cannot load it as a Keras model ({exc}).") from exc
        check_teacher_fits(teacher, ctx.data.info, key)
        ctx.remember(key, teacher)
    return ctx._models[key]


def run(ctx: Context):
    import contextlib

    import keras

    from mskd_tf import batchnorm, models, training
    from mskd_tf.keras_utils import with_synchronized_batchnorm

    cfg, d = ctx.cfg, ctx.data
    history = None
    if ctx.user_teacher is not None:
        teacher = ctx.user_teacher
    elif cfg.teacher:
        teacher = given_teacher(ctx)
    else:
        strategy = ctx.strategy() if ctx.cluster is not None else None
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            teacher = models.build(cfg.model, d.info.image_shape, d.info.num_classes,
                                   normalization=(d.info.mean, d.info.std), width=cfg.width)
            if strategy is not None:  # global-batch BatchNorm statistics: the maths of one process
                teacher = with_synchronized_batchnorm(teacher, True)
            steps = cfg.teacher_epochs * training.steps_per_epoch(d.train)
            teacher.compile(
                optimizer=training.make_optimizer(cfg.optimizer, cfg.teacher_lr, total_steps=steps, schedule=cfg.schedule,
                                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                **training.compile_kwargs(),
            )
            if strategy is not None:  # BackupAndRestore loads the optimizer state: its variables belong here
                teacher.optimizer.build(teacher.trainable_variables)
        guard = training.NanGuard()
        best = ctx.wd / "teacher_best.keras"
        if ctx.writes:
            backup, resumed_at, best_so_far = _teacher_backup(ctx, best)
            if ctx.cluster is not None:  # the workers may now read the backup folder
                ctx.cluster.announce("teacher_backup")
            callbacks = [guard, keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch",
                                                                 delete_checkpoint=True),
                         *training.standard_callbacks(str(ctx.wd / "logs" / "teacher"),
                                                      checkpoint=str(best) if d.val is not None else None,
                                                      append=resumed_at > 0, best_so_far=best_so_far)]
        else:  # resume from the chief's backup (once the chief has cleared a stale one), write nothing
            ctx.cluster.wait("teacher_backup", "the teacher's backup folder")
            backup = ctx.wd / "teacher_backup"
            resumed_at = training.epochs_backed_up(backup)
            callbacks = [guard, training.RestoreOnly(str(backup))]
        if resumed_at:
            print(f"teacher: resuming after epoch {resumed_at} of {cfg.teacher_epochs} from {backup}", flush=True)
        if strategy is not None:  # Keras 3 fit crashes under MultiWorkerMirroredStrategy: the plain loop
            history = training.fit_across_workers(teacher, ctx.train_data(resumed_at), d.val, epochs=cfg.teacher_epochs,
                                                  strategy=strategy, callbacks=callbacks, what="teacher",
                                                  advice="Lower --teacher_lr")
            teacher = with_synchronized_batchnorm(teacher, False)  # a plain model for evaluation and saving
        else:
            history = teacher.fit(**training.one_pass_per_epoch(ctx.train_data(resumed_at)), validation_data=d.val,
                                  epochs=cfg.teacher_epochs, callbacks=callbacks, shuffle=False, verbose=verbose()).history
        guard.raise_if_tripped("teacher")
        if not ctx.writes:
            return  # the chief evaluates and saves; later stages read its teacher.keras
        shutil.rmtree(backup, ignore_errors=True)
        if best.exists():  # restore the best-on-validation weights (saved with the training-time BatchNorm)
            teacher = with_synchronized_batchnorm(keras.models.load_model(best), False)
    teacher, repair = batchnorm.repair_batchnorm(teacher, ctx.calibration, d.val)
    metrics = {"val_acc": evaluate(teacher, d.val) if d.val is not None else None,
               "test_acc": evaluate(teacher, d.test), "batchnorm_repair": repair}
    metrics.update(cost(teacher))
    if history is not None:
        metrics["history"] = {k: [float(v) for v in vals] for k, vals in history.items()}
        if resumed_at:  # this process saw only the epochs after the interruption; the CSV has them all
            metrics["history"] = training.history_from_csv(ctx.wd / "logs" / "teacher" / "history.csv") or metrics["history"]
    ctx.wd.save_model(teacher, "teacher.keras")
    ctx.wd.write_json("teacher.json", metrics)
    ctx.remember("teacher.keras", teacher)
    (ctx.wd / "teacher_best.keras").unlink(missing_ok=True)
    print(f"teacher: val acc {pct(metrics['val_acc'])}, test acc {pct(metrics['test_acc'])}, "
          f"{metrics['macs'] / 1e6:.2f}M MACs, {metrics['params'] / 1e6:.3f}M params", flush=True)


def _teacher_backup(ctx: Context, best: Path):
    """The teacher's epoch backup folder, emptied when it was written for other settings.

    Keras' BackupAndRestore saves weights and optimizer state after every epoch, so a teacher
    run that is interrupted (a session that ends, Ctrl-C) continues at the next epoch instead of
    starting over. Returns ``(folder, epochs already done, best validation accuracy so far)``.
    """
    from mskd_tf import training

    folder = ctx.epoch_backup("teacher_backup")
    done = training.epochs_backed_up(folder)
    if not done:
        return folder, 0, None
    seen = training.history_from_csv(ctx.wd / "logs" / "teacher" / "history.csv").get("val_accuracy", [])
    return folder, done, (max(seen) if seen and best.exists() else None)
