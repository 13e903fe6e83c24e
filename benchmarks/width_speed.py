"""Training ms/step of ResNet-20 students whose kept widths are, or are not, multiples of 8.

The same 50%-MACs student twice: residual-stream slices of 7/17/48 channels (what ``--round_to=8`` left before
the planner rounded every slice of a coupled group) and 8/16/48 (what it leaves now), plus the whole teacher.
Fused BatchNorm, synthetic batches of 128, blocks of ``--steps`` steps alternating models ``--repeats`` times
in one process so all see the same load; the median per model is reported. Speed does not depend on the
weights, so the models are untrained.

    .venv/bin/python benchmarks/width_speed.py                   # -> benchmarks/results/width_speed.json
    .venv/bin/python benchmarks/width_speed.py --repeats 4 --models \
        free=/tmp/qs_r1/candidates/activation-global.keras,round8=/tmp/qs_r8/candidates/activation-global.keras,\
teacher=/tmp/qs_r8/teacher.keras   # the quickstart's candidates, made by `python -m mskd_tf.run
        --flagfile=configs/quickstart.cfg --stop_after=candidates --round_to=1 (or 8) --workdir=/tmp/qs_r1 (qs_r8)`
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

import results_io

flags.DEFINE_integer("steps", 30, "Timed training steps per block.")
flags.DEFINE_integer("repeats", 2, "Blocks per model (alternating).")
flags.DEFINE_list("models", [], "Instead of the built-in ResNet-20 variants: name=path.keras pairs to time, e.g. two "
                  "candidates built with --round_to=1 and --round_to=8 (results then go to width_speed_models.json).")
FLAGS = flags.FLAGS


def _stream_keep(stream, stage_widths):
    """Kept indices of the option-A residual stream group: ``stage_widths[i]`` of stage i's slice."""
    import numpy as np

    members = sorted({tuple(np.unique(r.indices).tolist()) for r in stream.producers}, key=len)
    chosen, inner = set(), set()
    for member, width in zip(members, stage_widths):
        fresh = sorted(set(member) - inner)
        chosen |= set(sorted(set(member) & chosen)[:width]) | set(fresh[: width - len(set(member) & chosen)])
        inner = set(member)
    return np.array(sorted(chosen))


def main(_):
    import keras
    import numpy as np
    import tensorflow as tf

    from mskd_tf import flops, models, training
    from mskd_tf.pruning import build_graph, prune

    if FLAGS.models:
        pairs = [item.split("=", 1) for item in FLAGS.models]
        if any(len(pair) != 2 for pair in pairs):
            raise app.UsageError(f"--models: expected name=path.keras pairs, got {FLAGS.models}")
        variants = {name: keras.models.load_model(path) for name, path in pairs}
    else:
        teacher = models.build("resnet20", (32, 32, 3), 10)
        graph = build_graph(teacher)
        stream = graph.groups[0]
        inner = {g.id: np.arange(min(g.size, {16: 16, 32: 32, 64: 48}[g.size])) for g in graph.groups[1:] if g.prunable}
        variants = {"teacher": teacher,
                    "odd slices 7/17/48": prune(teacher, {stream.id: _stream_keep(stream, (7, 17, 48)), **inner}),
                    "round-8 slices 8/16/48": prune(teacher, {stream.id: _stream_keep(stream, (8, 16, 48)), **inner})}
    shape = tuple(next(iter(variants.values())).input_shape[1:])
    classes = int(next(iter(variants.values())).output_shape[-1])
    rng = np.random.default_rng(0)
    x = rng.random((128 * FLAGS.steps, *shape), dtype=np.float32)
    y = rng.integers(0, classes, 128 * FLAGS.steps)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(128).cache()
    compiled = {}
    for name, model in variants.items():
        model = keras.models.clone_model(model)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        compiled[name] = model
    times = {name: [] for name in variants}
    with training.fused_batchnorm():
        for model in compiled.values():
            model.fit(data.take(3), verbose=0)  # trace outside the timed blocks
        for _ in range(FLAGS.repeats):
            for name, model in compiled.items():
                start = time.perf_counter()
                model.fit(data, verbose=0)
                times[name].append(1000 * (time.perf_counter() - start) / FLAGS.steps)
    figures = {name: {"macs": int(flops.count(variants[name]).macs), "ms_per_step": round(statistics.median(t), 1),
                      "blocks": [round(v, 1) for v in t]} for name, t in times.items()}
    for name, f in figures.items():
        print(f"{name:24s} {f['macs'] / 1e6:6.2f} M MACs  {f['ms_per_step']:7.1f} ms/step  (blocks {f['blocks']})")
    results_io.write_results("width_speed_models" if FLAGS.models else "width_speed", figures)


if __name__ == "__main__":
    app.run(main)
