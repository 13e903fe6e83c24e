"""The distill stage: train the selected network with KD (and, as the baseline, with cross-entropy) for what the
selection left of the budget, each run resumable from its epoch backup, and ship the better one on validation."""

from __future__ import annotations

import json
import shutil
import time

from mskd_tf.context import Context, cost, evaluate, pct, verbose
from mskd_tf.errors import MskdError


def run(ctx: Context):
    import keras

    from mskd_tf import distill, training

    cfg, d = ctx.cfg, ctx.data
    teacher = ctx.model("teacher.keras")
    per_epoch = training.steps_per_epoch(d.train)
    budget = training.budget_steps(cfg.student_epochs, per_epoch)
    selection = ctx.wd.read_json("selection.json")
    spent = int(selection["protocol"]["total_steps"])
    steps = budget - spent
    if steps < 1:
        raise MskdError(f"--student_epochs={cfg.student_epochs:g} ({budget} steps) is the student's whole budget, and "
                        f"selection already spent {spent} steps of it: raise --student_epochs or lower --select_epochs.")
    settings = dict(epochs=steps / per_epoch, steps=steps, temperature=cfg.temperature, alpha=cfg.alpha,
                    feature_kd=cfg.feature_kd, optimizer=cfg.optimizer,
                    weight_decay=cfg.weight_decay, strategy=ctx.strategy(), seed=cfg.seed, verbose=verbose())
    out = {"budget_steps": budget, "selection_steps": spent, "distill_steps": steps, "warnings": []}
    teacher_val = ctx.wd.read_json("teacher.json").get("val_acc")
    selected_val = selection["selected"].get("val_acc")
    if teacher_val is not None and selected_val is not None and selected_val > teacher_val:
        note = ("the cross-entropy run decides which student ships" if cfg.distill_baseline
                else "distillation is still used (no cross-entropy run to compare with)")
        out["warnings"].append(f"the selected candidate ({pct(selected_val)}) is better than the teacher "
                               f"({pct(teacher_val)}) on validation; {note}")
    students, out["runs"] = {}, {}
    if ctx.writes:
        backups = ctx.epoch_backup("distill_backup")
        if ctx.cluster is not None:  # the workers may now read the backup folder
            ctx.cluster.announce("distill_backup")
    else:
        ctx.cluster.wait("distill_backup", "the distillation runs' backup folder")
        backups = ctx.wd / "distill_backup"
    # "ce": the cross-entropy run from the same start and budget, which may ship instead (below)
    for label, kd in [("kd", True)] + ([("ce", False)] if cfg.distill_baseline else []):
        finished = backups / f"{label}.keras"
        if finished.exists() and (backups / f"{label}.json").exists():  # ran to its end before an interruption
            out["runs"][label] = json.loads((backups / f"{label}.json").read_text())
            students[label] = keras.models.load_model(finished) if ctx.writes else None
            print(f"distill: the {label} run finished before the interruption; kept", flush=True)
            continue
        student = keras.models.load_model(ctx.wd / "selected.keras")  # both runs start from the same weights
        start = time.perf_counter()
        lr = cfg.finetune_rate(kd)  # KD's larger steps want a lower rate (Config.kd_lr_scale)
        run_backup = backups / label
        done = training.epochs_backed_up(run_backup)
        if done:
            print(f"distill: resuming the {label} run after epoch {done} from {run_backup}", flush=True)
        callbacks = [(keras.callbacks.BackupAndRestore if ctx.writes else training.RestoreOnly)(
            str(run_backup), save_freq="epoch", delete_checkpoint=False)]
        if ctx.writes:
            callbacks += training.standard_callbacks(str(ctx.wd / "logs" / f"distill_{label}"), append=done > 0)
        student, history = distill.distill(teacher, student, ctx.train_data(done), d.val, kd=kd, lr=lr,
                                           callbacks=callbacks, **settings)
        if not ctx.writes:
            continue  # trained in lock-step with the chief, which measures, chooses and saves
        if done:  # this process saw only the epochs after the interruption; the CSV has them all
            history = training.history_from_csv(ctx.wd / "logs" / f"distill_{label}" / "history.csv") or history
        out["runs"][label] = {
            "seconds": round(time.perf_counter() - start, 3), "lr": lr,
            "val_acc": evaluate(student, d.val) if d.val is not None else None,
            "test_acc": evaluate(student, d.test),
            "history": {k: [float(v) for v in vals] for k, vals in history.items()}}
        if done:
            out["runs"][label]["resumed_after_epoch"] = done
        students[label] = student
        ctx.wd.save_model(student, f"distill_backup/{label}.keras")
        ctx.wd.write_json(f"distill_backup/{label}.json", out["runs"][label])
    if not ctx.writes:
        return
    out.update(cost(students["kd"]))
    kd_run, ce_run = out["runs"]["kd"], out["runs"].get("ce")
    # Ship the cross-entropy run when validation (never test) shows it better beyond noise: KD from a poor teacher
    # must not win by default, and a few validation images must not overturn distillation by a coin flip.
    shipped = "kd"
    if ce_run is not None and d.val is not None:
        paired = distill.paired_sign_test(training.correct_predictions(students["kd"], d.val),
                                          training.correct_predictions(students["ce"], d.val))
        better = "ce" if ce_run["val_acc"] > kd_run["val_acc"] else "kd" if kd_run["val_acc"] > ce_run["val_acc"] else None
        significant = better is not None and paired["p_value"] < distill.KD_CE_SIGNIFICANCE
        shipped = "ce" if better == "ce" and significant else "kd"
        out["kd_vs_ce"] = dict(paired, verdict=f"{better} better" if significant else "within noise")
        out["kd_gain"] = kd_run["test_acc"] - ce_run["test_acc"]
        out["kd_val_margin"] = kd_run["val_acc"] - ce_run["val_acc"]
    # The top-level figures are the shipped network's; each run's own are under "runs".
    out.update(shipped=shipped, val_acc=out["runs"][shipped]["val_acc"], test_acc=out["runs"][shipped]["test_acc"])
    ctx.wd.save_model(students[shipped], "student.keras")
    ctx.remember("student.keras", students[shipped])
    ctx.wd.write_json("distill.json", out)
    shutil.rmtree(backups, ignore_errors=True)
    for warning in out["warnings"]:
        print(f"distill: WARNING: {warning}", flush=True)
    line = f"distill: student test acc {pct(kd_run['test_acc'])} with KD"
    if ce_run is not None:
        line += (f", {pct(ce_run['test_acc'])} with plain cross-entropy; shipped the "
                 f"{'KD' if shipped == 'kd' else 'cross-entropy'} student (validation {pct(kd_run['val_acc'])} vs "
                 f"{pct(ce_run['val_acc'])}")
        paired = out.get("kd_vs_ce")
        if paired is not None:
            line += (f"; {paired['kd_only']} images only KD and {paired['ce_only']} only cross-entropy got right, "
                     f"p = {paired['p_value']:.3g}: {paired['verdict']}")
            if paired["verdict"] == "within noise":
                line += ", so the distilled student ships"
        line += ")"
    print(line + f"; {spent} selection + {steps} training steps = {budget} of the budget", flush=True)
