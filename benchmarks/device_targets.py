"""Students planned to a TFLM arena against MACs-target students of equal arena, on full CIFAR-10.

For a trained teacher (the committed ResNet-20 of the CIFAR study, the MobileNetV2 0.5 of its second study) and
each ``--fractions`` of the teacher's measured int8 TFLite Micro arena, two students, made by the pipeline from
the same teacher, rankings, data, budget and seed (``--targets`` runs them all in one work dir):

* ``arena``: ``--target_arena_kb`` = fraction x the teacher's arena, ``--target_macs=1``: the device target alone
  decides, and each candidate keeps the largest MACs its measured arena allows;
* ``macs``: what a user of a MACs-only tool does to fit the same arena: the largest MACs ratio whose plain ``l1``
  uniform cut (the usual baseline) measures within that arena in TFLM (bisected, measured), as ``--target_macs``.

Both ship through the library's default path (zero-cost pick + KD for ``--student_epochs``), and the export
stage measures each shipped student's arena, flash and latency. The table puts accuracy beside the measured
costs, so the question "does planning to the arena keep more accuracy than cutting MACs until it fits" is
answered by rows, not by the planner's own estimate.

    benchmarks/snapshot_run.sh device_targets.py --network=resnet20      # -> results/device_targets_resnet20.{json,md}
    benchmarks/snapshot_run.sh device_targets.py --network=mobilenet_v2_w0.5
    benchmarks/snapshot_run.sh device_targets.py --network=resnet20 --plan_only   # the searches only, minutes

The pipeline resumes each student where it stopped (``runs/bench_device_targets_<network>``); a rerun after the
last one only rewrites the results. ``--front_only`` writes them from the students finished so far (the work dir's
``front.json``, rewritten after each item), training nothing: rows can be committed while the others train.
"""

from __future__ import annotations

import json
from pathlib import Path

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NETWORKS = {  # name -> (the teacher file a study committed, the pipeline's --model, --width)
    "resnet20": (ARTIFACTS / "bench_mskd_cifar_t120" / "teacher.keras", "resnet20", 1.0),
    "mobilenet_v2_w0.5": (ARTIFACTS / "bench_mskd_cifar_mobilenet_v2_w0.5" / "teacher.keras", "mobilenet_v2", 0.5),
}
flags.DEFINE_enum("network", "resnet20", list(NETWORKS), "Which committed teacher.")
flags.DEFINE_list("fractions", ["0.5", "0.25"], "Arena targets as fractions of the teacher's measured TFLM arena.")
flags.DEFINE_float("student_epochs", 15.0, "Each student's budget (the CIFAR studies' B).")
flags.DEFINE_string("dataset", "folder:../shared/data/cifar10-jpeg.tar.gz", "The teacher's data.")
flags.DEFINE_integer("bisect_steps", 8, "Measured l1-uniform cuts when searching the MACs ratio that fits an arena.")
flags.DEFINE_integer("round_to", 8, "The pipeline's --round_to, also for the l1-uniform search (8: SIMD widths; 1 "
                     "reaches smaller arenas, at odd widths that train slower).")
flags.DEFINE_boolean("front_only", False, "Write the results from the students finished so far (the work dir's "
                     "front.json); nothing trains.")
flags.DEFINE_boolean("plan_only", False, "Measure the teacher, search the MACs ratios and check each arena target's "
                     "reachability; write those to the results file, train nothing.")

CALIBRATION_IMAGES = 32


def calibration_images(splits):
    from mskd_tf import data as data_lib
    from mskd_tf import quantize

    images, _ = quantize.dataset_arrays(data_lib.eval_pipeline(splits.arrays["train"], 32), CALIBRATION_IMAGES)
    return images


def largest_macs_ratio_within(teacher, arena_bytes: float, images) -> dict:
    """The largest MACs ratio whose l1 uniform cut measures at most ``arena_bytes`` in TFLM (bisected)."""
    from mskd_tf import device_targets, flops
    from mskd_tf.errors import MskdError
    from mskd_tf.pruning import build_graph, criteria, plan_keep, prune

    graph = build_graph(teacher)
    scores = criteria.rank(teacher, ["l1"], None, graph=graph)["l1"]
    base = flops.count(teacher).macs
    low, high, best, tried = 0.02, 1.0, None, []
    for _ in range(FLAGS.bisect_steps):
        ratio = (low + high) / 2
        try:
            plan = plan_keep(graph, scores, target_macs=ratio, mode="uniform", round_to=FLAGS.round_to, min_channels=4)
        except MskdError:  # below the smallest cut the planner can make: look higher
            tried.append({"ratio": round(ratio, 4), "unreachable": True})
            low = ratio
            continue
        measured = device_targets.measure(prune(teacher, plan.keep, graph), images)
        tried.append({"ratio": round(ratio, 4), "macs_ratio": round(plan.macs / base, 4),
                      "arena_kb": round(measured["arena_bytes"] / 1024, 2)})
        if measured["arena_bytes"] <= arena_bytes:
            low, best = ratio, tried[-1]
        else:
            high = ratio
    return {"best": best, "tried": tried}


def narrowest_measured(teacher, graph, images) -> dict:
    """The smallest arena any allocation reaches: the narrowest plan (every layer at 4 channels, rounded), measured
    in TFLM, with its planned (activations) and persistent parts."""
    from mskd_tf import device_targets, flops
    from mskd_tf.pruning import plan_keep, prune

    plan = plan_keep(graph, None, keep_ratio=1e-9, mode="uniform", round_to=FLAGS.round_to, min_channels=4)
    measured = device_targets.measure(prune(teacher, plan.keep, graph), images)
    return {"macs_ratio": round(plan.macs / flops.count(teacher).macs, 4),
            **{f"{part}_kb": round(measured[part] / 1024, 2) for part in ("arena_bytes", "arena_head", "arena_tail")}}


def main(_):
    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import device_targets
    from mskd_tf.api import run_pipeline
    from mskd_tf.config import Config

    teacher_path, model, width = NETWORKS[FLAGS.network]
    if not teacher_path.exists():
        raise SystemExit(f"--network={FLAGS.network}: no teacher at {teacher_path}; its study trains it "
                         "(benchmarks/mskd_cifar.sh).")
    teacher = keras.models.load_model(teacher_path)
    splits = data_lib.load(FLAGS.dataset, batch_size=128, seed=0)
    images = calibration_images(splits)
    teacher_measured = device_targets.measure(teacher, images)
    teacher_kb = teacher_measured["arena_bytes"] / 1024
    from mskd_tf.errors import MskdError
    from mskd_tf.pruning import build_graph

    graph = build_graph(teacher)
    name = f"device_targets_{FLAGS.network}" + (f"_round{FLAGS.round_to}" if FLAGS.round_to != 8 else "")
    items, searches = [], {}
    for fraction in (float(f) for f in FLAGS.fractions):
        limit_kb = round(fraction * teacher_kb, 1)
        search = largest_macs_ratio_within(teacher, limit_kb * 1024, images)
        try:  # the pipeline refuses an unreachable target before training; say so here first
            device_targets.check_reachable(graph, device_targets.Targets(macs=1.0, arena_kb=limit_kb),
                                           round_to=FLAGS.round_to, min_channels=4, protect=())
            search["arena_target"] = "passes the preflight (the narrowest int8 model measured)"
            items.append(f"arena_kb={limit_kb:g}")
        except MskdError as exc:
            search["arena_target"] = str(exc)
        searches[f"{fraction:g}"] = {"arena_kb": limit_kb, **search}
        if search["best"] is not None:
            items.append(f"macs={search['best']['ratio']:g}")
        print(f"{fraction:g} x the teacher's {teacher_kb:.1f} KB arena = {limit_kb:g} KB; l1-uniform fits it up to "
              f"{search['best']} (tried {search['tried']})", flush=True)
    print("items: " + ",".join(items), flush=True)
    figures = {"network": FLAGS.network, "teacher_file": str(teacher_path), "round_to": FLAGS.round_to,
               "teacher": {"arena_kb": round(teacher_kb, 2), "flash_kb": round(teacher_measured["flash_bytes"] / 1024, 2)},
               "narrowest": narrowest_measured(teacher, graph, images), "searches": searches,
               "student_epochs": FLAGS.student_epochs, "students": None}
    if FLAGS.plan_only or not items:
        results_io.write_results(name, figures)
        return
    cfg = Config(dataset=FLAGS.dataset, model=model, width=width, teacher=str(teacher_path), batch_size=128,
                 target_macs=1.0, targets=tuple(items), student_epochs=FLAGS.student_epochs, export=("int8",),
                 round_to=FLAGS.round_to, workdir=f"runs/bench_{name}", seed=0)
    if not FLAGS.front_only:
        run_pipeline(cfg)
    front_file = Path(cfg.workdir) / "front.json"
    if not front_file.exists():
        raise SystemExit(f"error: --front_only: {front_file} does not exist yet (no item has finished); run without it.")
    front = json.loads(front_file.read_text())
    figures["teacher"].update(front["teacher"])
    figures["students"], figures["pending"] = front["students"], front.get("pending", [])
    results_io.write_results(name, figures)
    md = (Path(cfg.workdir) / "front.md").read_text()
    (results_io.RESULTS / f"{name}.md").write_text(
        f"# Arena-planned vs MACs-planned students: {FLAGS.network}\n\nTeacher arena {teacher_kb:.1f} KB. "
        "`macs=` rows: the largest MACs ratio whose l1-uniform cut fits the arena of the `arena_kb=` row above it.\n\n"
        + md.split("\n\n", 2)[-1])
    print(md, flush=True)


if __name__ == "__main__":
    app.run(main)
