"""The whole pipeline: compress() end to end, resume after SIGKILL, damaged artifacts."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import mskd_tf
from mskd_tf.errors import MskdError
from test_pipeline import make_npz

REPO = Path(__file__).resolve().parents[1]


def toy_teacher(shape=(12, 12, 1), classes=3):
    keras.utils.set_random_seed(0)
    from mskd_tf import models

    return models.build("small_cnn", shape, classes, width=0.25)


def toy_arrays(tmp_path):
    with np.load(make_npz(tmp_path / "toy.npz")) as z:
        return (z["x_train"] / 255.0, z["y_train"]), (z["x_test"] / 255.0, z["y_test"])


def test_compress_end_to_end_and_resume(tmp_path, capsys):
    (x, y), (xt, yt) = toy_arrays(tmp_path)
    teacher = toy_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    teacher.fit(x, y, epochs=3, batch_size=32, verbose=0)
    result = mskd_tf.compress(
        teacher, (x, y), test=(xt, yt), criteria=("l1", "taylor", "random"), target_macs=0.5,
        select_epochs=0.5, criteria_batches=2,
        student_epochs=1, distill_baseline=True, export=("float32",),
        workdir=str(tmp_path / "wd"), seed=0,
    )
    names = [f"{c}-{a}" for a in ("global", "uniform") for c in ("l1", "taylor", "random")]
    assert result.candidate in names and [c["criterion"] for c in result.candidates] == names
    for row in result.candidates:
        assert 0.4 <= row["macs_ratio"] <= 0.6 and row["params"] < result.teacher["params"]
    assert result.student is not None and result.student_metrics["macs"] < result.teacher["macs"]
    assert 0 <= result.student_metrics["test_acc"] <= 1 and set(result.student_metrics["runs"]) == {"kd", "ce"}
    (export,) = result.exports
    assert export["kind"] == "float32" and Path(export["path"]).stat().st_size == export["bytes"]
    assert export["agreement"] > 0.99  # float32 TFLite == Keras
    report = json.loads((tmp_path / "wd" / "report.json").read_text())
    assert report["selected"]["criterion"] == result.candidate and set(report["timings"]) >= {"teacher", "export"}
    assert (tmp_path / "wd" / "plot_accuracy_vs_macs.png").stat().st_size > 1000
    assert "student (KD)" in result.summary()
    from mskd_tf import training

    assert keras.layers.BatchNormalization.call is training._ORIGINAL_BN_CALL  # Keras' own again after compress()

    capsys.readouterr()
    again = mskd_tf.compress(
        teacher, (x, y), test=(xt, yt), criteria=("l1", "taylor", "random"), target_macs=0.5,
        select_epochs=0.5, criteria_batches=2,
        student_epochs=1, distill_baseline=True, export=("float32",),
        workdir=str(tmp_path / "wd"), seed=0,
    )
    out = capsys.readouterr().out
    # Nothing changed: every stage, the report included, is reused.
    assert out.count("done already") == 7 and again.candidate == result.candidate


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train": "images.npy"}, "train: expected a tf.data.Dataset or an \\(x, y\\) tuple"),
        ({"target_macs": 2.0}, "target_macs=2.0: is a fraction"),
        ({"criteria": ("l1", "vibes")}, "criteria=.*unknown \\['vibes'\\]"),
        ({"selection": {"epochs_please": 3}}, "selection: epochs_please: not a setting"),
        ({"epochs_please": 3}, "^epochs_please: not a setting"),
        ({"export": ("int4",)}, "export=.*unknown \\['int4'\\]"),
        ({"model": "resnet20"}, "model: expected a keras.Model, got str"),
    ],
)
def test_compress_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"model": toy_teacher(), "train": (np.zeros((8, 12, 12, 1)), np.zeros(8)), "workdir": str(tmp_path)}
    args.update(kwargs)
    model, train = args.pop("model"), args.pop("train")
    with pytest.raises(MskdError, match=message):
        mskd_tf.compress(model, train, **args)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli_args(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    return [sys.executable, "-m", "mskd_tf.run", f"--dataset=npz:{data}", "--model=small_cnn", "--width=0.25",
            "--teacher_epochs=2", "--batch_size=32", f"--workdir={tmp_path / 'wd'}", "--criteria=l1,fpgm,taylor",
            "--criteria_batches=2", "--select_epochs=0.5", "--student_epochs=2", "--export=float32",
            "--nomicro"]


def _run_until(args, marker, timeout=600):
    """Start the CLI, SIGKILL it as soon as ``marker`` appears on its stdout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])


@pytest.mark.slow
@pytest.mark.parametrize("stage, finished", [("candidates", ["teacher.keras", "rankings.json"]),
                                             ("distill", ["teacher.keras", "rankings.json", "selected.keras",
                                                          "candidates/l1-global.keras"])])
def test_sigkill_loses_only_the_stage_in_progress(tmp_path, stage, finished):
    args = _cli_args(tmp_path)
    _run_until(args, f"==== [{stage}] running")
    wd = tmp_path / "wd"
    before = {name: _sha(wd / name) for name in finished}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in finished:
        assert _sha(wd / name) == before[name], f"{name} was redone after the kill"
    assert f"==== [{stage}] running (not run yet)" in proc.stdout
    assert (wd / "report.json").exists()


def test_compress_uses_the_fused_batchnorm_only_while_it_runs_even_when_it_fails(tmp_path, monkeypatch):
    from mskd_tf import stages, training

    (x, y), _ = toy_arrays(tmp_path)
    seen = []

    def failing_rank(ctx):
        seen.append(keras.layers.BatchNormalization.call is training._batchnorm_call)
        raise MskdError("stopped in rank")

    monkeypatch.setattr(stages, "PIPELINE", tuple(
        dataclasses.replace(stage, run=failing_rank) if stage.name == "rank" else stage for stage in stages.PIPELINE))
    with pytest.raises(MskdError, match="stopped in rank"):
        mskd_tf.compress(toy_teacher(), (x, y), workdir=str(tmp_path / "wd"), export=("float32",))
    assert seen == [True] and keras.layers.BatchNormalization.call is training._ORIGINAL_BN_CALL


# ----------------------------------------------------------------------------- never ship a worse network


def _trained_toy_teacher(x, y, epochs=3):
    teacher = toy_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    teacher.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return teacher


def _check_shipped_is_the_better_run(result, val, test):
    """The cross-entropy run ships when it is better on validation beyond noise (paired sign test on the
    validation images), else the KD run; every top-level figure is measured on the shipped network."""
    from mskd_tf.distill import KD_CE_SIGNIFICANCE

    m = result.student_metrics
    kd, ce, paired = m["runs"]["kd"], m["runs"]["ce"], m["kd_vs_ce"]
    assert paired["kd_only"] - paired["ce_only"] == round((kd["val_acc"] - ce["val_acc"]) * len(val[1]))
    clearly_ce = ce["val_acc"] > kd["val_acc"] and paired["p_value"] < KD_CE_SIGNIFICANCE
    assert m["shipped"] == ("ce" if clearly_ce else "kd")
    assert paired["verdict"] == ("ce better" if clearly_ce else "within noise" if paired["p_value"] >= KD_CE_SIGNIFICANCE
                                 else "kd better")
    assert (m["val_acc"], m["test_acc"]) == (m["runs"][m["shipped"]]["val_acc"], m["runs"][m["shipped"]]["test_acc"])
    shipped = keras.models.load_model(Path(result.workdir) / "student.keras")
    for (x, y), reported in ((val, m["val_acc"]), (test, m["test_acc"])):
        for model in (shipped, result.student):
            predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
            assert float(np.mean(predicted == y)) == pytest.approx(reported, abs=1e-9)
    assert m["budget_steps"] == m["selection_steps"] + m["distill_steps"]


def test_stale_batchnorm_teacher_is_repaired_and_the_student_never_worse_than_ce(tmp_path):
    """A teacher whose BN moving statistics lag its weights (few steps per epoch) is recalibrated before
    anything is distilled from it, and the shipped student is the better of KD and plain CE on validation."""
    (x, y), (xt, yt) = toy_arrays(tmp_path)
    teacher = _trained_toy_teacher(x, y)
    for layer in teacher.layers:  # stale statistics: what ~10 steps of momentum 0.99 leave behind
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, np.float32))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.05, np.float32))
    stale_weights = [w.copy() for w in teacher.get_weights()]
    val = (x[:48], y[:48])
    result = mskd_tf.compress(
        teacher, (x[48:], y[48:]), val, test=(xt, yt), criteria=("l1", "random"), target_macs=0.5,
        select_epochs=0.5, criteria_batches=2, student_epochs=1.5,
        export=("float32",), workdir=str(tmp_path / "wd"), seed=0,
    )
    repair = result.teacher["batchnorm_repair"]
    assert repair["applied"] and repair["val_acc_recalibrated"] > repair["val_acc_before"] + 0.005
    assert result.teacher["val_acc"] == repair["val_acc_recalibrated"]
    for mine, theirs in zip(teacher.get_weights(), stale_weights):  # the caller's model is left alone
        np.testing.assert_array_equal(mine, theirs)
    _check_shipped_is_the_better_run(result, val, (xt, yt))


@pytest.mark.slow  # one more pipeline run (~40 s)
def test_a_misleading_teacher_loses_to_cross_entropy_and_is_not_shipped(tmp_path):
    """A teacher that is confidently wrong (its classes rotated) is worse than its own pruned candidates after
    fine-tuning: distilling from it is flagged and the cross-entropy student ships."""
    (x, y), (xt, yt) = toy_arrays(tmp_path)
    teacher = _trained_toy_teacher(x, y, epochs=15)
    head = teacher.layers[-1]
    kernel, bias = head.get_weights()
    head.set_weights([np.roll(kernel, 1, axis=-1), np.roll(bias, 1)])  # class c now scores as c + 1
    val = (x[:48], y[:48])
    result = mskd_tf.compress(
        teacher, (x[48:], y[48:]), val, test=(xt, yt), criteria=("l1", "random"), target_macs=0.5,
        select_epochs=0.5, criteria_batches=2, select_loss="ce", batch_size=16, finetune_lr=0.05,
        student_epochs=4, export=("float32",), workdir=str(tmp_path / "wd"), seed=0,
    )
    m = result.student_metrics
    assert m["shipped"] == "ce" and m["runs"]["ce"]["val_acc"] > m["runs"]["kd"]["val_acc"]
    assert any("better than the teacher" in w for w in m["warnings"])
    _check_shipped_is_the_better_run(result, val, (xt, yt))
