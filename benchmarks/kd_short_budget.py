"""Why does distillation lose to cross-entropy at short budgets? One KD setting changed at a time, on small data.

The quickstart shipped its cross-entropy student (docs/benchmarks/quickstart.md): KD 89.47 vs CE 89.96 on test, 3 epochs after a
5-epoch teacher. The KD defaults (``Config.kd_lr_scale`` 0.5, temperature 4, alpha 0.5) were chosen on 15-epoch
CIFAR-10 rows. Here, on the quickstart and on two small sets cut from Fashion-MNIST, the selected student is
distilled with the defaults and with one of them changed (``--variants``), against the cross-entropy run of the
same budget, at ``--seeds`` (the whole pipeline per seed: the split, the teacher, the selection). A longer
budget (``budget=2``: twice the distill epochs, for both losses) says whether KD only needs more steps, a smaller
student (``target_macs=0.25``) whether it needs a larger teacher-student gap.

Choose on validation only: the table gives validation and test, and the verdict uses validation.

    .venv/bin/python benchmarks/kd_short_budget.py                       # every data set, variant and seed
    .venv/bin/python benchmarks/kd_short_budget.py --sets=small28 --seeds=0

Rows are cached in ``benchmarks/results/kd_short_budget.json`` by (set, seed, variant) with the settings they
depend on; a rerun computes the missing ones only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sets", ["quickstart", "small28", "small8"], "Data sets: the quickstart's Fashion-MNIST; 1,500 "
                  "training images of it at 28x28 (small28) or downsampled to 8x8 (small8).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Pipeline seeds (split, teacher, selection, data order).")
flags.DEFINE_list("variants", ["default", "kd_lr_scale=1", "temperature=2", "alpha=0.9", "budget=2",
                               "target_macs=0.25"],
                  "KD settings, one change from the library default each; budget=N multiplies the distill epochs; "
                  "target_macs=R distils a smaller student (its own candidates) with the defaults.")
flags.DEFINE_string("workdir", "/tmp/kd_short_budget", "Where the pipeline runs (per set and seed).")

NAME = "kd_short_budget"
SMALL_TRAIN, SMALL_TEST = 1500, 2000


def base_config(data_set: str, seed: int, workdir: str):
    """The quickstart's settings (configs/quickstart.cfg), on ``data_set``."""
    from mskd_tf.config import Config

    cfg = Config(dataset="fashion_mnist", model="small_cnn", width=0.5, augment=False, batch_size=128, teacher_epochs=5,
                 teacher_lr=0.1, seed=seed, target_macs=0.5, round_to=8, criteria_batches=5, student_epochs=3,
                 export=("float32",), workdir=workdir)
    if data_set != "quickstart":  # 1,500 images: a few steps per epoch, so more epochs for teacher and student
        cfg = dataclasses.replace(cfg, dataset=f"npz:{small_npz(data_set)}", batch_size=32, teacher_epochs=15,
                                  student_epochs=6)
    return cfg


def small_npz(data_set: str) -> Path:
    """1,500 training / 2,000 test Fashion-MNIST images (the first of each split), at 28x28 or 8x8."""
    from mskd_tf import data_sources

    path = Path(FLAGS.workdir) / f"{data_set}.npz"
    if not path.exists():
        x_train, y_train, x_test, y_test, _ = data_sources.read("fashion_mnist")
        x_train, y_train, x_test, y_test = x_train[:SMALL_TRAIN], y_train[:SMALL_TRAIN], x_test[:SMALL_TEST], y_test[:SMALL_TEST]
        if data_set == "small8":  # mean of 3x3 blocks of the 24x24 centre: the images an 8x8 sensor would give
            shrink = lambda x: x[:, 2:26, 2:26].reshape(len(x), 8, 3, 8, 3, 1).mean(axis=(2, 4)).astype(np.uint8)  # noqa: E731
            x_train, x_test = shrink(x_train), shrink(x_test)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def variant_config(cfg, variant: str):
    if variant == "default":
        return dataclasses.replace(cfg, distill_baseline=True)
    key, value = variant.split("=")
    if key == "target_macs":  # a smaller student: its own candidates, KD and CE both
        return dataclasses.replace(cfg, target_macs=float(value), distill_baseline=True)
    if key == "budget":
        return dataclasses.replace(cfg, student_epochs=cfg.student_epochs * float(value), distill_baseline=True)
    return dataclasses.replace(cfg, distill_baseline=False, **{key: type(getattr(cfg, key))(float(value))})


def run_variant(data_set: str, seed: int, variant: str) -> dict:
    """The selected student distilled under ``variant`` (and its cross-entropy run where the budget differs)."""
    from mskd_tf.api import run_pipeline

    base = Path(FLAGS.workdir) / f"{data_set}_s{seed}"
    cfg = base_config(data_set, seed, str(base))
    run_pipeline(cfg, stop_after="select")  # teacher, rank, candidates, select: shared by every variant
    if variant.startswith("target_macs="):  # the shared teacher and rankings, its own candidates and selection
        target = base.with_name(f"{base.name}_macs{variant.split('=')[1]}")  # not the variant's own (removed) dir
        if not target.exists():
            shutil.copytree(base, target)
        cfg = variant_config(dataclasses.replace(cfg, workdir=str(target)), variant)
        run_pipeline(cfg, stop_after="select")
        base = target
    wd = Path(FLAGS.workdir) / f"{data_set}_s{seed}_{variant}"
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(base, wd)
    run_pipeline(variant_config(dataclasses.replace(cfg, workdir=str(wd)), variant), stop_after="distill")
    distilled = json.loads((wd / "distill.json").read_text())
    teacher = json.loads((wd / "teacher.json").read_text())
    selection = json.loads((wd / "selection.json").read_text())
    row = {"teacher_val": teacher["val_acc"], "teacher_test": teacher["test_acc"],
           "selected": selection["selected"]["criterion"], "distill_steps": distilled["distill_steps"],
           "runs": {run: {k: values[k] for k in ("val_acc", "test_acc", "lr")} for run, values in distilled["runs"].items()},
           "kd_vs_ce": distilled.get("kd_vs_ce")}
    shutil.rmtree(wd, ignore_errors=True)
    return row


def render(rows: dict) -> str:
    """Per set and variant: KD's mean validation / test accuracy over the seeds, and KD - CE at that budget."""
    lines = ["| set | variant | seeds | KD val % | KD test % | KD - CE val | KD - CE test |", "|---|---|---|---|---|---|---|"]
    for data_set in FLAGS.sets:
        for variant in FLAGS.variants:
            found = [(seed, rows[key]) for seed in FLAGS.seeds if (key := f"{data_set}/s{seed}/{variant}") in rows]
            if not found:
                continue

            def ce_of(seed, row):  # the cross-entropy run of the same budget: its own, or the default's
                own = row["runs"].get("ce")
                return own or rows.get(f"{data_set}/s{seed}/default", {}).get("runs", {}).get("ce")

            kd_val = [100 * r["runs"]["kd"]["val_acc"] for _, r in found]
            kd_test = [100 * r["runs"]["kd"]["test_acc"] for _, r in found]
            gaps = [(100 * (r["runs"]["kd"]["val_acc"] - ce["val_acc"]), 100 * (r["runs"]["kd"]["test_acc"] - ce["test_acc"]))
                    for seed, r in found if (ce := ce_of(seed, r))]
            mean = lambda v: f"{statistics.fmean(v):.2f}" if v else "-"  # noqa: E731
            lines.append(f"| {data_set} | {variant} | {len(found)} | {mean(kd_val)} | {mean(kd_test)} | "
                         f"{mean([g[0] for g in gaps]):>5} | {mean([g[1] for g in gaps]):>5} |")
    return "\n".join(lines)


def main(_):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = results_io.RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text())["figures"]["rows"] if path.exists() else {}
    for seed in (int(s) for s in FLAGS.seeds):
        for data_set in FLAGS.sets:
            for variant in FLAGS.variants:
                key = f"{data_set}/s{seed}/{variant}"
                if key in rows:
                    continue
                rows[key] = run_variant(data_set, seed, variant)
                results_io.write_results(NAME, {"rows": rows})
                print(f"{key}: {rows[key]['runs']}", flush=True)
    table = render(rows)
    print(table)
    (results_io.RESULTS / f"{NAME}.md").write_text(table + "\n")


if __name__ == "__main__":
    app.run(main)
