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
"""

from __future__ import annotations

import tempfile
import time

import keras
from absl import app, flags

from mskd_tf import data, models
from mskd_tf.selection import select
from results_io import write_results

FLAGS = flags.FLAGS
flags.DEFINE_integer("train_subset", 4000, "Training images (Fashion-MNIST, Debian copy).")
flags.DEFINE_float("epochs", 1.0, "The whole selection's budget (epochs, all candidates together).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("val_fraction", 0.02, "Validation share of the training split (scored after every epoch/rung).")
flags.DEFINE_integer("candidates", 9, "Number of candidates (widths spread over 0.25..0.5).")


def main(_):
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
                             successive_halving=mode != "even split", lr=0.05, verbose=False)
            seconds = time.perf_counter() - began
        protocol, chosen = payload["protocol"], payload["selected"]
        name = mode
        print(f"{name:<20} {protocol['total_steps']:>7} {seconds:>9.1f}  {chosen['criterion']} "
              f"({chosen['val_acc']:.4f})", flush=True)
        split = {}
        for row in payload["candidates"]:
            for rung in row.get("time_split", []):
                for key, value in rung.items():
                    if key != "rung":
                        split[key] = split.get(key, 0.0) + value
        rows.append({"mode": name, "steps": protocol["total_steps"], "seconds": seconds,
                     "time_split": {k: round(v, 2) for k, v in split.items()},
                     "chosen": chosen["criterion"], "chosen_val_acc": chosen["val_acc"]})
    one = rows[0]["seconds"]
    for row in rows:
        accounted = sum(row["time_split"].values())
        row["wall_vs_one_candidate"] = round(row["seconds"] / one, 3)
        row["non_training_share"] = round(1 - row["time_split"].get("train", 0.0) / row["seconds"], 3)
        print(f"{row['mode']:<20} {row['wall_vs_one_candidate']:.2f}x one candidate's fine-tune in wall seconds; "
              f"not training: {100 * row['non_training_share']:.0f}% of the wall "
              f"({', '.join(f'{k} {v:.1f}' for k, v in row['time_split'].items())}; "
              f"{row['seconds'] - accounted:.1f} s outside the candidates' records)", flush=True)
    write_results("selection_cost", {"candidates": FLAGS.candidates, "train_images": info.num_train,
                                     "val_images": info.num_val, "budget_epochs": FLAGS.epochs, "rows": rows})


if __name__ == "__main__":
    app.run(main)
