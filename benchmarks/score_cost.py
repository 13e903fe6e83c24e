"""What one selection score costs, and whether a faster way to compute the same number exists (issue 14).

A score is a BatchNorm re-estimation (10 training batches) plus a validation pass over the 5,000-image CIFAR-10
split. For each candidate this prints: the first and a later call of each (the difference is tracing), the
validation pass at larger evaluation batches, under XLA (``jit_compile``), through a ``mixed_bfloat16`` copy and
eagerly (no trace), each the median of ``--repeats`` after one warm-up, with the accuracy it gives. Run it with
nothing else on the machine:

    .venv/bin/python benchmarks/score_cost.py --workdir=runs/bench_mskd_cifar_t120   # -> results/score_cost.json
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from absl import app, flags

import results_io

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_mskd_cifar_t120", "A pipeline work dir with candidates/*.keras (CIFAR-10).")
flags.DEFINE_list("candidates", ["l1-uniform", "hrank-uniform", "l1-global"], "Candidate files to time.")
flags.DEFINE_list("eval_batches", ["500", "1000", "2500"], "Evaluation batch sizes tried besides the splits' own.")
flags.DEFINE_integer("repeats", 3, "Timed calls per variant (after one warm-up call).")


def main(_):
    import keras
    import numpy as np
    import tensorflow as tf

    from mskd_tf import batchnorm, data, training

    training.configure_runtime()
    splits = data.load(f"folder:{results_io.SHARED_CIFAR10}", batch_size=128, seed=0)
    batches = list(splits.val)
    images = tf.concat([x for x, _ in batches], 0)
    labels = tf.concat([y for _, y in batches], 0)
    recalibration = list(data.train_pipeline(splits.arrays["train"], 128, augment=True, seed=1).take(10))

    def median_seconds(call):
        call()
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times), 3), result

    def counted(forward, in_batches):  # accuracy through any forward function (cast: a bf16 copy's logits)
        hits = sum(int(np.sum(np.argmax(tf.cast(forward(x), tf.float32).numpy(), -1) == np.reshape(y.numpy(), -1)))
                   for x, y in in_batches)
        return round(hits / int(labels.shape[0]), 4)

    rows = {}
    with training.fused_batchnorm():
        for name in FLAGS.candidates:
            path = Path(FLAGS.workdir) / "candidates" / f"{name}.keras"
            if not path.exists():
                raise SystemExit(f"--candidates={name}: {path} does not exist; name a candidate of --workdir.")
            model = keras.models.load_model(path, compile=False)
            row = {}
            for label, call in (("re-estimation", lambda: batchnorm.recalibrate_batchnorm(model, recalibration, 10)),
                                ("validation", lambda: training.accuracy(model, batches))):
                start = time.perf_counter()
                call()  # the first call traces
                first = time.perf_counter() - start
                row[label] = {"first_call": round(first, 3), "seconds": median_seconds(call)[0]}
            row["validation"]["accuracy"] = round(training.accuracy(model, batches), 4)
            for size in map(int, FLAGS.eval_batches):
                bigger = [(images[i:i + size], labels[i:i + size]) for i in range(0, int(images.shape[0]), size)]
                row[f"validation at batch {size}"] = dict(zip(("seconds", "accuracy"), median_seconds(
                    lambda: training.accuracy(model, bigger))))
            xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
            row["validation, XLA"] = dict(zip(("seconds", "accuracy"), median_seconds(lambda: counted(xla, batches))))
            keras.config.set_dtype_policy("mixed_bfloat16")
            try:
                low = keras.models.clone_model(model)
            finally:
                keras.config.set_dtype_policy("float32")
            low.set_weights(model.get_weights())
            low_forward = tf.function(lambda x: low(x, training=False))
            row["validation, mixed_bfloat16 copy"] = dict(zip(("seconds", "accuracy"), median_seconds(
                lambda: counted(low_forward, batches))))
            row["validation, eager"] = dict(zip(("seconds", "accuracy"), median_seconds(
                lambda: counted(lambda x: model(x, training=False), batches))))
            rows[name] = row
            print(name, row, flush=True)
    results_io.write_results("score_cost", {"workdir": FLAGS.workdir, "val_images": int(images.shape[0]),
                                            "rows": rows})


if __name__ == "__main__":
    app.run(main)
