"""How the loss of the first steps changes a pruned network's weights: distillation vs cross-entropy.

Why it exists (issue 13): on the 120-epoch-teacher table, MS-KD's selection + CE ablation (198 selection steps
under the KD loss, then cross-entropy for the rest of the budget) ended 1.2-2.2 test points below the same network
fine-tuned with cross-entropy from the start. This trains one candidate of that table for the selection's steps
under each loss, from the same weights on the same batches at the selection's constant learning rate, and prints
the kernels' global L2 norm (convolutions followed by BatchNorm are scale-invariant: their effective step size
goes as lr / |w|^2, so a larger norm slows everything trained after) and the validation accuracy.

    benchmarks/snapshot_run.sh kd_weight_norm.py [--candidate=l1-global] [--steps=198] [--lr=0.05,0.025]

Needs the table's networks (benchmarks/mskd_cifar.sh --name=mskd_cifar_t120 ... restores them into runs/).
Writes benchmarks/results/kd_weight_norm.json.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

import results_io

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_mskd_cifar_t120", "The table's work dir (teacher.keras, candidates/).")
flags.DEFINE_string("candidate", "l1-global", "Candidate network to train.")
flags.DEFINE_integer("steps", 198, "Optimizer steps (198: what the selection's winner trains).")
flags.DEFINE_list("lr", ["0.05"], "Constant learning rates to try (0.05: the table's).")
flags.DEFINE_float("weight_decay", 5e-3, "Decoupled weight decay (the table's).")
flags.DEFINE_float("temperature", 4.0, "KD temperature (the table's).")
flags.DEFINE_float("alpha", 0.5, "KD weight of the label cross-entropy (the table's).")


def kernel_norm(model) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v.numpy())) for v in model.trainable_variables if "kernel" in v.path)))


def main(_):
    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import training
    from mskd_tf.candidate_training import Finetuner

    splits = data_lib.load(f"folder:{results_io.SHARED_CIFAR10}", batch_size=128, seed=0)
    teacher = keras.models.load_model(f"{FLAGS.workdir}/teacher.keras")
    rows = []
    for lr in (float(v) for v in FLAGS.lr):
        for loss in ("kd", "ce"):
            keras.utils.set_random_seed(0)
            model = keras.models.load_model(f"{FLAGS.workdir}/candidates/{FLAGS.candidate}.keras")
            start = kernel_norm(model)
            optimizer = training.make_optimizer("sgd", lr, total_steps=1, schedule="constant",
                                                weight_decay=FLAGS.weight_decay)
            optimizer.build(model.trainable_variables)
            tuner = Finetuner(model, optimizer, teacher=teacher if loss == "kd" else None,
                              temperature=FLAGS.temperature, alpha=FLAGS.alpha)
            # The selection's batches: the seed-0 pipeline from its first batch.
            stream = data_lib.train_pipeline(splits.arrays["train"], 128, augment=True, seed=0).repeat()
            tuner.train(stream.take(FLAGS.steps), FLAGS.steps, steps_per_epoch=FLAGS.steps)
            row = {"loss": loss, "lr": lr, "steps": FLAGS.steps, "kernel_norm_before": round(start, 2),
                   "kernel_norm_after": round(kernel_norm(model), 2),
                   "val_acc": round(training.accuracy(model, splits.val), 4)}
            print(f"{FLAGS.candidate} {loss} lr {lr:g}, {FLAGS.steps} steps: kernel norm {row['kernel_norm_before']} -> "
                  f"{row['kernel_norm_after']}, val {100 * row['val_acc']:.2f}%", flush=True)
            rows.append(row)
    results_io.write_results("kd_weight_norm", {"candidate": FLAGS.candidate, "workdir": FLAGS.workdir, "rows": rows})


if __name__ == "__main__":
    app.run(main)
