"""Cost of selection with and without successive halving, in full fine-tunes.

Nine candidates (``small_cnn`` at nine widths, a stand-in for nine pruned
clones) are selected on a Fashion-MNIST subset twice: with successive halving
and with every candidate trained for the full budget. Prints, per mode, the
fine-tuning steps spent, the wall seconds, the steps expressed in "full
fine-tunes of one candidate" (target <= 2 with halving) and the choice.

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
flags.DEFINE_float("epochs", 1.0, "Full selection budget per candidate (epochs).")
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
          f"budget {FLAGS.epochs:g} epochs each")
    print(f"{'mode':<20} {'steps':>7} {'full fine-tunes':>16} {'seconds':>9}  choice (val acc)")
    rows = []
    for halving in (True, False):
        with tempfile.TemporaryDirectory() as workdir:
            began = time.perf_counter()
            payload = select(candidates(), splits.train, splits.val, workdir=workdir, epochs=FLAGS.epochs,
                             successive_halving=halving, lr=0.05, verbose=False)
            seconds = time.perf_counter() - began
        protocol, chosen = payload["protocol"], payload["selected"]
        name = "successive halving" if halving else "every candidate full"
        print(f"{name:<20} {protocol['total_steps']:>7} {protocol['cost_in_full_budgets']:>16.3f} {seconds:>9.1f}  "
              f"{chosen['criterion']} ({chosen['val_acc']:.4f})", flush=True)
        rows.append({"mode": name, "steps": protocol["total_steps"],
                     "full_finetunes": protocol["cost_in_full_budgets"], "seconds": seconds,
                     "chosen": chosen["criterion"], "chosen_val_acc": chosen["val_acc"]})
    write_results("selection_cost", {"candidates": FLAGS.candidates, "train_images": info.num_train,
                                     "val_images": info.num_val, "budget_epochs": FLAGS.epochs, "rows": rows})


if __name__ == "__main__":
    app.run(main)
