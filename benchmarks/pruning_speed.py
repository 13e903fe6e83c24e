"""Time of the structured pruning engine: graph, plan and clone of ResNet-56 and ResNet50.

Target (issue): building the dependency graph and the pruned clone takes under 5 s for
the project's ResNet-56 (32x32) and under 30 s for keras.applications ResNet50
(224x224, weights=None) on this 2-core CPU. Prints each stage and writes the numbers to
``benchmarks/pruning_speed.json``.

    .venv/bin/python benchmarks/pruning_speed.py
"""

from __future__ import annotations

import json
import pathlib
import time

import keras
import numpy as np
from absl import app, flags

from mskd_tf import flops, models
from mskd_tf.pruning import build_graph, plan_keep, prune

FLAGS = flags.FLAGS
flags.DEFINE_float("target_macs", 0.5, "MACs target of the plan, as a fraction of the original.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).with_name("pruning_speed.json")), "Where to write the results.")

LIMITS = {"resnet56": 5.0, "ResNet50": 30.0}


def _measure(name, model):
    t0 = time.perf_counter()
    graph = build_graph(model)
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    scores = {g.id: rng.uniform(size=g.size) for g in graph.groups if g.prunable}
    plan = plan_keep(graph, scores, target_macs=FLAGS.target_macs)
    t2 = time.perf_counter()
    pruned = prune(model, plan.keep, graph=graph)
    t3 = time.perf_counter()
    cost = flops.count(pruned)
    row = {
        "model": name, "layers": len(graph.records), "groups": len(graph.groups),
        "graph_s": round(t1 - t0, 3), "plan_s": round(t2 - t1, 3), "clone_s": round(t3 - t2, 3),
        "graph_plus_clone_s": round(t1 - t0 + t3 - t2, 3), "limit_s": LIMITS[name],
        "macs_before": plan.base_macs, "macs_after": cost.macs, "params_before": plan.base_params,
        "params_after": cost.params,
    }
    print(f"{name}: {row['layers']} layers, {row['groups']} groups | graph {row['graph_s']:.2f}s, "
          f"plan {row['plan_s']:.2f}s, clone {row['clone_s']:.2f}s -> graph+clone {row['graph_plus_clone_s']:.2f}s "
          f"(limit {LIMITS[name]:.0f}s) | MACs {plan.base_macs / 1e6:.2f}M -> {cost.macs / 1e6:.2f}M", flush=True)
    return row


def main(argv):
    del argv
    rows = [
        _measure("resnet56", models.build("resnet56", (32, 32, 3), 10)),
        _measure("ResNet50", keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))),
    ]
    pathlib.Path(FLAGS.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {FLAGS.out}")
    return 0 if all(r["graph_plus_clone_s"] < r["limit_s"] for r in rows) else 1


if __name__ == "__main__":
    app.run(main)
