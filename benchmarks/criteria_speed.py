"""Time of all nine pruning criteria on ResNet-20, and what sharing one calibration pass saves.

Target (issue): all nine criteria with 20 calibration batches of 128 in under 2 minutes
on this 2-core CPU. Times, with tracing included (what a user waits for):

  - the five data-free criteria (l1, l2, fpgm, bn_gamma, random),
  - the four data-driven ones in one shared pass (apoz, activation, taylor, hrank),
  - with ``--separate``, each data-driven criterion alone (the cost without sharing),

then prints the Jaccard overlap of the channels each criterion keeps at half the MACs.

    .venv/bin/python benchmarks/criteria_speed.py                      # random-weight ResNet-20
    .venv/bin/python benchmarks/criteria_speed.py --model=work/teacher.keras

Without ``--model`` the ResNet-20 has random weights with perturbed BN statistics; the
time does not depend on the weights (every criterion does the same arithmetic on any
weights), but the overlap table of such a model says nothing about trained networks.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from mskd_tf import models, report
from results_io import write_results
from mskd_tf.pruning import build_graph, plan_keep
from mskd_tf.pruning import criteria as C
from mskd_tf.pruning.candidates import overlap_matrix

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained .keras model (32x32x3 input); default: random-weight ResNet-20.")
flags.DEFINE_integer("batches", 20, "Calibration batches.")
flags.DEFINE_integer("batch_size", 128, "Calibration batch size.")
flags.DEFINE_integer("hrank_samples", 512, "hrank's sample cap (its registered default is 512).")
flags.DEFINE_bool("separate", True, "Also time each data-driven criterion alone.")

DATA_FREE = ["l1", "l2", "fpgm", "bn_gamma", "random"]
DATA_DRIVEN = ["apoz", "activation", "taylor", "hrank"]


def teacher():
    if FLAGS.model:
        return keras.saving.load_model(FLAGS.model)
    keras.utils.set_random_seed(0)
    model = models.build("resnet20", (32, 32, 3), 10)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.2, 1.5, n).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.2, n).astype(np.float32))
    return model


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv):
    del argv
    C.REGISTRY["hrank"] = dataclasses.replace(C.REGISTRY["hrank"], max_samples=FLAGS.hrank_samples)
    model = teacher()
    graph = build_graph(model)
    count = FLAGS.batches * FLAGS.batch_size
    rng = np.random.default_rng(1)
    images = rng.random((count, *model.input_shape[1:]), dtype=np.float32)
    labels = rng.integers(0, model.output_shape[-1], count)
    calibration = tf.data.Dataset.from_tensor_slices((images, labels)).batch(FLAGS.batch_size).cache()
    for _ in calibration:  # materialise the cache so data loading is not timed
        pass

    free, free_s = timed(lambda: C.rank(model, DATA_FREE, graph=graph))
    driven, driven_s = timed(lambda: C.rank(model, DATA_DRIVEN, calibration, graph=graph,
                                            num_batches=FLAGS.batches))
    print(f"model {model.name}: {sum(g.prunable for g in graph.groups)} prunable groups, "
          f"{FLAGS.batches} batches x {FLAGS.batch_size}, hrank capped at {FLAGS.hrank_samples} samples")
    print(f"data-free   {', '.join(DATA_FREE)}: {free_s:6.1f} s")
    print(f"data-driven {', '.join(DATA_DRIVEN)} (one pass): {driven_s:6.1f} s")
    print(f"all nine: {free_s + driven_s:6.1f} s (target < 120 s)")
    if FLAGS.separate:
        alone = {}
        for name in DATA_DRIVEN:
            _, alone[name] = timed(lambda: C.rank(model, name, calibration, graph=graph, num_batches=FLAGS.batches))
            print(f"  {name:10s} alone: {alone[name]:6.1f} s")
        print(f"  sum alone: {sum(alone.values()):6.1f} s vs shared {driven_s:.1f} s")
    keeps = {name: plan_keep(graph, scores, target_macs=0.5).keep for name, scores in {**free, **driven}.items()}
    print("\nJaccard overlap of kept channels at 50% MACs:")
    overlap = overlap_matrix(keeps)
    print(report.overlap_table(overlap))
    write_results("criteria_speed", {
        "model": model.name, "batches": FLAGS.batches, "batch_size": FLAGS.batch_size,
        "data_free_s": free_s, "data_driven_shared_pass_s": driven_s, "all_nine_s": free_s + driven_s,
        "data_driven_alone_s": alone if FLAGS.separate else None, "jaccard_at_half_macs": overlap,
    })


if __name__ == "__main__":
    app.run(main)
