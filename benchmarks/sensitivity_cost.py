"""What ``--allocations=sensitivity`` costs: measuring every group's sensitivity and allocating, per criterion.

The time does not depend on the weights' values, so by default the teacher is built untrained; ``--teacher`` loads a
trained one (and then the allocation's widths mean something). Calibration: ``--images`` CIFAR-10 training images for
the KL divergence, ``--bn_batches`` batches of 128 for each cut's BatchNorm re-estimation (the pipeline uses
``stages.candidates.SENSITIVITY_BN_BATCHES``).

    .venv/bin/python benchmarks/sensitivity_cost.py --model=resnet20
    .venv/bin/python benchmarks/sensitivity_cost.py --model=mobilenet_v2 --width=0.5 --criteria=l1,taylor
    .venv/bin/python benchmarks/sensitivity_cost.py --teacher=benchmarks/artifacts/bench_mskd_cifar_t120/teacher.keras
"""

from __future__ import annotations

import os
import time

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet20", "mskd_tf.models.build name (when no --teacher).")
flags.DEFINE_float("width", 1.0, "Width multiplier (when no --teacher).")
flags.DEFINE_string("teacher", "", "A trained .keras teacher instead of an untrained --model.")
flags.DEFINE_list("criteria", ["l1"], "Criteria to measure under (the pipeline measures every one).")
flags.DEFINE_float("target_macs", 0.5, "MACs target of the allocation.")
flags.DEFINE_integer("images", 256, "Calibration images for the KL divergence.")
flags.DEFINE_integer("bn_batches", 2, "BatchNorm re-estimation batches per cut (the pipeline's "
                     "stages.candidates.SENSITIVITY_BN_BATCHES).")
flags.DEFINE_integer("round_to", 8, "Kept widths are multiples of this.")
flags.DEFINE_string("dataset", f"folder:{results_io.SHARED_CIFAR10}", "mskd_tf.data source.")


def measure(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from mskd_tf import batchnorm, data, models, quantize, training
    from mskd_tf.pruning import build_graph, sensitivity
    from mskd_tf.pruning.criteria import rank

    splits = data.load(FLAGS.dataset, batch_size=128, train_subset=max(FLAGS.images, 128 * FLAGS.bn_batches), seed=0)
    calibration = data.eval_pipeline(splits.arrays["train"], 128, cache=False)
    images, labels = quantize.dataset_arrays(calibration, FLAGS.images)
    info = splits.info
    keras.utils.set_random_seed(0)
    teacher = (keras.models.load_model(FLAGS.teacher) if FLAGS.teacher else
               models.build(FLAGS.model, info.image_shape, info.num_classes, normalization=(info.mean, info.std),
                            width=FLAGS.width))
    graph = build_graph(teacher)
    options = dict(round_to=FLAGS.round_to, min_channels=4)
    rows = {}
    with training.fused_batchnorm():
        rankings = rank(teacher, FLAGS.criteria, calibration, graph=graph, num_batches=2)
        for criterion, scores in rankings.items():
            start = time.perf_counter()
            measured = sensitivity.measure(teacher, graph, scores, images, **options,
                                           adapt=lambda cut: batchnorm.recalibrate_batchnorm(cut, calibration,
                                                                                             FLAGS.bn_batches))
            middle = time.perf_counter()
            plan, ratios = sensitivity.allocate(graph, scores, measured, target_macs=FLAGS.target_macs, **options)
            end = time.perf_counter()
            cuts = sum(len(curve) - 1 for curve in measured.values())
            rows[criterion] = {"groups": len(measured), "cuts": cuts, "measure_seconds": middle - start,
                               "allocate_seconds": end - middle, "macs_ratio": plan.macs_ratio, "ratios": ratios,
                               "sensitivity": {g: {f"{r:g}": v for r, v in curve.items()} for g, curve in measured.items()}}
            print(f"{criterion}: {len(measured)} groups, {cuts} cuts measured in {middle - start:.1f} s "
                  f"({(middle - start) / max(cuts, 1):.2f} s each), allocated in {end - middle:.1f} s, "
                  f"MACs ratio {plan.macs_ratio:.3f}", flush=True)
    name = "sensitivity_cost_" + (teacher_label(FLAGS.teacher) if FLAGS.teacher
                                  else f"{FLAGS.model}_w{FLAGS.width:g}") + f"_bn{FLAGS.bn_batches}"
    results_io.write_results(name, {"teacher": FLAGS.teacher or f"{FLAGS.model}@{FLAGS.width:g} (untrained)",
                                    "images": FLAGS.images, "bn_batches": FLAGS.bn_batches,
                                    "target_macs": FLAGS.target_macs, "criteria": rows})


def teacher_label(path: str) -> str:
    """``.../bench_mskd_cifar_t120/teacher.keras`` -> ``t120_teacher``: the study that trained it, and the file."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path))).removeprefix("bench_mskd_cifar_")
    return f"{folder}_{os.path.splitext(os.path.basename(path))[0]}"


if __name__ == "__main__":
    app.run(measure)
