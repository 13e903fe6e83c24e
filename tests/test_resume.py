"""An interrupted run resumes to the network an uninterrupted run gives, bit for bit (same machine, same threads).

Each resumable loop is stopped at a mid-point, as a session that ends, and rerun; its artifact is compared with
an uninterrupted run's. The data order, augmentation, optimizer state and learning-rate schedule all have to
continue where they stopped for the weights to match exactly.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from mskd_tf import candidate_training, training
from mskd_tf.api import run_pipeline
from mskd_tf.config import Config
from tests.test_pipeline import make_npz


@pytest.fixture
def cfg(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    return Config(dataset=f"npz:{data}", model="small_cnn", width=0.25, teacher_epochs=3, batch_size=32, teacher_lr=0.05,
                  workdir=str(tmp_path / "whole"), val_fraction=0.2, augment=True)


class _Interrupt(keras.callbacks.Callback):
    """Stops the process (as a killed session would) after epoch ``epoch`` ended and its backup was written."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _interrupt_logged_training(monkeypatch, epoch):
    """Every training run that writes logs (teacher, distill) stops after ``epoch``."""
    original = training.standard_callbacks
    monkeypatch.setattr(training, "standard_callbacks", lambda *a, **k: [*original(*a, **k), _Interrupt(epoch)])
    return lambda: monkeypatch.setattr(training, "standard_callbacks", original)


def _record(cfg, name):
    return json.loads(open(f"{cfg.workdir}/{name}").read())


def _weights(path):
    return [np.asarray(w) for w in keras.models.load_model(path).weights]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def test_an_interrupted_teacher_resumes_to_the_uninterrupted_weights(cfg, tmp_path, monkeypatch, capsys):
    run_pipeline(cfg, stop_after="teacher")
    resumed = dataclasses.replace(cfg, workdir=str(tmp_path / "resumed"))
    restore = _interrupt_logged_training(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resumed, stop_after="teacher")
    restore()
    capsys.readouterr()
    run_pipeline(resumed, stop_after="teacher")
    assert "teacher: resuming after epoch 1 of 3" in capsys.readouterr().out
    # The history's last val_loss is a function of the last epoch's weights (teacher.keras holds the best epoch's).
    assert _record(resumed, "teacher.json")["history"] == _record(cfg, "teacher.json")["history"]
    _assert_same_weights(f"{cfg.workdir}/teacher.keras", f"{resumed.workdir}/teacher.keras")


@pytest.mark.parametrize("stop_in", [pytest.param("kd", marks=pytest.mark.slow), "ce"])
def test_an_interrupted_distillation_resumes_to_the_uninterrupted_students(cfg, tmp_path, monkeypatch, capsys,
                                                                           stop_in):
    """Stopped after the first epoch of the KD run, or of the cross-entropy run (the KD run then is kept)."""
    cfg.teacher_epochs, cfg.select_epochs, cfg.student_epochs, cfg.criteria = 1, 0.0, 2.0, ("l1",)
    run_pipeline(cfg, stop_after="distill")
    resumed = dataclasses.replace(cfg, workdir=str(tmp_path / "resumed"))
    run_pipeline(resumed, stop_after="select")
    from mskd_tf import distill

    original, calls = distill.distill, []

    def interrupted(*args, callbacks=(), kd=True, **kwargs):
        calls.append("kd" if kd else "ce")
        if calls[-1] == stop_in:
            callbacks = [*callbacks, _Interrupt(0)]
        return original(*args, callbacks=callbacks, kd=kd, **kwargs)

    monkeypatch.setattr(distill, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resumed, stop_after="distill")
    monkeypatch.setattr(distill, "distill", original)
    capsys.readouterr()
    run_pipeline(resumed, stop_after="distill")
    out = capsys.readouterr().out
    assert f"distill: resuming the {stop_in} run after epoch 1" in out
    assert ("distill: the kd run finished before the interruption; kept" in out) == (stop_in == "ce")
    whole, again = _record(cfg, "distill.json"), _record(resumed, "distill.json")
    for run in ("kd", "ce"):
        assert again["runs"][run]["history"] == whole["runs"][run]["history"]
        assert again["runs"][run]["test_acc"] == whole["runs"][run]["test_acc"]
    assert again["shipped"] == whole["shipped"]
    _assert_same_weights(f"{cfg.workdir}/student.keras", f"{resumed.workdir}/student.keras")
    assert not (tmp_path / "resumed" / "distill_backup").exists()


# Runs the pipeline from a Config's fields (argv[1], JSON) up to distill; with argv[2] == "kill", the process dies
# without any cleanup right after the first epoch of a logged run has ended and been backed up.
_PIPELINE_IN_A_PROCESS = """
import json, os, sys
import keras
from mskd_tf import training
from mskd_tf.api import run_pipeline
from mskd_tf.config import Config

class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        os._exit(137)

if sys.argv[2] == "kill":
    original = training.standard_callbacks
    training.standard_callbacks = lambda *a, **k: [*original(*a, **k), Kill()]
run_pipeline(Config(**json.loads(sys.argv[1])), stop_after="distill")
"""


@pytest.mark.slow
def test_a_killed_process_resumes_in_a_new_one_to_the_uninterrupted_student(cfg, tmp_path):
    """A session's end kills the process; the next session resumes in a fresh one, whose TF op seeds, Keras seed
    generator and tf.data state start anew: it must still reach the weights of the uninterrupted run."""
    cfg.teacher_epochs, cfg.select_epochs, cfg.student_epochs, cfg.criteria = 1, 0.0, 2.0, ("l1",)
    cfg.distill_baseline = False
    run_pipeline(cfg, stop_after="distill")
    resumed = dataclasses.replace(cfg, workdir=str(tmp_path / "resumed"))
    run_pipeline(resumed, stop_after="select")  # the teacher's run is logged too: not killed in there
    fields = json.dumps(resumed.to_dict())
    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", _PIPELINE_IN_A_PROCESS, fields, "kill"], cwd=repo,
                            capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "student.keras").exists()
    again = subprocess.run([sys.executable, "-c", _PIPELINE_IN_A_PROCESS, fields, "resume"], cwd=repo,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "distill: resuming the kd run after epoch 1" in again.stdout
    assert _record(resumed, "distill.json")["runs"]["kd"]["history"] == _record(cfg, "distill.json")["runs"]["kd"][
        "history"]
    _assert_same_weights(f"{cfg.workdir}/student.keras", f"{resumed.workdir}/student.keras")


def test_an_interrupted_selection_resumes_to_the_uninterrupted_choice(cfg, tmp_path, monkeypatch):
    """Stopped mid-way through the fine-tunes (the third training chunk of the run): every candidate's curve and
    the selected network come out as in an uninterrupted run."""

    cfg.teacher_epochs, cfg.select_epochs, cfg.criteria = 1, 2.0, ("l1", "random")
    run_pipeline(cfg, stop_after="select")
    resumed = dataclasses.replace(cfg, workdir=str(tmp_path / "resumed"))
    original, calls = candidate_training.Finetuner.train, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(candidate_training.Finetuner, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resumed, stop_after="select")
    monkeypatch.setattr(candidate_training.Finetuner, "train", original)
    run_pipeline(resumed, stop_after="select")

    def trained(config):
        return [(c["criterion"], c.get("steps"), c["curve"], c.get("weights"))
                for c in _record(config, "selection.json")["candidates"]]

    assert any(steps for _, steps, _, _ in trained(cfg)), "nothing was fine-tuned: the comparison would be empty"
    assert trained(resumed) == trained(cfg)
    _assert_same_weights(f"{cfg.workdir}/selected.keras", f"{resumed.workdir}/selected.keras")


def test_a_resumed_run_refuses_other_images_under_the_same_data_flags(cfg, tmp_path, capsys):
    """Data can change under the same flags (a partly extracted archive, edited files) and a resumed run would train
    on it silently: the work dir records what its stages were computed on, and the same flags reading other images
    stop the run before anything trains; other data flags are new data on purpose, recorded anew."""
    from mskd_tf.errors import MskdError

    cfg.teacher_epochs = 1
    run_pipeline(cfg, stop_after="teacher")
    recorded = json.loads(open(f"{cfg.workdir}/data.json").read())
    assert recorded["counts"] == {"train": 192, "val": 48, "test": 60}
    teacher = open(f"{cfg.workdir}/teacher.keras", "rb").read()

    run_pipeline(cfg, stop_after="rank")  # the same images: the teacher is reused
    assert "[teacher] done already" in capsys.readouterr().out

    make_npz(cfg.dataset.removeprefix("npz:"), n_train=220)  # the same file name, 20 images fewer
    with pytest.raises(MskdError, match=r"--dataset=npz:.*toy.npz: reads other images than this work dir's stages "
                                        r"were computed on \(176 train / 44 val / 60 test images now, 192 train / 48 "
                                        r"val / 60 test then"):
        run_pipeline(cfg)
    assert open(f"{cfg.workdir}/teacher.keras", "rb").read() == teacher  # nothing lost
    assert json.loads(open(f"{cfg.workdir}/data.json").read()) == recorded

    cfg.val_fraction = 0.25  # other flags: other data on purpose, the stages' digests decide what reruns
    run_pipeline(cfg, stop_after="teacher")
    assert json.loads(open(f"{cfg.workdir}/data.json").read())["counts"] == {"train": 165, "val": 55, "test": 60}
