"""Distiller and the distill stage: loss values vs numpy, equivalences, callbacks, strategies."""

import gzip
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mskd_tf.distill import Distiller, default_feature_pairs, distill, stage_ends
from mskd_tf.errors import MskdError

CLASSES = 5


def tiny_cnn(width, name, *, head="logits", batchnorm=False, seed=0, size=16, channels=3, classes=CLASSES):
    """Two stages (full and half resolution); head is 'logits', 'dense_softmax' or 'softmax_layer'."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(width, 3, padding="same", name="conv1")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="stage1")(x)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.ReLU(name="stage2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    activation = "softmax" if head == "dense_softmax" else None
    outputs = keras.layers.Dense(classes, activation=activation, name="fc")(x)
    if head == "softmax_layer":
        outputs = keras.layers.Softmax(name="probs")(outputs)
    return keras.Model(inputs, outputs, name=name)


def synthetic(n=64, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)).astype("float32"), rng.integers(0, CLASSES, n).astype("int32")


def batches(x, y, batch=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_losses(t_logits, s_logits, labels, temperature, alpha):
    """Numpy CE, T^2 * KL(softmax(t/T) || softmax(s/T)) and their mix, each a batch mean."""
    ce = -log_softmax(s_logits)[np.arange(len(labels)), labels].mean()
    log_pt, log_ps = log_softmax(t_logits / temperature), log_softmax(s_logits / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    return ce, kl, alpha * ce + (1 - alpha) * kl


def logits_of(model, x):
    """Pre-softmax outputs of our tiny_cnn variants, computed independently of the Distiller."""
    features = keras.Model(model.input, model.get_layer("pool").output)(x, training=False)
    kernel, bias = model.get_layer("fc").get_weights()
    return np.asarray(features) @ kernel + bias


@pytest.mark.parametrize("student_head", ["logits", "dense_softmax", "softmax_layer"])
def test_logged_losses_match_numpy_reference(student_head):
    x, y = synthetic(48)
    teacher = tiny_cnn(8, "teacher", head="dense_softmax", seed=1)
    student = tiny_cnn(4, "student", head=student_head, seed=2)
    distiller = Distiller(teacher, student)
    distiller.compile("sgd", temperature=3.0, alpha=0.3)
    logged = distiller.evaluate(batches(x, y), return_dict=True, verbose=0)
    ce, kl, total = reference_losses(logits_of(teacher, x), logits_of(student, x), y, 3.0, 0.3)
    assert logged["student_loss"] == pytest.approx(ce, rel=1e-5)
    assert logged["distillation_loss"] == pytest.approx(kl, rel=1e-4)
    assert logged["loss"] == pytest.approx(total, rel=1e-5)
    assert set(logged) == {"loss", "student_loss", "distillation_loss", "accuracy"}


def test_probability_outputs_without_a_visible_softmax_use_log_probabilities():
    x, y = synthetic(32)
    teacher = tiny_cnn(8, "teacher", seed=1)
    inner = tiny_cnn(4, "inner", seed=2)
    probs = keras.layers.Lambda(lambda z: keras.ops.softmax(z), name="opaque_softmax")(inner.output)
    student = keras.Model(inner.input, probs, name="student")
    distiller = Distiller(teacher, student, output_kind=("auto", "probabilities"))
    distiller.compile("sgd", temperature=4.0, alpha=0.5)
    logged = distiller.evaluate(batches(x, y), return_dict=True, verbose=0)
    _, kl, _ = reference_losses(logits_of(teacher, x), logits_of(inner, x), y, 4.0, 0.5)
    assert logged["distillation_loss"] == pytest.approx(kl, rel=1e-3)


def test_alpha_one_equals_plain_cross_entropy_fit():
    x, y = synthetic(64)
    teacher = tiny_cnn(8, "teacher", seed=1)
    plain = tiny_cnn(4, "plain", batchnorm=True, seed=2)
    student = tiny_cnn(4, "student", batchnorm=True, seed=2)
    plain.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain.fit(batches(x, y), epochs=1, verbose=0, shuffle=False)
    distiller = Distiller(teacher, student)
    distiller.compile(keras.optimizers.SGD(0.1, momentum=0.9), alpha=1.0)
    distiller.fit(batches(x, y), epochs=1, verbose=0, shuffle=False)
    before = tiny_cnn(4, "fresh", batchnorm=True, seed=2).get_weights()
    for trained, reference, initial in zip(student.get_weights(), plain.get_weights(), before):
        np.testing.assert_allclose(trained, reference, atol=1e-6)
        assert not np.array_equal(trained, initial)  # the step really moved (incl. BN moving stats)


def test_teacher_is_frozen_and_only_student_learns():
    x, y = synthetic(64)
    teacher = tiny_cnn(8, "teacher", batchnorm=True, seed=1)
    student = tiny_cnn(4, "student", seed=2)
    teacher_before, student_before = teacher.get_weights(), student.get_weights()
    distiller = Distiller(teacher, student)
    distiller.compile(keras.optimizers.SGD(0.1), alpha=0.0)
    distiller.fit(batches(x, y), epochs=2, shuffle=False, verbose=0)
    for after, before in zip(teacher.get_weights(), teacher_before):  # incl. BN moving statistics
        np.testing.assert_array_equal(after, before)
    assert all(not np.array_equal(a, b) for a, b in zip(student.get_weights(), student_before))
    assert {id(v) for v in distiller.trainable_weights} == {id(v) for v in student.trainable_weights}


def test_stage_ends_and_default_pairs():
    teacher, student = tiny_cnn(8, "teacher"), tiny_cnn(4, "student")
    assert stage_ends(teacher) == ["stage1", "stage2"]
    assert default_feature_pairs(teacher, student) == [("stage1", "stage1"), ("stage2", "stage2")]
    renamed = keras.Model(student.input, student.output, name="renamed")
    for layer, new in zip(renamed.layers[1:], ["a", "b", "c", "d", "e", "f"]):
        layer.name = new  # no shared names: pairs fall back to stage order
    assert default_feature_pairs(teacher, renamed) == [("stage1", "b"), ("stage2", "d")]


def test_feature_loss_matches_numpy_with_projections():
    x, y = synthetic(32)
    teacher, student = tiny_cnn(8, "teacher", seed=1), tiny_cnn(4, "student", seed=2)
    distiller = Distiller(teacher, student, feature_pairs="auto")
    assert [tuple(p.kernel.shape) for p in distiller.projections] == [(1, 1, 4, 8), (1, 1, 8, 16)]
    distiller.compile("sgd", alpha=0.5, feature_kd=2.0)
    logged = distiller.evaluate(batches(x, y, 32), return_dict=True, verbose=0)
    hints = []
    for name, projection in zip(["stage1", "stage2"], distiller.projections):
        t = np.asarray(keras.Model(teacher.input, teacher.get_layer(name).output)(x))
        s = np.asarray(keras.Model(student.input, student.get_layer(name).output)(x))
        hints.append(((t - s @ np.asarray(projection.kernel)[0, 0]) ** 2).mean())
    _, _, mix = reference_losses(logits_of(teacher, x), logits_of(student, x), y, 4.0, 0.5)
    assert logged["feature_loss"] == pytest.approx(np.mean(hints), rel=1e-5)
    assert logged["loss"] == pytest.approx(mix + 2.0 * np.mean(hints), rel=1e-5)


def test_identical_student_has_zero_kd_and_feature_loss():
    x, y = synthetic(32)
    teacher, student = tiny_cnn(8, "teacher", seed=1), tiny_cnn(8, "student", seed=1)
    distiller = Distiller(teacher, student, feature_pairs="auto")
    assert distiller.projections == [None, None]  # same width: no projection
    distiller.compile("sgd", feature_kd=1.0)
    logged = distiller.evaluate(batches(x, y), return_dict=True, verbose=0)
    assert logged["distillation_loss"] == pytest.approx(0.0, abs=1e-6)
    assert logged["feature_loss"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "compile_args, message",
    [
        ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
        ({"temperature": 0}, "temperature=0 must be a positive number"),
        ({"feature_kd": -1.0}, "feature_kd=-1.0 must be >= 0"),
        ({"feature_kd": 1.0}, "feature_kd > 0 needs feature pairs"),
    ],
)
def test_compile_rejects_bad_arguments(compile_args, message):
    distiller = Distiller(tiny_cnn(8, "teacher"), tiny_cnn(4, "student"))
    with pytest.raises(MskdError, match=message):
        distiller.compile("sgd", **compile_args)


def test_constructor_rejects_mismatched_models():
    with pytest.raises(MskdError, match="predicts 5 classes but student 'student' predicts 3"):
        Distiller(tiny_cnn(8, "teacher"), tiny_cnn(4, "student", classes=3))
    with pytest.raises(MskdError, match="'nope' is not a layer of the student"):
        Distiller(tiny_cnn(8, "teacher"), tiny_cnn(4, "student"), feature_pairs=[("stage1", "nope")])
    with pytest.raises(MskdError, match="output_kind='logits' but the teacher's last layer 'fc' applies softmax"):
        Distiller(tiny_cnn(8, "teacher", head="dense_softmax"), tiny_cnn(4, "student"), output_kind="logits")
    with pytest.raises(MskdError, match="output_kind='raw' is unknown"):
        Distiller(tiny_cnn(8, "teacher"), tiny_cnn(4, "student"), output_kind="raw")


def test_kd_per_example_matches_logits_distillation():
    from mskd_tf.distill import kd_per_example

    teacher, student = np.array([[2.0, 0.0, -1.0]], np.float32), np.array([[0.0, 1.0, 0.0]], np.float32)
    value = float(kd_per_example(teacher, student, 4.0)[0])
    assert value == pytest.approx(1.088, abs=1e-3)  # the worked example in docs/selection_and_distillation.md
    reference = keras.distillation.LogitsDistillation(4.0, loss=keras.losses.KLDivergence())
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(16, 10)).astype(np.float32), rng.normal(size=(16, 10)).astype(np.float32)
    assert float(np.mean(kd_per_example(t, s, 4.0))) == pytest.approx(float(reference.compute_loss(t, s)), rel=1e-5)


def test_fractional_budget_trains_exactly_that_many_steps():
    x, y = synthetic(64)  # 4 batches of 16
    teacher, student = tiny_cnn(8, "teacher"), tiny_cnn(4, "student")
    _, history = distill(teacher, student, batches(x, y), None, epochs=1.5, verbose=0)
    assert len(history["loss"]) == 2  # a whole epoch, then half of one
    counted = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: counted.append(batch))
    distill(teacher, tiny_cnn(4, "student"), batches(x, y), None, epochs=9, steps=5, kd=False, verbose=0,
            callbacks=[counter])
    assert len(counted) == 5


def test_distill_leaves_the_callers_teacher_trainable_even_on_error():
    x, y = synthetic(32)
    teacher = tiny_cnn(8, "teacher")
    before = [w.copy() for w in teacher.get_weights()]
    distill(teacher, tiny_cnn(4, "student"), batches(x, y), None, epochs=1, verbose=0)
    assert teacher.trainable
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)  # frozen while it taught
    with pytest.raises(MskdError, match="training loss became"):
        distill(teacher, tiny_cnn(4, "student"), batches(x, y), None, epochs=1, lr=1e30, verbose=0)
    assert teacher.trainable


def test_distill_is_reproducible_and_leaves_the_callers_random_state_alone():
    import random

    x, y = synthetic(32)
    teacher = tiny_cnn(8, "teacher")
    # Feature hints build projection layers: initialisers draw from the global generators.
    runs = [distill(teacher, tiny_cnn(4, "student"), batches(x, y), None, epochs=1, feature_kd=0.5, seed=3,
                    verbose=0)[1]["loss"] for _ in range(2)]
    assert runs[0] == runs[1]
    student = tiny_cnn(4, "student")  # tiny_cnn reseeds: build it first
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    distill(teacher, student, batches(x, y), None, epochs=1, seed=3, verbose=0)
    assert (random.random(), np.random.random()) == expected  # the caller's streams continue untouched


def test_distill_rejects_bad_inputs():
    x, y = synthetic(32)
    teacher, student = tiny_cnn(8, "teacher"), tiny_cnn(4, "student")
    with pytest.raises(MskdError, match=r"epochs=0 must be a positive number \(--student_epochs\)"):
        distill(teacher, student, batches(x, y), None, epochs=0)
    with pytest.raises(MskdError, match="steps=0 must be a positive integer"):
        distill(teacher, student, batches(x, y), None, epochs=1, steps=0)
    with pytest.raises(MskdError, match="train_ds is infinite"):
        distill(teacher, student, batches(x, y).repeat(), None, epochs=1)
    kernel, bias = teacher.get_layer("fc").get_weights()
    teacher.get_layer("fc").set_weights([np.full_like(kernel, np.nan), bias])  # a broken teacher
    with pytest.raises(MskdError, match="distill: the training loss became nan"):
        distill(teacher, student, batches(x, y), None, epochs=1, verbose=0)


def test_distill_with_callbacks_saves_a_plain_student(tmp_path):
    x, y = synthetic(64)
    teacher, student = tiny_cnn(8, "teacher"), tiny_cnn(4, "student", batchnorm=True)
    checkpoint = str(tmp_path / "best.keras")
    callbacks = [
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_accuracy", mode="max", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9),  # stops after epoch 2
        keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=False),
    ]
    trained, history = distill(
        teacher, student, batches(x, y), batches(x[:32], y[:32]), epochs=5, feature_kd=0.5, callbacks=callbacks,
        verbose=0,
    )
    assert len(history["loss"]) == 2
    for key in ("loss", "student_loss", "distillation_loss", "feature_loss", "accuracy", "val_accuracy"):
        assert len(history[key]) == 2 and all(math.isfinite(v) for v in history[key])
    path = str(tmp_path / "student.keras")
    trained.save(path)
    for saved in (path, checkpoint):
        loaded = keras.saving.load_model(saved)  # no custom_objects: a plain functional student
        assert loaded.name == "student" and len(loaded.layers) == len(trained.layers)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0), trained.predict(x, verbose=0),
                               atol=1e-6)


def test_baseline_without_kd_uses_the_same_budget():
    x, y = synthetic(64)
    _, kd_history = distill(tiny_cnn(8, "t"), tiny_cnn(4, "s"), batches(x, y), None, epochs=2, verbose=0)
    _, ce_history = distill(tiny_cnn(8, "t"), tiny_cnn(4, "s"), batches(x, y), None, epochs=2, kd=False, verbose=0)
    assert len(kd_history["loss"]) == len(ce_history["loss"]) == 2
    assert "distillation_loss" in kd_history and "distillation_loss" not in ce_history


MIRRORED_SCRIPT = """
import numpy as np, keras, tensorflow as tf
from mskd_tf.distribute import make_strategy
mirrored = make_strategy("mirrored", num_replicas=2)  # before any TF op
import sys; sys.path.insert(0, {tests!r})
from test_distill import tiny_cnn, synthetic, batches
from mskd_tf.distill import distill
x, y = synthetic(64)
teacher = tiny_cnn(8, "teacher", batchnorm=True, seed=1)  # inference-mode BN: exact across replicas
student = tiny_cnn(4, "student", seed=2)  # training-mode BN would use per-replica batch statistics
runs = {{}}
for name, strategy in (("mirrored", mirrored), ("one_device", make_strategy("one_device"))):
    trained, history = distill(teacher, student, batches(x, y, 32), batches(x, y, 32), epochs=2, lr=0.1,
                               strategy=strategy, feature_kd=0.5, verbose=0)
    runs[name] = (trained.get_weights(), history)
print("REPLICAS", mirrored.num_replicas_in_sync)
diff = max(float(np.abs(a - b).max()) for a, b in zip(runs["mirrored"][0], runs["one_device"][0]))
print("WEIGHT_DIFF", diff)
for key in ("loss", "student_loss", "distillation_loss", "feature_loss", "val_loss"):
    print("LOGGED", key, runs["mirrored"][1][key], runs["one_device"][1][key])
"""


@pytest.mark.slow  # a fresh TF runtime in a subprocess: ~20 s on this machine
def test_mirrored_two_replicas_matches_one_device():
    script = MIRRORED_SCRIPT.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "REPLICAS 2" in lines
    diff = float(next(line for line in lines if line.startswith("WEIGHT_DIFF")).split()[1])
    assert diff < 1e-5
    logged = [line for line in lines if line.startswith("LOGGED")]
    assert len(logged) == 5
    for line in logged:
        values = [float(v) for v in line.replace("[", " ").replace("]", " ").replace(",", " ").split()[2:]]
        mirrored, single = values[: len(values) // 2], values[len(values) // 2 :]
        np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-6, err_msg=line)


FASHION = "/usr/share/datasets/fashion-mnist"


def read_idx(name):
    with gzip.open(os.path.join(FASHION, name)) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_cnn(width, name, seed):
    """Conv-pool x2 + flatten: keeps spatial detail that global pooling would lose at this depth."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for stage, filters in enumerate((width, 2 * width), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{stage}")(x)  # short runs
        x = keras.layers.ReLU(name=f"stage{stage}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{stage}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(x), name=name)


@pytest.mark.slow  # ~2 min: a teacher on 12k images, then 3 seeds x (KD, CE) students
@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not on this machine")
def test_kd_beats_plain_fine_tuning_on_fashion_mnist():
    images = read_idx("train-images-idx3-ubyte.gz")[:12000, :, :, None].astype("float32") / 255.0
    labels = read_idx("train-labels-idx1-ubyte.gz")[:12000].astype("int32")
    test_x = read_idx("t10k-images-idx3-ubyte.gz")[:2000, :, :, None].astype("float32") / 255.0
    test_y = read_idx("t10k-labels-idx1-ubyte.gz")[:2000].astype("int32")

    teacher = fashion_cnn(32, "teacher", seed=0)
    teacher.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    teacher.fit(images, labels, batch_size=64, epochs=3, verbose=0)
    teacher_accuracy = teacher.evaluate(test_x, test_y, verbose=0)[1]

    # The student sees a small subset: where labels are scarce, the teacher's soft targets matter most.
    train = batches(images[:600], labels[:600], 32)
    accuracy = {True: [], False: []}
    for seed in (3, 4, 5):
        for kd in (True, False):
            trained, _ = distill(teacher, fashion_cnn(4, "student", seed=seed), train, None, epochs=15, kd=kd,
                                 lr=0.05, seed=seed, verbose=0)
            trained.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            accuracy[kd].append(trained.evaluate(test_x, test_y, verbose=0)[1])
    print("teacher", teacher_accuracy, "kd", accuracy[True], "ce", accuracy[False])
    assert teacher_accuracy > 0.8
    # Measured: teacher 0.861; KD 0.814/0.819/0.820 vs CE 0.813/0.793/0.785 (mean +2.1 points).
    assert np.mean(accuracy[True]) > np.mean(accuracy[False]) + 0.005


def test_the_paired_sign_test_counts_only_the_images_the_runs_disagree_on():
    from mskd_tf.distill import paired_sign_test

    agree = np.ones(1000, bool)  # images both get right (or both wrong) say nothing
    few = paired_sign_test(np.r_[agree, np.ones(7, bool), np.zeros(5, bool)],
                           np.r_[agree, np.zeros(7, bool), np.ones(5, bool)])
    assert (few["kd_only"], few["ce_only"]) == (7, 5)
    assert few["p_value"] == pytest.approx(0.7744, abs=1e-4)  # 2 * P(Binomial(12, 1/2) <= 5)
    many = paired_sign_test(np.r_[np.ones(120, bool), np.zeros(60, bool)], np.r_[np.zeros(120, bool), np.ones(60, bool)])
    assert many["p_value"] < 1e-4
    swapped = paired_sign_test(np.r_[np.zeros(120, bool), np.ones(60, bool)], np.r_[np.ones(120, bool), np.zeros(60, bool)])
    assert swapped["p_value"] == many["p_value"] and (swapped["kd_only"], swapped["ce_only"]) == (60, 120)
    assert paired_sign_test(agree, agree)["p_value"] == 1.0
    with pytest.raises(MskdError, match="scored on the same images"):
        paired_sign_test(np.ones(3, bool), np.ones(4, bool))
