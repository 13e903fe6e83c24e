"""Bad input is caught before any training, the same way by compress() and the CLI (issue 17).

Each case runs through both faces where both apply: the CLI must print one line
``mskd-tf: error: ...`` and exit 2 with no traceback, ``compress()`` must raise MskdError
naming the argument in argument style (``target_macs=``, never ``--target_macs=``). Every case
also checks that nothing trained: no ``Epoch`` line and no ``teacher.keras`` in the workdir.
Then: one run per workdir (the lock), a damaged ``stages.json``, and a fuzz of the data loaders.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import mskd_tf
from mskd_tf import data
from mskd_tf.api import run_pipeline
from mskd_tf.config import Config
from mskd_tf.errors import MskdError
from mskd_tf.workdir import Workdir
from test_cli import _run_cli
from test_pipeline import make_npz

REPO = Path(__file__).resolve().parents[1]
TOY_FLAGS = ["--model=small_cnn", "--width=0.25", "--teacher_epochs=1", "--batch_size=32", "--criteria=l1",
             "--criteria_batches=1"]


def _toy(n=90, size=12, classes=3, seed=0):
    """Learnable toy uint8 images (N, size, size, 1) and int labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    return x, y


def _npz(path, train, test):
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    return path


# ----------------------------------------------------------------------------- the data each case feeds


def _float_labels():
    (x, y), test = _toy(), _toy(30, seed=1)
    y = y.astype(np.float64)
    y[5] = 0.5
    return (x, y), test


def _train_label_gap():
    (x, y), test = _toy(), _toy(30, seed=1)
    y[7] = 7  # classes 0, 1, 2 and one stray 7: must not become an 8-class model
    return (x, y), test


def _test_label_unseen():
    train, (xt, yt) = _toy(), _toy(30, seed=1)
    yt[3] = 5
    return train, (xt, yt)


def _shape_mismatch():
    return _toy(size=16), _toy(30, size=20, seed=1)


def _empty_train():
    return (np.zeros((0, 12, 12, 1), np.uint8), np.zeros(0, np.int64)), _toy(30, seed=1)


def _one_class():
    (x, y), (xt, yt) = _toy(), _toy(30, seed=1)
    return (x, np.zeros_like(y)), (xt, np.zeros_like(yt))


def _tiny_images():
    return _toy(size=2), _toy(30, size=2, seed=1)


def _nan_images():
    (x, y), test = _toy(), _toy(30, seed=1)
    x = x.astype(np.float32) / 255.0
    x[2, 3, 4, 0] = np.nan
    return (x, y), test


def _inf_images():
    (x, y), test = _toy(), _toy(30, seed=1)
    x = x.astype(np.float32) / 255.0
    x[0] = np.inf
    return (x, y), test


# ----------------------------------------------------------------------------- CLI face


def _assert_cli_fails_before_training(proc, message, workdir):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mskd-tf: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Epoch" not in proc.stdout and "==== [teacher] running" not in proc.stdout
    assert not (Path(workdir) / "teacher.keras").exists()


CLI_DATA_CASES = {
    "float_labels": (_float_labels, "dataset npz:.*: train labels must be integer class indices; found 0.5"),
    "train_label_gap": (_train_label_gap, "train labels are 0, 1, 2, 7: label 7 would make a model of 8 classes, 4 of which never occur"),
    "test_label_unseen": (_test_label_unseen, "test label 5 never occurs in the train split"),
    "shape_mismatch": (_shape_mismatch, "test images have shape \\(20, 20, 1\\), but the train images have shape "
                                        "\\(16, 16, 1\\)"),
    "empty_train": (_empty_train, "train split has 0 images and 0 labels"),
    "one_class": (_one_class, "dataset npz:.*: train labels are all 0: a classifier needs at least 2 classes"),
    "images_too_small": (_tiny_images, "--model=small_cnn cannot take the data's 2 x 2 images .*MaxPooling2D.*; it "
                                       "needs images of at least 4 x 4"),
    "nan_images": (_nan_images, "train images hold 1 NaN or infinite values"),
    "inf_images": (_inf_images, "train images hold 144 NaN or infinite values"),
}


@pytest.mark.parametrize("case", sorted(CLI_DATA_CASES))
def test_cli_rejects_bad_data_before_training(tmp_path, case):
    make, message = CLI_DATA_CASES[case]
    path = _npz(tmp_path / "bad.npz", *make())
    workdir = tmp_path / "wd"
    proc = _run_cli(f"--dataset=npz:{path}", *TOY_FLAGS, f"--workdir={workdir}")
    _assert_cli_fails_before_training(proc, message, workdir)


CLI_FLAG_CASES = {
    "micro_without_int8": (["--export=float32", "--micro"], "--micro runs the int8 model in TFLite Micro, but "
                                                            "--export=float32 has no int8: add int8"),
    "protect_unknown": (["--protect=no_such_layer"], "--protect=no_such_layer: 'no_such_layer' is neither .*; "
                                                     "prunable layers: .*conv.* \\(checked on --model=small_cnn\\)"),
    "flagfile_missing": (["--flagfile=/no/such.cfg"], "^mskd-tf: error: cannot open flagfile /no/such.cfg "
                                                      "\\(no such file or directory\\)"),
    "model_unknown": (["--model=resnet7"], "--model=resnet7: unknown model; available models: .*resnet20"),
    "list_flag_echo": (["--criteria=l1,vibes"], "--criteria=l1,vibes: unknown \\['vibes'\\]"),
    "teacher_missing": (["--teacher=/no/such/teacher.keras"], "--teacher=/no/such/teacher.keras: no such file"),
    "budget_used_by_selection": (["--select_epochs=1", "--student_epochs=1.1"],
                                 "--student_epochs=1.1 \\(\\d+ steps .*--select_epochs=1 spends \\d+ of them"),
}


def _file_cases(tmp_path):
    """Files that exist but are not what their flag says: --dataset / --teacher arguments and the message."""
    text = tmp_path / "text.npz"
    text.write_text("hello")
    ragged = tmp_path / "ragged.npz"
    images = np.empty(2, dtype=object)
    images[:] = [np.zeros((4, 4, 1)), np.zeros((3, 3, 1))]
    np.savez(ragged, x_train=images, y_train=np.array([0, 1]), x_test=np.zeros((2, 4, 4, 1)), y_test=np.array([0, 1]))
    truncated = tmp_path / "teacher.keras"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # a zip's first bytes, cut short
    toy = make_npz(tmp_path / "toy.npz", n_train=90, n_test=30)
    return {
        "npz_not_a_zip": ([f"--dataset=npz:{text}"], f"{text} is not an .npz archive"),
        "npz_object_array": ([f"--dataset=npz:{ragged}"], f"{ragged} holds an object array"),
        "teacher_truncated": ([f"--dataset=npz:{toy}", f"--teacher={truncated}"],
                              "the file exists but is not a whole .keras archive"),
    }


@pytest.mark.parametrize("case", ["npz_not_a_zip", "npz_object_array", "teacher_truncated"])
def test_cli_rejects_files_that_are_not_what_their_flag_says(tmp_path, case):
    args, message = _file_cases(tmp_path)[case]
    workdir = tmp_path / "wd"
    proc = _run_cli(*TOY_FLAGS, *args, f"--workdir={workdir}")
    _assert_cli_fails_before_training(proc, re.escape(message), workdir)


@pytest.mark.parametrize("case", sorted(CLI_FLAG_CASES))
def test_cli_rejects_bad_flags_before_training(tmp_path, case):
    args, message = CLI_FLAG_CASES[case]
    path = make_npz(tmp_path / "toy.npz", n_train=90, n_test=30)
    workdir = tmp_path / "wd"
    proc = _run_cli(f"--dataset=npz:{path}", *TOY_FLAGS, *args, f"--workdir={workdir}")
    _assert_cli_fails_before_training(proc, message, workdir)


def test_cli_warns_at_start_when_the_default_micro_kit_cannot_be_made(tmp_path):
    path = make_npz(tmp_path / "toy.npz", n_train=90, n_test=30)
    proc = _run_cli(f"--dataset=npz:{path}", *TOY_FLAGS, "--export=float32", "--model=resnet7",
                    f"--workdir={tmp_path / 'wd'}")
    lines = proc.stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("mskd-tf: warning:"))
    assert "no microcontroller kit will be written" in lines[warning]
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("mskd-tf: error:"))  # at the start


# ----------------------------------------------------------------------------- API face


def _two_input_teacher():
    left, right = keras.Input((12, 12, 1)), keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Concatenate()([left, right]))
    return keras.Model([left, right], keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)), name="two_inputs")


def _teacher(shape=(12, 12, 1), classes=3):
    keras.utils.set_random_seed(0)
    from mskd_tf import models

    return models.build("small_cnn", shape, classes, width=0.25)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))


def _scaled(split):
    x, y = split
    return x.astype(np.float32) / 255.0, y


API_CASES = {
    "float_labels": (lambda: {"train": _scaled(_float_labels()[0])}, "train labels must be integer class indices; "
                                                                     "found 0.5"),
    "label_beyond_outputs": (lambda: {"train": (_scaled(_toy())[0], np.where(np.arange(90) == 4, 9, _toy()[1]))},
                             "train label 9 is outside \\[0, 3\\) \\(the model has 3 outputs\\)"),
    "test_label_beyond_outputs": (lambda: {"test": (_scaled(_toy(30))[0], np.full(30, 3))},
                                  "test label 3 is outside \\[0, 3\\)"),
    "shape_vs_model": (lambda: {"train": _scaled(_toy(size=20))},
                       "train images have shape \\(20, 20, 1\\), but the model takes inputs of shape \\(12, 12, 1\\)"),
    "test_shape_vs_train": (lambda: {"test": _scaled(_toy(30, size=20))},
                            "test images have shape \\(20, 20, 1\\), but the train images have shape \\(12, 12, 1\\)"),
    "empty_train": (lambda: {"train": (np.zeros((0, 12, 12, 1), np.float32), np.zeros(0))},
                    "train split has 0 images and 0 labels"),
    "nan_images": (lambda: {"train": _nan_images()[0]}, "train images hold 1 NaN or infinite values"),
    "all_nan_images": (lambda: {"train": (np.full((90, 12, 12, 1), np.nan, np.float32), _toy()[1])},
                       "train images hold 12960 NaN or infinite values"),
    "dataset_one_hot_labels": (
        lambda: {"train": __import__("tensorflow").data.Dataset.from_tensor_slices(
            (_scaled(_toy())[0], np.eye(3)[_toy()[1]])).batch(16), "val": _scaled(_toy(30))},
        "train labels have shape \\(16, 3\\); expected one integer class index per image"),
    "dataset_unbatched": (
        lambda: {"train": __import__("tensorflow").data.Dataset.from_tensor_slices(_scaled(_toy())),
                 "val": _scaled(_toy(30))},
        "^train: the dataset yields single examples, not batches"),
    "subclassed_model": (lambda: {"model": _Subclassed()}, "model .*\\(_Subclassed\\) is not a functional or "
                                                            "Sequential Keras model"),
    "two_input_model": (lambda: {"model": _two_input_teacher()}, "^model 'two_inputs' has 2 inputs and 1 outputs; "
                                                                  "mskd_tf compresses single-input"),
    "target_macs_text": (lambda: {"target_macs": "abc"}, "^target_macs='abc': must be a number"),
    "seed_text": (lambda: {"seed": "x"}, "^seed='x': must be a whole number"),
    "criteria_number": (lambda: {"criteria": 5}, "^criteria: expected a list of names, got int 5"),
    "selection_not_dict": (lambda: {"selection": 3}, "^selection: expected a dict of settings"),
    "student_epochs_text": (lambda: {"student_epochs": "many"}, "^student_epochs='many': must be a number"),
    "micro_without_int8": (lambda: {"export": ("float32",), "micro": True},
                           "^micro runs the int8 model in TFLite Micro, but export=float32 has no int8: add int8 to "
                           "export or drop micro"),
    "protect_unknown": (lambda: {"protect": ("no_such_layer",)},
                        "^protect=no_such_layer: 'no_such_layer' is neither .*prunable layers: .*\\(checked on model\\)"),
    "workdir_unwritable": (lambda: {"workdir": "/proc/mskd_forbidden"}, "^workdir=/proc/mskd_forbidden: cannot write"),
    "class_names_count": (lambda: {"class_names": ("a", "b")}, "^class_names: 2 names for a model with 3 outputs"),
    "teacher_training_setting": (lambda: {"epochs": 5}, "^epochs=5 does not apply to compress\\(\\): it trains a "
                                                        "teacher, and compress\\(\\) starts from yours"),
    "data_source_setting": (lambda: {"val_fraction": 0.2}, "^val_fraction=0.2 does not apply to compress\\(\\): pass "
                                                           "val=\\(x_val, y_val\\)"),
    "misspelled_setting": (lambda: {"select_epoch": 2}, "^select_epoch: not a setting; did you mean select_epochs\\?"),
    "own_argument_in_a_dict": (lambda: {"selection": {"target_macs": 0.3}},
                               "^selection: target_macs: pass it as compress\\(\\)'s own argument"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_compress_rejects_bad_input_before_training(tmp_path, capsys, case):
    make, message = API_CASES[case]
    args = {"model": _teacher(), "train": _scaled(_toy()), "test": _scaled(_toy(30, seed=1)),
            "workdir": str(tmp_path / "wd"), "export": ("float32",)}
    args.update(make())
    model, train = args.pop("model"), args.pop("train")
    with pytest.raises(MskdError, match=message) as caught:
        mskd_tf.compress(model, train, **args)
    assert "--" not in str(caught.value), "API errors speak of arguments, not flags"
    assert "Epoch" not in capsys.readouterr().out
    assert not (tmp_path / "wd" / "teacher.keras").exists()


def test_whole_number_float_labels_are_classes():
    x, y = _toy()
    checked = data.check_splits({"train": (x, y.astype(np.float32))}, num_classes=3)
    assert checked["train"].y.dtype == np.int64 and list(checked["train"].y[:4]) == [0, 1, 2, 0]


# ----------------------------------------------------------------------------- one run per workdir


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path, capsys):
    workdir = tmp_path / "wd"
    with Workdir(workdir).lock():
        assert (workdir / ".lock").read_text().strip() == str(os.getpid())
        proc = _run_cli(f"--dataset=npz:{make_npz(tmp_path / 'toy.npz', n_train=90)}", *TOY_FLAGS,
                        f"--workdir={workdir}")
        _assert_cli_fails_before_training(proc, f"--workdir={workdir} is in use by another mskd-tf run "
                                                f"\\(pid {os.getpid()}\\)", workdir)
        with pytest.raises(MskdError, match=f"^workdir={workdir} is in use by another mskd-tf run \\(pid {os.getpid()}\\)"):
            mskd_tf.compress(_teacher(), _scaled(_toy()), workdir=str(workdir), export=("float32",))
    assert "Epoch" not in capsys.readouterr().out
    with Workdir(workdir).lock():  # released when the block ends
        pass


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    workdir = tmp_path / "wd"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mskd_tf.workdir import Workdir\n"
                               f"with Workdir({str(workdir)!r}).lock():\n    print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(MskdError, match=f"pid {holder.pid}"):
        with Workdir(workdir).lock():
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (workdir / ".lock").read_text().strip() == str(holder.pid)  # the stale lock file is still there...
    with Workdir(workdir).lock():  # ...and does not block: the OS released the dead process's flock
        assert (workdir / ".lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------- damaged stages.json


@pytest.fixture
def tiny_cfg(tmp_path):
    return Config(dataset=f"npz:{make_npz(tmp_path / 'toy.npz', n_train=120, n_test=30)}", model="small_cnn",
                  width=0.25, teacher_epochs=1, batch_size=32, workdir=str(tmp_path / "wd"), val_fraction=0.2)


def test_damaged_stage_record_keeps_the_verified_teacher(tiny_cfg, capsys):
    run_pipeline(tiny_cfg, stop_after="teacher")
    wd = Path(tiny_cfg.workdir)
    teacher_bytes = (wd / "teacher.keras").read_bytes()
    (wd / "stages.json").write_text('{"teacher": {"digest": "ab')  # cut short
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    out = capsys.readouterr().out
    assert re.search(r"WARNING: .*stages.json is unreadable .* moved it to stages.json.damaged; recovered the records "
                     r"of teacher", out)
    assert "[teacher] done already" in out and "Epoch" not in out
    assert (wd / "teacher.keras").read_bytes() == teacher_bytes
    assert (wd / "stages.json.damaged").read_text() == '{"teacher": {"digest": "ab'
    assert list(json.loads((wd / "stages.json").read_text())) == ["teacher"]


def test_damaged_stage_record_trusts_no_record_the_config_no_longer_matches(tiny_cfg, capsys):
    run_pipeline(tiny_cfg, stop_after="teacher")
    wd = Path(tiny_cfg.workdir)
    (wd / "stages.json").write_text("[1, 2")
    tiny_cfg.teacher_lr = 0.02
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    out = capsys.readouterr().out
    assert "unreadable" in out and "[teacher] running (config changed since it ran (teacher_lr))" in out


def test_damaged_stage_record_without_per_stage_records_says_everything_reruns(tmp_path, capsys):
    (tmp_path / "stages.json").write_text("\x00garbage")
    wd = Workdir(tmp_path)
    assert wd.state == {}
    assert "no per-stage records to recover from, so every stage runs again" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fuzz of the data loaders


def _random_array(rng, kind):
    ndim = int(rng.integers(0, 6))
    shape = tuple(int(rng.integers(0, 5)) for _ in range(ndim))
    dtype = rng.choice(["uint8", "int16", "int64", "float16", "float32", "float64", "bool", "complex64", "str"])
    if dtype == "str":
        return np.full(shape, "cat")
    scale = float(rng.choice([1.0, 255.0, 1e30, 1e300]))
    values = rng.uniform(-scale if rng.random() < 0.3 else 0, scale, shape)
    if rng.random() < 0.2 and values.size:
        values.flat[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf])
    with np.errstate(all="ignore"):
        return values.astype(dtype)


def test_fuzz_data_loaders_raise_mskderror_or_succeed(tmp_path):
    """Random shapes, dtypes, ranges, empty and huge arrays: a clear MskdError or success, never anything else."""
    rng = np.random.default_rng(17)
    outcomes = {"ok": 0, "error": 0}
    for case in range(50):
        arrays = {k: _random_array(rng, k) for k in ("x_train", "y_train", "x_test", "y_test")}
        if case % 2 == 0:  # valid arrays with one random part kept: the later checks and the pipelines are reached
            for split, n in (("train", int(rng.integers(0, 8))), ("test", int(rng.integers(0, 4)))):
                dtype = rng.choice(["float32", "uint8", "int64"])
                arrays[f"x_{split}"] = rng.uniform(0, 255.0 if dtype != "float32" else 1.0, (n, 4, 4, 1)).astype(dtype)
                arrays[f"y_{split}"] = (np.arange(n) % 2).astype(rng.choice(["int64", "float32", "uint8"]))
            kept = rng.choice(["none", "x_train", "y_train", "x_test", "y_test"], p=[0.4, 0.15, 0.15, 0.15, 0.15])
            if kept != "none":
                arrays[kept] = _random_array(rng, kept)
        path = tmp_path / f"case{case}.npz"
        np.savez(path, **arrays)
        try:
            splits = data.load(f"npz:{path}", batch_size=2, val_fraction=float(rng.choice([0.0, 0.5])), seed=case)
            next(iter(splits.train))  # the pipeline builds and yields
            outcomes["ok"] += 1
        except MskdError:
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001  (the point of the test)
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n" +
                        "\n".join(f"{k}: {v.dtype} {v.shape}" for k, v in arrays.items()))
        try:  # the in-memory entry point compress() uses
            data.check_splits({"train": (arrays["x_train"], arrays["y_train"]), "test": (arrays["x_test"],
                                                                                     arrays["y_test"])},
                              num_classes=3, image_shape=(4, 4, 1))
        except MskdError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case} (check_splits): {type(exc).__name__}: {exc}")
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 10, outcomes  # both outcomes were exercised


def test_a_renamed_keyword_still_reaches_its_setting_with_a_deprecation_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="distill_epochs is renamed student_epochs"):
        with pytest.raises(MskdError, match="^student_epochs='many': must be a number"):  # reached the setting
            mskd_tf.compress(_teacher(), _scaled(_toy()), distill_epochs="many", workdir=str(tmp_path / "wd"),
                             export=("float32",))


def test_the_old_settings_dicts_still_work_with_a_deprecation_warning(tmp_path):
    """compress(selection={...}, distill={...}) keeps working for users' code, warning once each; the keyword
    spelling is the one documented."""
    with pytest.warns(DeprecationWarning, match=r"compress\(selection=\{...\}\) is deprecated: pass the settings as "
                                                r"keyword arguments, e.g. compress\(..., student_epochs='many'\)"):
        with pytest.raises(MskdError, match="^student_epochs='many': must be a number"):  # reached: the dict was read
            mskd_tf.compress(_teacher(), _scaled(_toy()), selection={"student_epochs": "many"},
                             workdir=str(tmp_path / "wd"), export=("float32",))
