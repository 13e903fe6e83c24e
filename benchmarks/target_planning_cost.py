"""What planning to a device target costs beyond the candidates stage it extends.

For a committed teacher (see ``device_targets.py``'s ``NETWORKS``), the pipeline's candidates stage runs twice from
the same teacher and rankings, in fresh work dirs, each in a process of its own: once to ``--target_macs=0.5``
alone, once to an arena target (``--arena_fraction`` x the teacher's measured TFLM arena, ``--target_macs=1``: the
arena decides). The stage's own recorded seconds are compared; the difference is the planning (two anchor
measurements, a converted int8 model per distinct candidate shape, TFLM and LiteRT runs, re-plans after a measured
miss, the widening of uniform candidates with room).

    benchmarks/snapshot_run.sh target_planning_cost.py --network=resnet20 --round_to=1   # 39.9 KB needs odd widths
    benchmarks/snapshot_run.sh target_planning_cost.py --network=mobilenet_v2_w0.5

Quote it from a quiet machine; the results file records both stages' seconds, candidates and distinct candidate
shapes (each shape is converted and measured once, plus the re-plans of a candidate that missed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import results_io
from absl import app, flags
from device_targets import NETWORKS, calibration_images

FLAGS = flags.FLAGS  # --network, --dataset, --round_to: device_targets.py's (imported above), meaning the same here
flags.DEFINE_float("arena_fraction", 0.5, "The arena target as a fraction of the teacher's measured TFLM arena.")
flags.DEFINE_enum("stage", None, ["macs", "arena"], "Internal: run that one candidates stage in this process.")
flags.DEFINE_float("arena_kb", 0.0, "Internal: the arena target of --stage=arena.")


def workdir_of(label: str) -> Path:
    return Path(f"runs/bench_planning_cost_{FLAGS.network}_{label}")


def run_stage(label: str):
    """One candidates stage in this (fresh) process: a second stage in the process that ran the first runs slower
    (docs/benchmarks/export.md, planning cost), which would be charged to whichever ran second."""
    from mskd_tf.api import run_pipeline
    from mskd_tf.config import Config

    teacher_path, model, width = NETWORKS[FLAGS.network]
    targets = {"target_macs": 0.5} if label == "macs" else {"target_macs": 1.0, "target_arena_kb": FLAGS.arena_kb}
    workdir = workdir_of(label)
    shutil.rmtree(workdir, ignore_errors=True)  # the stage must run, not resume
    cfg = Config(dataset=FLAGS.dataset, model=model, width=width, teacher=str(teacher_path), batch_size=128,
                 round_to=FLAGS.round_to, workdir=str(workdir), seed=0, **targets)
    run_pipeline(cfg, stop_after="candidates")


def main(_):
    if FLAGS.stage:
        return run_stage(FLAGS.stage)
    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import device_targets

    teacher_path, _, _ = NETWORKS[FLAGS.network]
    teacher = keras.models.load_model(teacher_path)
    images = calibration_images(data_lib.load(FLAGS.dataset, batch_size=128, seed=0))
    arena_kb = round(FLAGS.arena_fraction * device_targets.measure(teacher, images)["arena_bytes"] / 1024, 1)
    runs = {}
    for label in ("macs", "arena"):
        subprocess.run([sys.executable, sys.argv[0], f"--network={FLAGS.network}", f"--dataset={FLAGS.dataset}",
                        f"--round_to={FLAGS.round_to}", f"--arena_kb={arena_kb}", f"--stage={label}"], check=True)
        workdir = workdir_of(label)
        record = json.loads((workdir / "records" / "candidates.json").read_text())
        rows = json.loads((workdir / "candidates.json").read_text())["candidates"]
        shapes = {json.dumps(r["widths"], sort_keys=True) for r in rows}
        runs[label] = {"candidates_seconds": record["seconds"], "candidates": len(rows), "distinct_shapes": len(shapes),
                       "macs_ratios": sorted(round(r["macs_ratio"], 4) for r in rows),
                       **({"arena_kb": sorted(round(r["arena_bytes"] / 1024, 2) for r in rows),
                           "by_candidate": {r["criterion"]: {"macs_ratio": round(r["macs_ratio"], 4),
                                                             "arena_kb": round(r["arena_bytes"] / 1024, 2)}
                                            for r in rows}}
                          if label == "arena" else {})}
        print(f"{label}: candidates stage {record['seconds']:.1f} s, {len(rows)} candidates, {len(shapes)} shapes",
              flush=True)
    extra = runs["arena"]["candidates_seconds"] - runs["macs"]["candidates_seconds"]
    print(f"planning to --target_arena_kb={arena_kb:g} costs {extra:.1f} s beyond the MACs-only candidates stage",
          flush=True)
    results_io.write_results(f"target_planning_cost_{FLAGS.network}",
                             {"network": FLAGS.network, "round_to": FLAGS.round_to, "arena_target_kb": arena_kb,
                              "runs": runs,
                              "extra_seconds": round(extra, 1)})


if __name__ == "__main__":
    app.run(main)
