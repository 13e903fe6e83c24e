"""What selection costs in wall seconds against one candidate's fine-tune of the same budget.

Nine candidates (``small_cnn`` at nine widths, a stand-in for nine pruned
clones) are selected on a Fashion-MNIST subset with ``--epochs`` as the whole
selection's budget (``select(epochs=...)``: all candidates' steps together),
with successive halving and with an even split, and ONE candidate is fine-tuned
for the same budget. Prints, per mode, the optimizer steps, the wall seconds and
the choice; then
the wall seconds against ONE candidate fine-tuned for the same budget (issue 14:
halving <= 2.5x) and where selection's seconds went (``time_split``: setup, train,
trace, score, save; issue 14: everything but ``train`` under 15%).

    .venv/bin/python benchmarks/selection_cost.py --train_subset 4000 --epochs 1

With ``--workdir`` the candidates are instead a pipeline work dir's (its ``candidates.json`` gives the zero-cost
scores and costs, as the select stage passes them), selected as the MS-KD CIFAR benchmark does (capacity pool,
zero-cost rung, halving under the KD loss from its ``teacher.keras``), against ``--one`` of them fine-tuned
under the same loss for the whole selection budget:

    benchmarks/snapshot_run.sh selection_cost.py --workdir=runs/bench_mskd_cifar_t120 \
        --dataset=folder:../shared/data/cifar10-jpeg.tar.gz --batch_size=128 --epochs=1.5 --seed=1
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import keras
from absl import app, flags

from mskd_tf import data, models
from mskd_tf.selection import select, time_split_total
from results_io import write_results

FLAGS = flags.FLAGS
flags.DEFINE_integer("train_subset", 4000, "Training images (Fashion-MNIST, Debian copy).")
flags.DEFINE_float("epochs", 1.0, "The whole selection's budget (epochs, all candidates together).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("val_fraction", 0.02, "Validation share of the training split (scored after every epoch/rung).")
flags.DEFINE_integer("candidates", 9, "Number of candidates (widths spread over 0.25..0.5).")
flags.DEFINE_string("workdir", "", "A pipeline work dir: select among its candidates (MS-KD protocol) instead.")
flags.DEFINE_string("dataset", "fashion_mnist", "With --workdir: the dataset its candidates were built on.")
flags.DEFINE_string("one", "l1-uniform", "With --workdir: the candidate fine-tuned alone for the whole budget.")
flags.DEFINE_integer("zero_cost_keep", 4, "With --workdir: the zero-cost rung's survivors.")
flags.DEFINE_float("min_params_ratio", 0.9, "With --workdir: the capacity pool.")
flags.DEFINE_float("lr", 0.05, "Selection learning rate (constant).")
flags.DEFINE_float("weight_decay", 5e-3, "With --workdir: decoupled weight decay (the CIFAR benchmark's).")
flags.DEFINE_integer("seed", 0, "Selection seed (data order).")


def pipeline_candidates():
    """(one-candidate run, selection run, train, val, info) for the candidates of --workdir (MS-KD protocol)."""
    wd = Path(FLAGS.workdir)
    rows = {r["criterion"]: r for r in json.loads((wd / "candidates.json").read_text())["candidates"]}
    splits = data.load(FLAGS.dataset, batch_size=FLAGS.batch_size, seed=0)
    def train():  # a new pipeline per use: every candidate trains on the same batches, as in the select stage
        return data.train_pipeline(splits.arrays["train"], FLAGS.batch_size, augment=True, seed=FLAGS.seed)

    teacher = keras.models.load_model(wd / "teacher.keras")
    common = dict(teacher=teacher, lr=FLAGS.lr, weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, verbose=False)
    paths = {c: str(wd / "candidates" / f"{c}.keras") for c in rows}
    if FLAGS.one not in paths:
        raise SystemExit(f"--one={FLAGS.one}: not a candidate of {wd} ({', '.join(sorted(paths))})")
    one = dict(candidates={FLAGS.one: paths[FLAGS.one]}, **common)
    full = dict(candidates=paths, zero_cost_keep=FLAGS.zero_cost_keep, min_params_ratio=FLAGS.min_params_ratio,
                zero_cost_scores={c: r["val_acc_before_finetune"] for c, r in rows.items()},
                candidate_costs=rows, **common)
    return one, full, train, splits.val, splits.info


def main(_):
    if FLAGS.workdir:
        one, full, train, val, info = pipeline_candidates()
        rows = []
        for mode, kwargs in (("one candidate", one), ("MS-KD selection", full)):
            with tempfile.TemporaryDirectory() as workdir:
                began = time.perf_counter()
                payload = select(train_ds=train, val_ds=val, workdir=workdir, epochs=FLAGS.epochs, **kwargs)
                rows.append(summarize(mode, payload, time.perf_counter() - began))
        report(rows)
        write_results("selection_cost_" + Path(FLAGS.workdir).name, {
            "workdir": FLAGS.workdir, "dataset": FLAGS.dataset, "train_images": info.num_train,
            "val_images": info.num_val, "budget_epochs": FLAGS.epochs, "seed": FLAGS.seed, "rows": rows})
        return
    splits = data.load("fashion_mnist", batch_size=FLAGS.batch_size, train_subset=FLAGS.train_subset,
                       val_fraction=FLAGS.val_fraction, augment=False, seed=0)
    info = splits.info
    widths = [0.25 + 0.25 * i / max(1, FLAGS.candidates - 1) for i in range(FLAGS.candidates)]

    def candidates():
        built = {}
        for i, width in enumerate(widths):
            keras.utils.set_random_seed(i)
            built[f"w{width:.3f}"] = models.build("small_cnn", info.image_shape, info.num_classes,
                                                  normalization=(info.mean, info.std), width=width)
        return built

    print(f"{FLAGS.candidates} candidates, {info.num_train} training / {info.num_val} validation images, "
          f"selection budget {FLAGS.epochs:g} epochs")
    print(f"{'mode':<20} {'steps':>7} {'seconds':>9}  choice (val acc)")
    rows = []
    for mode in ("one candidate", "successive halving", "even split"):
        pool = candidates()
        if mode == "one candidate":  # the unit of the wall-time target: the middle width, the whole budget
            name = sorted(pool)[len(pool) // 2]
            pool = {name: pool[name]}
        with tempfile.TemporaryDirectory() as workdir:
            began = time.perf_counter()
            payload = select(pool, splits.train, splits.val, workdir=workdir, epochs=FLAGS.epochs,
                             successive_halving=mode != "even split", lr=FLAGS.lr, zero_cost_keep=0,
                             min_params_ratio=0.0, verbose=False)
            seconds = time.perf_counter() - began
        rows.append(summarize(mode, payload, seconds))
    report(rows)
    write_results("selection_cost", {"candidates": FLAGS.candidates, "train_images": info.num_train,
                                     "val_images": info.num_val, "budget_epochs": FLAGS.epochs, "rows": rows})


def summarize(mode, payload, seconds) -> dict:
    protocol, chosen = payload["protocol"], payload["selected"]
    print(f"{mode:<20} {protocol['total_steps']:>7} {seconds:>9.1f}  {chosen['criterion']} "
          f"({chosen['val_acc']:.4f})", flush=True)
    return {"mode": mode, "steps": protocol["total_steps"], "seconds": seconds,
            "time_split": {k: round(v, 2) for k, v in time_split_total(payload).items()},
            "chosen": chosen["criterion"], "chosen_val_acc": chosen["val_acc"]}


def report(rows):
    """Each row's wall seconds against the first (one candidate) and its share not spent training."""
    one = rows[0]["seconds"]
    for row in rows:
        accounted = sum(row["time_split"].values())
        row["wall_vs_one_candidate"] = round(row["seconds"] / one, 3)
        row["non_training_share"] = round(1 - row["time_split"].get("train", 0.0) / row["seconds"], 3)
        print(f"{row['mode']:<20} {row['wall_vs_one_candidate']:.2f}x one candidate's fine-tune in wall seconds; "
              f"not training: {100 * row['non_training_share']:.0f}% of the wall "
              f"({', '.join(f'{k} {v:.1f}' for k, v in row['time_split'].items())}; "
              f"{row['seconds'] - accounted:.1f} s outside the candidates' records)", flush=True)


if __name__ == "__main__":
    app.run(main)
