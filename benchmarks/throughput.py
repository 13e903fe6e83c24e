"""Training images/s of mskd_tf vs a minimal PyTorch loop, measured back to back.

Three workloads, each on the same data (CIFAR-10, pad-4 crop + flip applied to
every batch), batch and model on both sides:

  teacher  ``fit`` of ``--model`` at ``--width`` (ResNet-20 by default; mskd_tf.models + training.make_optimizer)
  clone    ``fit`` of its 50%-MACs pruned clone (mskd_tf.pruning)
  distill  ``Distiller(teacher, clone).fit`` (frozen teacher forward + KD loss)

The PyTorch side mirrors each Keras model layer by layer (same channel counts,
strides and shortcut; a depthwise convolution is a grouped one with groups = channels) and trains it with SGD + batch-level tensor augmentation.
Blocks of ``--steps`` training steps alternate TF, torch, TF, torch ... in one
process so both see the same machine load; every pair gives one ratio, and the
spread of the ratios is printed next to their median.

    .venv/bin/python benchmarks/throughput.py --quick
    .venv/bin/python benchmarks/throughput.py --pairs 5 --steps 12               # clone widths in multiples of 8
    .venv/bin/python benchmarks/throughput.py --pairs 5 --steps 12 --round_to 1  # the exact (odd) widths
    .venv/bin/python benchmarks/throughput.py --nofused_batchnorm --notorch  # a lever off
    .venv/bin/python benchmarks/throughput.py --profile /tmp/tp --workloads teacher --notorch
    .venv/bin/python benchmarks/throughput.py --model=mobilenet_v2 --width=0.5 --pairs 5 --steps 12 \
        --reference_model=resnet20 --profile=/tmp/tp   # MobileNetV2 0.5 vs PyTorch, per MAC vs ResNet-20

``--profile`` traces one more TF block per workload and prints its op time by family (depthwise, other
convolutions, BatchNorm, ReLU/ReLU6, ...) forward and backward, with the convolutions' GMAC/s.

torch is an optional benchmark-only dependency: ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import collections
import glob
import os
import statistics
import time

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", f"folder:{results_io.SHARED_CIFAR10}", "mskd_tf.data source.")
flags.DEFINE_integer("train_subset", 10000, "Training images (trimmed to whole batches).")
flags.DEFINE_integer("batch_size", 128, "Training batch size (both frameworks).")
flags.DEFINE_string("model", "resnet20", "Teacher architecture (any mskd_tf.models.build name).")
flags.DEFINE_float("width", 1.0, "Channel multiplier of the teacher (models.build width=...).")
flags.DEFINE_string("reference_model", "", "Also time this model's teacher fit (TF only, e.g. resnet20) in the same "
                    "alternation and print the teacher's images/s x MACs against it, pair by pair.")
flags.DEFINE_list("workloads", ["teacher", "clone", "distill"], "Which of teacher, clone, distill to time.")
flags.DEFINE_integer("pairs", 3, "Alternating (TF block, torch block) pairs per workload.")
flags.DEFINE_integer("steps", 10, "Training steps per timed block.")
flags.DEFINE_bool("quick", False, "Short run: 2 pairs of 6-step blocks.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch reference (when torch is installed).")
flags.DEFINE_bool("fused_batchnorm", True, "training.configure_runtime(fused_batchnorm=...).")
flags.DEFINE_integer("intra_op_threads", None, "TF intra-op threads (default: the library's choice).")
flags.DEFINE_integer("inter_op_threads", None, "TF inter-op threads (default: the library's choice).")
flags.DEFINE_integer("steps_per_execution", None, "Override training.compile_kwargs()'s steps_per_execution.")
flags.DEFINE_bool("jit_compile", None, "Override training.compile_kwargs()'s jit_compile.")
flags.DEFINE_bool("levers", False, "Instead: alternate TF variants of the teacher fit in one process "
                  "(Keras BatchNorm vs fused, steps_per_execution 1 vs 4, XLA) and print their images/s.")
flags.DEFINE_string("profile", "", "If set, trace one TF block per workload here and print op-level times.")
flags.DEFINE_integer("seed", 0, "Seed for data order, augmentation and initial weights.")
flags.DEFINE_integer("round_to", 8, "Kept widths of the clone are multiples of this (8: the library default and "
                     "what every config ships; 1: the exact, odd widths). Both frameworks get the same widths.")

KD_TEMPERATURE, KD_ALPHA, LR = 4.0, 0.5, 0.05


# ----------------------------------------------------------------------------- TF side


def tf_models(info):
    """Teacher and its 50%-MACs clone (pruned; a width-0.7 model when pruning is unavailable)."""
    from mskd_tf import models

    teacher = models.build(FLAGS.model, info.image_shape, info.num_classes, normalization=(info.mean, info.std),
                           width=FLAGS.width)
    try:
        from mskd_tf.pruning import build_graph, plan_keep, prune

        graph = build_graph(teacher)
        clone = prune(teacher, plan_keep(graph, None, target_macs=0.5, round_to=FLAGS.round_to).keep, graph)
    except ImportError:
        clone = models.build(FLAGS.model, info.image_shape, info.num_classes,
                             normalization=(info.mean, info.std), width=0.7 * FLAGS.width)
    return teacher, clone


def tf_trainers(teacher, clone, reference=None):
    """``{workload: fit-able compiled keras.Model}`` built as the library's stages build them."""
    import keras

    from mskd_tf import training
    from mskd_tf.distill import Distiller

    overrides = {}
    if FLAGS.steps_per_execution is not None:
        overrides["steps_per_execution"] = FLAGS.steps_per_execution
    if FLAGS.jit_compile is not None:
        overrides["jit_compile"] = FLAGS.jit_compile
    kwargs = training.compile_kwargs(**overrides)
    optimizer = lambda: training.make_optimizer("sgd", LR, total_steps=10_000)  # noqa: E731
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainers = {}
    if "teacher" in FLAGS.workloads:
        teacher.compile(optimizer=optimizer(), loss=ce, metrics=["accuracy"], **kwargs)
        trainers["teacher"] = teacher
    if "clone" in FLAGS.workloads:
        fine_tuned = keras.models.clone_model(clone)
        fine_tuned.set_weights(clone.get_weights())
        fine_tuned.compile(optimizer=optimizer(), loss=ce, metrics=["accuracy"], **kwargs)
        trainers["clone"] = fine_tuned
    if FLAGS.reference_model:
        reference.compile(optimizer=optimizer(), loss=ce, metrics=["accuracy"], **kwargs)
        trainers["reference"] = reference
    if "distill" in FLAGS.workloads:
        frozen = keras.models.clone_model(teacher)  # Distiller freezes its teacher: not the one trained above
        frozen.set_weights(teacher.get_weights())
        distiller = Distiller(frozen, clone)
        distiller.compile(optimizer(), temperature=KD_TEMPERATURE, alpha=KD_ALPHA, **kwargs)
        trainers["distill"] = distiller
    return trainers


def tf_block(model, dataset, steps):
    """Images/s of ``model.fit`` over ``steps`` batches."""
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * FLAGS.batch_size / (time.perf_counter() - start)


# Op type -> family, for the profile's table (TF's oneDNN build prefixes its kernels with _MklNative / _Mkl).
# A fused op (e.g. _FusedConv2D with its BatchNorm folded in) counts under its first family.
OP_FAMILIES = (("depthwise", "Depthwise"), ("conv", "Conv2D"), ("batchnorm", "BatchNorm"), ("relu", "Relu"),
               ("dense", "MatMul"))


def op_family(op_type: str) -> str:
    return next((family for family, part in OP_FAMILIES if part in op_type), "other")


def read_profile(logdir, steps):
    """Per-step op time of a profiler trace: ``{(family, direction): ms}`` and ``{op type: ms}``.

    Times are the TF executor's op events summed over its threads (two ops can overlap in time, so the sum
    may exceed the wall time); an op under ``gradient_tape/`` is backward, the optimizer's updates are other.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    by_family, by_op = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name.startswith("ExecutorState"):  # the envelope around the ops
                    continue
                scope, _, op_type = name.rpartition(":")
                ms = event.duration_ps / 1e9 / steps
                family = op_family(op_type)
                direction = "backward" if "gradient_tape/" in scope else "forward"
                if family == "other" and direction == "forward" and "/" not in scope.replace("StatefulPartitionedCall/", "", 1):
                    direction = "other"
                by_family[(family, direction)] += ms
                by_op[op_type] += ms
    return by_family, by_op


def print_profile(by_family, by_op, macs, batch_size, top=12):
    """The profile as a family x direction table (ms per step, share, GMAC/s of the conv families)."""
    total = sum(by_family.values())
    print(f"  op time per step (summed over executor threads): {total:.0f} ms")
    print(f"  {'family':10s} {'forward ms':>10s} {'backward ms':>11s} {'share':>6s} {'fwd GMAC/s':>10s} {'bwd GMAC/s':>10s}")
    for family in [name for name, _ in OP_FAMILIES] + ["other"]:
        forward, backward = by_family.get((family, "forward"), 0.0), by_family.get((family, "backward"), 0.0)
        other = by_family.get((family, "other"), 0.0)
        if forward + backward + other == 0:
            continue
        rate = ""
        if family in macs and forward and backward:  # backward = input gradient + filter gradient: 2x the MACs
            work = macs[family] * batch_size / 1e6
            rate = f"{work / forward:10.1f} {2 * work / backward:10.1f}"
        print(f"  {family:10s} {forward:10.1f} {backward:11.1f} {100 * (forward + backward + other) / total:5.1f}% "
              f"{rate}" + (f"  (+{other:.1f} ms optimizer)" if other else ""))
    print("  largest op types:")
    for op, ms in by_op.most_common(top):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {op}")


def family_macs(model) -> dict:
    """Forward MACs per image of the depthwise, other convolution and dense layers."""
    import keras

    from mskd_tf import flops

    per_layer = flops.count(model).per_layer
    macs = collections.Counter()
    for layer in model.layers:
        if layer.name not in per_layer:
            continue
        family = ("depthwise" if isinstance(layer, keras.layers.DepthwiseConv2D) else
                  "conv" if isinstance(layer, keras.layers.Conv2D) else
                  "dense" if isinstance(layer, keras.layers.Dense) else None)
        if family:
            macs[family] += per_layer[layer.name][0]
    return dict(macs)


# ----------------------------------------------------------------------------- PyTorch side


def mirror_spec(model):
    """The layer graph of a Keras CIFAR model as plain data a PyTorch process can rebuild.

    Covers what mskd_tf's ResNets, VGGs and small CNNs are made of: a list of
    ``(name, kind, parent names, arguments)`` in topological order.
    """
    import keras
    import numpy as np

    L, spec = keras.layers, []
    for layer in model.operations:
        parents = [node.operation.name for node in layer._inbound_nodes[0].parent_nodes]
        if isinstance(layer, L.DepthwiseConv2D):  # torch: a grouped convolution, groups = channels
            k = tuple(layer.kernel.shape)
            args = dict(cin=k[2], cout=k[2] * k[3], kernel=k[:2], stride=tuple(layer.strides), groups=k[2],
                        padding=k[0] // 2 if layer.padding == "same" else 0, bias=layer.use_bias)
        elif isinstance(layer, L.Conv2D):
            k = tuple(layer.kernel.shape)
            args = dict(cin=k[2], cout=k[3], kernel=k[:2], stride=tuple(layer.strides),
                        padding=k[0] // 2 if layer.padding == "same" else 0, bias=layer.use_bias)
        elif isinstance(layer, L.BatchNormalization):
            args = dict(channels=layer.moving_mean.shape[0], eps=layer.epsilon, momentum=1 - layer.momentum)
        elif isinstance(layer, L.Dense):
            args = dict(cin=layer.kernel.shape[0], cout=layer.kernel.shape[1])
        elif isinstance(layer, L.Normalization):
            args = dict(mean=np.asarray(layer.mean).ravel().tolist(),
                        std=np.sqrt(np.asarray(layer.variance)).ravel().tolist())
        elif isinstance(layer, L.ZeroPadding2D):  # mskd_tf's shortcut A: pads the channel axis
            args = dict(pad=tuple(layer.padding[1]))
        elif isinstance(layer, (L.AveragePooling2D, L.MaxPooling2D)):
            args = dict(size=layer.pool_size[0], stride=layer.strides[0])
        elif isinstance(layer, L.ReLU):
            if layer.negative_slope or layer.threshold:
                raise NotImplementedError(f"no torch mirror for a leaky or thresholded ReLU ({layer.name})")
            args = dict(max_value=None if layer.max_value is None else float(layer.max_value))
        elif isinstance(layer, (L.InputLayer, L.Add, L.Reshape, L.GlobalAveragePooling2D, L.Dropout,
                                L.Flatten)):
            args = {}
        else:
            raise NotImplementedError(f"no torch mirror for {type(layer).__name__} ({layer.name})")
        spec.append((layer.name, type(layer).__name__, parents, args))
    return spec


def torch_worker(conn, images, labels, specs, batch_size, seed):
    """PyTorch reference in its own process (no TF threads around): runs blocks on request.

    Receives ``(workload, steps)`` and answers images/s; ``None`` ends it. ``specs`` maps
    ``teacher``/``clone`` to :func:`mirror_spec` output. Batch-level pad-4 crop + flip
    on in-memory uint8 NHWC images, SGD with Nesterov momentum, KD with T=4, alpha=0.5.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(seed)

    class Mirror(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.spec, self.mods = spec, nn.ModuleDict()
            for name, kind, _, a in spec:
                if kind in ("Conv2D", "DepthwiseConv2D"):
                    self.mods[name] = nn.Conv2d(a["cin"], a["cout"], a["kernel"], a["stride"], a["padding"],
                                                bias=a["bias"], groups=a.get("groups", 1))
                elif kind == "BatchNormalization":
                    self.mods[name] = nn.BatchNorm2d(a["channels"], eps=a["eps"], momentum=a["momentum"])
                elif kind == "Dense":
                    self.mods[name] = nn.Linear(a["cin"], a["cout"])
                elif kind == "Normalization":
                    self.register_buffer(f"{name}_mean", torch.tensor(a["mean"]).reshape(1, -1, 1, 1))
                    self.register_buffer(f"{name}_std", torch.tensor(a["std"]).reshape(1, -1, 1, 1))

        def forward(self, x):
            values = {}
            for name, kind, parents, a in self.spec:
                ins = [values[p] for p in parents]
                if kind == "InputLayer":
                    out = x
                elif name in self.mods:
                    out = self.mods[name](ins[0])
                elif kind == "Normalization":
                    out = (ins[0] - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
                elif kind == "ReLU":
                    out = F.relu(ins[0]) if a["max_value"] is None else F.hardtanh(ins[0], 0.0, a["max_value"])
                elif kind == "Add":
                    out = sum(ins[1:], ins[0])
                elif kind == "ZeroPadding2D":
                    out = F.pad(ins[0], (0, 0, 0, 0, *a["pad"]))
                elif kind == "AveragePooling2D":
                    stride = a["stride"]
                    out = ins[0][:, :, ::stride, ::stride] if a["size"] == 1 else F.avg_pool2d(ins[0], a["size"], stride)
                elif kind == "MaxPooling2D":
                    out = F.max_pool2d(ins[0], a["size"], a["stride"])
                elif kind == "GlobalAveragePooling2D":
                    out = ins[0].mean((2, 3))
                elif kind == "Flatten":
                    out = ins[0].flatten(1)
                else:  # Reshape around the channel pad, Dropout at benchmark level: no-ops
                    out = ins[0]
                values[name] = out
            return out

    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    state = {"order": torch.randperm(len(labels)), "cursor": 0}

    def batch():
        if state["cursor"] + batch_size > len(labels):
            state["order"], state["cursor"] = torch.randperm(len(labels)), 0
        index = state["order"][state["cursor"]:state["cursor"] + batch_size]
        state["cursor"] += batch_size
        x = images[index].permute(0, 3, 1, 2).float() / 255.0
        n, _, height, width = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        rows = torch.randint(0, 9, (n, 1)) + torch.arange(height)
        cols = torch.randint(0, 9, (n, 1)) + torch.arange(width)
        cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols)
        x = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # n, h, w, c
        return x.permute(0, 3, 1, 2).contiguous(), labels[index]

    def trainer(student, teacher=None):
        optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
        student.train()
        if teacher is not None:
            teacher.eval()

        def step():
            x, y = batch()
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / KD_TEMPERATURE, dim=1)
                kd = F.kl_div(F.log_softmax(logits / KD_TEMPERATURE, dim=1), soft, reduction="batchmean")
                loss = KD_ALPHA * loss + (1 - KD_ALPHA) * KD_TEMPERATURE**2 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps = {
        "teacher": trainer(Mirror(specs["teacher"])),
        "clone": trainer(Mirror(specs["clone"])),
        "distill": trainer(Mirror(specs["clone"]), teacher=Mirror(specs["teacher"])),
    }
    conn.send(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    while (request := conn.recv()) is not None:
        workload, count = request
        try:
            start = time.perf_counter()
            for _ in range(count):
                steps[workload]()
            conn.send(count * batch_size / (time.perf_counter() - start))
        except Exception:  # report it to the driver instead of leaving it waiting
            import traceback

            conn.send(traceback.format_exc())


def start_torch_worker(arrays, specs):
    """A torch_worker process and a ``run(workload, steps) -> images/s`` function (None without torch)."""
    import importlib.util
    import multiprocessing

    if importlib.util.find_spec("torch") is None:
        print("torch is not installed (pip install torch==2.13.0): TF figures only")
        return None, None
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=torch_worker, args=(child, arrays.x, arrays.y, specs, FLAGS.batch_size, FLAGS.seed), daemon=True)
    process.start()
    print(parent.recv())

    def run(workload, steps):
        parent.send((workload, steps))
        while not parent.poll(5):
            if not process.is_alive():
                raise RuntimeError(f"the torch worker died (exit code {process.exitcode}); see its stderr above")
        answer = parent.recv()
        if isinstance(answer, str):
            raise RuntimeError(f"the torch worker failed:\n{answer}")
        return answer

    return process, (run, parent)


# ----------------------------------------------------------------------------- driver


def compare_levers(info, train, pairs, steps):
    """Teacher fit under in-process variants, alternated block by block (same load for all).

    The fused-BatchNorm switch is read when a model's train step is traced, so each
    variant is traced (warm-up) under its own setting; full batches keep it from retracing.
    """
    import keras

    from mskd_tf import models, training

    variants = {
        "keras BN": (False, {}),
        "fused BN": (True, {}),
        "fused BN + steps_per_execution=4": (True, {"steps_per_execution": 4}),
        "fused BN + XLA": (True, {"jit_compile": True}),
    }
    trained = {}
    for name, (fused, overrides) in variants.items():
        training.configure_runtime(fused_batchnorm=fused)
        keras.utils.set_random_seed(FLAGS.seed)
        model = models.build(FLAGS.model, info.image_shape, info.num_classes, normalization=(info.mean, info.std),
                             width=FLAGS.width)
        model.compile(optimizer=training.make_optimizer("sgd", LR, total_steps=10_000),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                      **training.compile_kwargs(**overrides))
        model.fit(train, epochs=1, steps_per_epoch=8, verbose=0)
        trained[name] = model
    rates = {name: [] for name in trained}
    for _ in range(pairs):
        for name, model in trained.items():
            rates[name].append(tf_block(model, train, steps))
        print("  ".join(f"{name}: {r[-1]:.0f}" for name, r in rates.items()), flush=True)
    base = rates["keras BN"]
    print("\nteacher fit variant                 images/s median (min-max)   vs keras BN: median (min-max)")
    for name, r in rates.items():
        print(f"{name:35s} {statistics.median(r):6.0f} ({min(r):.0f}-{max(r):.0f})        "
              f"{spread([a / b for a, b in zip(r, base)])}")



def spread(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def measure(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mskd_tf import training

    runtime_args = {"fused_batchnorm": FLAGS.fused_batchnorm}
    if FLAGS.intra_op_threads is not None:
        runtime_args["intra_op_threads"] = FLAGS.intra_op_threads
    if FLAGS.inter_op_threads is not None:
        runtime_args["inter_op_threads"] = FLAGS.inter_op_threads
    runtime = training.configure_runtime(**runtime_args)

    import keras
    import tensorflow as tf

    from mskd_tf import data, flops

    pairs, steps = (2, 6) if FLAGS.quick else (FLAGS.pairs, FLAGS.steps)
    unknown = set(FLAGS.workloads) - {"teacher", "clone", "distill"}
    if unknown:
        raise app.UsageError(f"--workloads: unknown {sorted(unknown)}; use teacher, clone, distill.")
    splits = data.load(FLAGS.dataset, batch_size=FLAGS.batch_size, train_subset=FLAGS.train_subset, seed=FLAGS.seed)
    arrays = splits.arrays["train"]
    whole = len(arrays) // FLAGS.batch_size * FLAGS.batch_size  # full batches only: one traced shape
    arrays = data.Arrays(arrays.x[:whole], arrays.y[:whole])
    train = data.train_pipeline(arrays, FLAGS.batch_size, augment=True, seed=FLAGS.seed).repeat()

    if FLAGS.levers:
        return compare_levers(splits.info, train, pairs, steps)
    keras.utils.set_random_seed(FLAGS.seed)
    teacher, clone = tf_models(splits.info)
    reference = None
    if FLAGS.reference_model:
        from mskd_tf import models

        info = splits.info
        reference = models.build(FLAGS.reference_model, info.image_shape, info.num_classes,
                                 normalization=(info.mean, info.std))
    trainers = tf_trainers(teacher, clone, reference)
    torch_run = None
    if FLAGS.torch:
        worker, handle = start_torch_worker(arrays, {"teacher": mirror_spec(teacher), "clone": mirror_spec(clone)})
        torch_run = handle[0] if handle else None

    print(f"tf {tf.__version__}, keras {keras.__version__}, runtime {runtime}, "
          f"compile {training.compile_kwargs()}, oneDNN env {os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}")
    print(f"{len(arrays)} images {arrays.x.shape[1:]}, batch {FLAGS.batch_size}, {pairs} pairs x {steps} steps")
    for name, model in trainers.items():  # warm-up: tracing, first calls, oneDNN primitive caches
        model.fit(train, epochs=1, steps_per_epoch=4 * model.steps_per_execution, verbose=0)
        if torch_run and name != "reference":
            torch_run(name, 8)

    results = {name: {"tf": [], "torch": []} for name in trainers}
    for pair in range(pairs):
        for name, model in trainers.items():
            results[name]["tf"].append(tf_block(model, train, steps))
            if torch_run and name != "reference":
                results[name]["torch"].append(torch_run(name, steps))
            row = results[name]
            ratio = f", ratio {row['tf'][-1] / row['torch'][-1]:.2f}" if row["torch"] else ""
            torch_text = f", torch {row['torch'][-1]:.0f}" if row["torch"] else ""
            print(f"pair {pair + 1} {name:8s}: tf {row['tf'][-1]:.0f}{torch_text} images/s{ratio}", flush=True)

    print("\nworkload   tf images/s        torch images/s     tf/torch ratio: median (min-max)")
    for name, row in results.items():
        tf_text = f"{statistics.median(row['tf']):6.0f} ({min(row['tf']):.0f}-{max(row['tf']):.0f})"
        if row["torch"]:
            torch_text = f"{statistics.median(row['torch']):6.0f} ({min(row['torch']):.0f}-{max(row['torch']):.0f})"
            ratio = spread([t / r for t, r in zip(row["tf"], row["torch"])])
        else:
            torch_text, ratio = "-", "-"
        print(f"{name:9s}  {tf_text:18s} {torch_text:18s} {ratio}")
    macs = {"teacher": flops.count(teacher).macs, "clone": flops.count(clone).macs}
    macs["distill"] = macs["clone"]  # the student's MACs: the teacher's forward pass is extra work, not counted
    if reference is not None:
        macs["reference"] = flops.count(reference).macs
    print("\nworkload   MACs/image   tf images/s x MACs (GMAC/s, median)")
    for name, row in results.items():
        print(f"{name:9s}  {macs[name] / 1e6:8.2f} M   {statistics.median(row['tf']) * macs[name] / 1e9:8.2f}")
    per_mac = []
    if reference is not None and "teacher" in results:
        per_mac = [t * macs["teacher"] / (r * macs["reference"])
                   for t, r in zip(results["teacher"]["tf"], results["reference"]["tf"])]
        print(f"teacher images/s x MACs over {FLAGS.reference_model}'s, per pair: {spread(per_mac)}")

    profiles = {}
    if FLAGS.profile:
        for name, model in trainers.items():
            if name == "reference":
                continue
            logdir = os.path.join(FLAGS.profile, name)
            tf.profiler.experimental.start(logdir)
            rate = tf_block(model, train, steps)
            tf.profiler.experimental.stop()
            print(f"\nprofile {name} ({rate:.0f} images/s while tracing):")
            by_family, by_op = read_profile(logdir, steps)
            print_profile(by_family, by_op, family_macs(clone if name != "teacher" else teacher), FLAGS.batch_size)
            profiles[name] = {"images_per_second": rate, "ms_per_step": {
                f"{family}/{direction}": ms for (family, direction), ms in sorted(by_family.items())}}
    suffix = "" if (FLAGS.model, FLAGS.width) == ("resnet20", 1.0) else f"_{FLAGS.model}_w{FLAGS.width:g}"
    if not torch_run:  # a TF-only run must not replace a file that holds the PyTorch ratios
        suffix += "_tf_only"
    results_io.write_results("throughput" + suffix + (f"_round{FLAGS.round_to}" if FLAGS.round_to != 1 else ""), {
        "model": FLAGS.model, "width": FLAGS.width, "images": len(arrays), "batch_size": FLAGS.batch_size,
        "pairs": pairs, "steps": steps, "clone_round_to": FLAGS.round_to, "macs_per_image": macs,
        "images_per_second": results, "tf_over_torch": {
            name: [t / r for t, r in zip(row["tf"], row["torch"])] for name, row in results.items() if row["torch"]},
        "reference_model": FLAGS.reference_model, "teacher_per_mac_over_reference": per_mac,
        "profile_ms_per_step": profiles})
    if torch_run:
        handle[1].send(None)
        worker.join(timeout=30)


def main(argv):
    """Everything runs inside the fused-BatchNorm block, as the library's own training does."""
    from mskd_tf import training

    with training.fused_batchnorm():
        return measure(argv)


if __name__ == "__main__":
    app.run(main)
