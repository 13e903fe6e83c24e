"""int8 inference latency in LiteRT of a teacher and its 50%-MACs pruned student, beside the MACs ratio.

For each ``--models`` entry (``name`` or ``name@width``) the teacher is built (random weights: latency does not
depend on their values), pruned with ``l1`` to ``--target_macs`` in a uniform allocation (channels in multiples of
``--round_to``, as every config ships), and both are converted to full-int8 TFLite with CIFAR-10 calibration images.
Single-image ``invoke`` latency is then measured in LiteRT at each ``--threads`` count, teacher and student blocks
alternated so both see the same machine load; each pair gives one speed-up, and the spread is printed.

    .venv/bin/python benchmarks/inference_latency.py
    .venv/bin/python benchmarks/inference_latency.py --models=mobilenet_v2@0.5 --pairs=9

The goal it checks: speed-up >= 0.8 x the MACs cut (2x fewer MACs -> >= 1.6x faster). Also asserts that the
int8 student of a depthwise network still runs ``DEPTHWISE_CONV_2D`` (a standard op, not a grouped CONV_2D).
"""

from __future__ import annotations

import os
import statistics

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet20", "mobilenet_v2@0.5"], "Teachers: models.build name, optionally @width.")
flags.DEFINE_string("dataset", f"folder:{results_io.SHARED_CIFAR10}", "mskd_tf.data source (calibration images).")
flags.DEFINE_float("target_macs", 0.5, "Student MACs as a fraction of the teacher's.")
flags.DEFINE_integer("round_to", 8, "Kept widths are multiples of this.")
flags.DEFINE_list("threads", ["1", "2"], "LiteRT thread counts.")
flags.DEFINE_integer("pairs", 7, "Alternating (teacher block, student block) pairs per thread count.")
flags.DEFINE_integer("repeats", 200, "Single-image invokes per block (the block's figure is their median).")
flags.DEFINE_integer("calibration_images", 200, "Images for int8 calibration.")
flags.DEFINE_integer("seed", 0, "Seed for the random weights.")
flags.DEFINE_integer("micro_images", 40, "Images per TFLite Micro latency block (its figure is their median).")
flags.DEFINE_list("width_sweep", ["1", "0.5", "0.25"], "Also time the unpruned teacher built at these widths "
                  "(LiteRT, 1 thread): how latency follows MACs when every layer narrows alike.")


def build_pair(name, width, info, calibration):
    """(teacher int8 bytes, student int8 bytes, teacher MACs, student MACs, student ops)."""
    import keras

    from mskd_tf import flops, models, quantize
    from mskd_tf.deploy import tflm
    from mskd_tf.pruning import build_graph, plan_keep, prune
    from mskd_tf.pruning.criteria import rank

    keras.utils.set_random_seed(FLAGS.seed)
    teacher = models.build(name, info.image_shape, info.num_classes, normalization=(info.mean, info.std),
                           width=width)
    graph = build_graph(teacher)
    scores = rank(teacher, "l1", graph=graph)["l1"]
    keep = plan_keep(graph, scores, target_macs=FLAGS.target_macs, mode="uniform", round_to=FLAGS.round_to).keep
    student = prune(teacher, keep, graph)
    teacher_bytes = quantize.convert(teacher, "int8", calibration_images=calibration)
    student_bytes = quantize.convert(student, "int8", calibration_images=calibration)
    return (teacher_bytes, student_bytes, flops.count(teacher).macs, flops.count(student).macs,
            tflm.micro_ops(student_bytes), tflm.micro_ops(teacher_bytes))


def micro_latency(tflite_bytes, images, pairs_of):
    """(arena bytes, [median ms per image of each block]) in TFLite Micro (reference kernels, as on an MCU)."""
    from mskd_tf.deploy import tflm

    arena = tflm.find_arena_size(tflite_bytes)
    model = tflm.MicroModel(tflite_bytes, arena + 1024)
    return arena, [model.predict(images[:FLAGS.micro_images])[1] for _ in range(pairs_of)]


def width_sweep(name, width, info, calibration):
    """{width multiplier: (MACs, LiteRT 1-thread ms)} of the unpruned model at FLAGS.width_sweep x width."""
    import keras

    from mskd_tf import flops, models, quantize

    sweep = {}
    for factor in map(float, FLAGS.width_sweep):
        keras.utils.set_random_seed(FLAGS.seed)
        model = models.build(name, info.image_shape, info.num_classes, normalization=(info.mean, info.std),
                             width=width * factor)
        tflite = quantize.convert(model, "int8", calibration_images=calibration)
        sweep[factor] = (flops.count(model).macs, quantize.LiteRTModel(tflite, threads=1).latency_ms(
            calibration, FLAGS.repeats))
    return sweep


def measure(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mskd_tf import data, quantize

    splits = data.load(FLAGS.dataset, batch_size=128, train_subset=FLAGS.calibration_images, seed=FLAGS.seed)
    images = data.to_unit(splits.arrays["train"].x).numpy()
    rows = {}
    for entry in FLAGS.models:
        name, _, width = entry.partition("@")
        width = float(width or 1.0)
        teacher_bytes, student_bytes, teacher_macs, student_macs, student_ops, teacher_ops = build_pair(
            name, width, splits.info, images)
        if "DEPTHWISE_CONV_2D" in teacher_ops and "DEPTHWISE_CONV_2D" not in student_ops:
            raise AssertionError(f"{entry}: the int8 student lost DEPTHWISE_CONV_2D: {student_ops}")
        row = {"teacher_macs": teacher_macs, "student_macs": student_macs, "macs_cut": teacher_macs / student_macs,
               "teacher_int8_bytes": len(teacher_bytes), "student_int8_bytes": len(student_bytes),
               "student_ops": student_ops, "latency_ms": {}, "speedup": {}}
        for threads in map(int, FLAGS.threads):
            runners = {"teacher": quantize.LiteRTModel(teacher_bytes, threads=threads),
                       "student": quantize.LiteRTModel(student_bytes, threads=threads)}
            times = {"teacher": [], "student": []}
            for _ in range(FLAGS.pairs):
                for role, runner in runners.items():
                    times[role].append(runner.latency_ms(images, FLAGS.repeats))
            speedups = [t / s for t, s in zip(times["teacher"], times["student"])]
            row["latency_ms"][threads] = times
            row["speedup"][threads] = speedups
            goal = 0.8 * row["macs_cut"]
            print(f"{entry:18s} {threads} thread(s): teacher {statistics.median(times['teacher']):.3f} ms, "
                  f"student {statistics.median(times['student']):.3f} ms, speed-up {statistics.median(speedups):.2f} "
                  f"({min(speedups):.2f}-{max(speedups):.2f}); MACs cut {row['macs_cut']:.2f}x, goal >= {goal:.2f}: "
                  f"{'met' if statistics.median(speedups) >= goal else 'missed'}", flush=True)
        arena_t, micro_t = micro_latency(teacher_bytes, images, FLAGS.pairs)
        arena_s, micro_s = micro_latency(student_bytes, images, FLAGS.pairs)
        micro_speedups = [t / s for t, s in zip(micro_t, micro_s)]
        row["micro"] = {"teacher_arena_bytes": arena_t, "student_arena_bytes": arena_s,
                        "teacher_ms": micro_t, "student_ms": micro_s, "speedup": micro_speedups}
        print(f"{entry:18s} TFLite Micro: teacher {statistics.median(micro_t):.2f} ms (arena {arena_t / 1024:.0f} KB), "
              f"student {statistics.median(micro_s):.2f} ms (arena {arena_s / 1024:.0f} KB), speed-up "
              f"{statistics.median(micro_speedups):.2f} ({min(micro_speedups):.2f}-{max(micro_speedups):.2f})", flush=True)
        sweep = width_sweep(name, width, splits.info, images)
        row["litert_1_thread_width_sweep"] = {f"{factor:g}": {"macs": macs, "ms": ms} for factor, (macs, ms) in sweep.items()}
        print(f"{entry:18s} LiteRT 1 thread, unpruned at width x " + ", ".join(
            f"{factor:g}: {macs / 1e6:.1f} M MACs {ms:.3f} ms" for factor, (macs, ms) in sweep.items()), flush=True)
        rows[entry] = row
    results_io.write_results("inference_latency", {
        "target_macs": FLAGS.target_macs, "round_to": FLAGS.round_to, "pairs": FLAGS.pairs,
        "repeats": FLAGS.repeats, "models": rows})


if __name__ == "__main__":
    app.run(measure)
