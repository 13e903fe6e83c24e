"""Cost of distillation vs its parts: KD epoch / (student CE epoch + teacher predict).

Distillation should cost the student's training plus one teacher forward pass,
nothing more. This times, on the same data and batch size, after a warm-up
epoch (tracing):

  - student fit epoch with plain cross-entropy (``distill(..., kd=False)``),
  - ``teacher.predict`` over the same data,
  - Distiller fit epoch (``distill(..., kd=True)``), optionally with hints,

``--pairs`` times in alternation (CE, predict, KD, CE, predict, KD, ...), so a
change in the machine's load hits all three alike, and prints each pair's ratio
and their median (issue 14: <= 1.05). Each fit's first epoch (tracing) is not timed.

    .venv/bin/python benchmarks/distill_overhead.py --arch resnet20 --samples 512
"""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from mskd_tf import models, training
from mskd_tf.distill import distill
from results_io import write_results

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", "resnet20", "Teacher architecture (mskd_tf.models.build name).")
flags.DEFINE_float("student_width", 0.5, "Student = same architecture at this width (a pruned-clone stand-in).")
flags.DEFINE_integer("samples", 512, "Synthetic 32x32x3 training images.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("repeats", 1, "Timed epochs per block, after one warm-up epoch.")
flags.DEFINE_integer("pairs", 5, "Alternated (CE, predict, KD) blocks; the ratio is the median over them.")
flags.DEFINE_float("feature_kd", 0.0, "Weight of the FitNets hint loss (0 = logits only).")
flags.DEFINE_bool("fused_batchnorm", True, "training.configure_runtime(fused_batchnorm=...), as the pipeline runs.")


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def timed_fit(teacher, student, data, kd, feature_kd):
    timer = EpochTimer()
    distill(teacher, student, data, None, epochs=1 + FLAGS.repeats, kd=kd, feature_kd=feature_kd,
            callbacks=[timer], verbose=0)
    return statistics.median(timer.seconds[1:])  # epoch 0 includes tracing


def measure(_):
    training.configure_runtime(fused_batchnorm=FLAGS.fused_batchnorm)
    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.samples, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, FLAGS.samples).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).cache().prefetch(2)
    for _ in data:  # fill the cache so no run pays for it
        pass
    teacher = models.build(FLAGS.arch, (32, 32, 3), 10)
    student = lambda: models.build(FLAGS.arch, (32, 32, 3), 10, width=FLAGS.student_width)  # noqa: E731

    teacher.predict(data, verbose=0)  # warm-up / tracing
    pairs = []
    for _ in range(FLAGS.pairs):
        student_epoch = timed_fit(teacher, student(), data, kd=False, feature_kd=0.0)
        start = time.perf_counter()
        teacher.predict(data, verbose=0)
        teacher_predict = time.perf_counter() - start
        kd_epoch = timed_fit(teacher, student(), data, kd=True, feature_kd=FLAGS.feature_kd)
        pairs.append({"student_ce_epoch_s": student_epoch, "teacher_predict_s": teacher_predict, "kd_epoch_s": kd_epoch,
                      "ratio": kd_epoch / (student_epoch + teacher_predict)})
        print(f"pair {len(pairs)}: CE epoch {student_epoch:.3f} s, teacher predict {teacher_predict:.3f} s, "
              f"KD epoch {kd_epoch:.3f} s -> ratio {pairs[-1]['ratio']:.3f}", flush=True)
    median = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    print(f"arch={FLAGS.arch} student_width={FLAGS.student_width} samples={FLAGS.samples} "
          f"batch={FLAGS.batch_size} feature_kd={FLAGS.feature_kd}; medians over {len(pairs)} pairs:")
    print(f"student CE epoch   {median['student_ce_epoch_s']:7.3f} s")
    print(f"teacher predict    {median['teacher_predict_s']:7.3f} s")
    print(f"KD epoch           {median['kd_epoch_s']:7.3f} s")
    print(f"ratio KD / (CE + predict): median {median['ratio']:.3f}, range {min(p['ratio'] for p in pairs):.3f}-"
          f"{max(p['ratio'] for p in pairs):.3f}  (target <= 1.05)")
    name = f"distill_overhead_{FLAGS.arch}" + ("_feature_kd" if FLAGS.feature_kd else "")
    write_results(name + ("" if FLAGS.fused_batchnorm else "_keras_batchnorm"), {
        "arch": FLAGS.arch, "student_width": FLAGS.student_width, "samples": FLAGS.samples,
        "batch_size": FLAGS.batch_size, "feature_kd": FLAGS.feature_kd, "fused_batchnorm": FLAGS.fused_batchnorm,
        "pairs": pairs, **median,
    })


def main(argv):
    """Everything runs inside the fused-BatchNorm block, as the library's own training does."""
    with training.fused_batchnorm():
        return measure(argv)


if __name__ == "__main__":
    app.run(main)
