"""The CLI's contract: flags map onto the config, bad input gives one clear line and exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from mskd_tf import config as config_lib
from mskd_tf.errors import MskdError

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args, cwd=REPO, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "mskd_tf.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_config_field_is_a_flag_and_back():
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["prog", "--teacher_lr=0.2", "--criteria=l1,fpgm", "--noaugment", "--train_subset=7", "--strategy=mirrored"])
    cfg = config_lib.config_from_flags(flag_values)
    assert {f.name for f in config_lib.Config.fields()} <= set(flag_values)
    assert (cfg.teacher_lr, cfg.criteria, cfg.augment, cfg.train_subset, cfg.strategy) == (0.2, ("l1", "fpgm"), False, 7, "mirrored")
    assert config_lib.Config() == config_lib.Config().validate()


def test_renamed_flags_still_work_from_a_flagfile_with_a_warning(tmp_path):
    """A user's flagfile written before the renames: each old name sets the new setting and says so."""
    old = tmp_path / "old.cfg"
    old.write_text("--epochs=7\n--lr=0.3\n--distill_epochs=4\n--calibration_batches=3\n--calibration_samples=50\n")
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["prog", f"--flagfile={old}"])
    with pytest.warns(DeprecationWarning) as warned:
        cfg = config_lib.config_from_flags(flag_values)
    assert sorted(str(w.message).split()[0] for w in warned) == [
        "--calibration_batches", "--calibration_samples", "--distill_epochs", "--epochs", "--lr"]
    assert (cfg.teacher_epochs, cfg.teacher_lr, cfg.student_epochs, cfg.criteria_batches,
            cfg.int8_calibration_samples) == (7, 0.3, 4.0, 3, 50)


def test_the_cli_says_each_renamed_flag_in_one_line(tmp_path):
    proc = _run_cli("--epochs=2", f"--dataset=npz:{tmp_path / 'missing.npz'}", f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode == 2  # the missing file, after the warning
    assert ("mskd-tf: warning: --epochs is renamed --teacher_epochs; the old name still works for now and will be "
            "removed in a later release.") in proc.stderr.splitlines()
    assert "DeprecationWarning" not in proc.stderr


def test_renamed_settings_still_work_as_config_keywords_and_attributes():
    with pytest.warns(DeprecationWarning) as warned:
        cfg = config_lib.Config(epochs=3, distill_epochs=5.0)
    assert [str(w.message).split()[0] for w in warned] == ["epochs", "distill_epochs"]
    assert (cfg.teacher_epochs, cfg.student_epochs) == (3, 5.0)
    with pytest.warns(DeprecationWarning, match="Config.lr is renamed Config.teacher_lr"):
        cfg.lr = 0.2
    assert cfg.teacher_lr == 0.2 and "lr" not in cfg.to_dict()
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="both epochs= and its new name teacher_epochs="):
        config_lib.Config(epochs=3, teacher_epochs=4)


def test_the_result_names_the_selected_candidate_and_still_answers_to_criterion():
    from mskd_tf.api import CompressionResult

    result = CompressionResult(student=None, candidate="l1-global", candidates=[], teacher={}, student_metrics={},
                               exports=[], timings={}, workdir="", report={})
    with pytest.warns(DeprecationWarning, match="CompressionResult.criterion is renamed CompressionResult.candidate"):
        assert result.criterion == "l1-global"


def test_stage_digests_keep_the_first_names_so_old_work_dirs_resume():
    """A work dir's stages.json written before the renames recorded epochs / lr; the digest must not change."""
    from mskd_tf import stages
    from mskd_tf.api import _digest_inputs

    teacher = next(step for step in stages.PIPELINE if step.name == "teacher")
    inputs = _digest_inputs(config_lib.Config(teacher_epochs=9, teacher_lr=0.2), teacher)
    assert inputs["epochs"] == 9 and inputs["lr"] == 0.2 and "teacher_epochs" not in inputs


def test_shipped_flagfiles_parse():
    for path in sorted((REPO / "configs").glob("*.cfg")):
        flag_values = flags.FlagValues()
        config_lib.define_flags(flag_values)
        flag_values(["prog", f"--flagfile={path}"])
        config_lib.config_from_flags(flag_values)  # raises on an invalid value


def _first_stage_runs(path, tmp_path):
    """The flagfile as shipped, shrunk to a few batches, stops after its teacher stage."""
    workdir = tmp_path / path.stem
    proc = _run_cli(f"--flagfile={path}", "--train_subset=96", "--teacher_epochs=1", "--batch_size=32", "--stop_after=teacher",
                    f"--workdir={workdir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Stopped after teacher" in proc.stdout and "[rank]" not in proc.stdout
    assert (workdir / "teacher.keras").exists()
    assert list(json.loads((workdir / "stages.json").read_text())) == ["teacher"]


def test_quickstart_flagfile_runs_its_first_stage(tmp_path):
    _first_stage_runs(REPO / "configs" / "quickstart.cfg", tmp_path)


@pytest.mark.slow  # decodes the CIFAR-10 archive once (cached after) and builds the full-size teachers
@pytest.mark.parametrize("name", [p.name for p in sorted((REPO / "configs").glob("*.cfg")) if p.name != "quickstart.cfg"])
def test_every_shipped_flagfile_runs_its_first_stage(tmp_path, name):
    _first_stage_runs(REPO / "configs" / name, tmp_path)


def test_stop_after_must_not_precede_restart_from():
    with pytest.raises(MskdError, match="--restart_from='distill': comes after --stop_after=teacher"):
        config_lib.Config(stop_after="teacher", restart_from="distill").validate()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("teacher_lr", -1.0, "--teacher_lr=-1.0: must be > 0"),
        ("target_macs", 1.5, "--target_macs=1.5: is a fraction"),
        ("alpha", 2.0, "--alpha=2.0"),
        ("criteria", ("l1", "magic"), "unknown \\['magic'\\]"),
        ("export", ("int4",), "--export.*unknown \\['int4'\\]"),
        ("val_fraction", 1.0, "--val_fraction"),
        ("batch_size", 0, "--batch_size=0: must be >= 1"),
        ("temperature", float("nan"), "--temperature=nan: must be a finite number"),
        ("strategy", "gpu_farm", "--strategy='gpu_farm': must be one of"),
    ],
)
def test_validate_names_the_flag(field, value, message):
    with pytest.raises(MskdError, match=message):
        config_lib.Config(**{field: value}).validate()


def _teacher_file(tmp_path, kind):
    """Small saved teachers for the toy npz data (12x12x1, 3 classes)."""
    import keras

    inputs = keras.Input((16, 16, 1) if kind == "wrong_shape" else (12, 12, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    if kind == "groupnorm":
        x = keras.layers.GroupNormalization(groups=2, name="gn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / f"{kind}.keras"
    keras.Model(inputs, keras.layers.Dense(3, name="classifier")(x)).save(path)
    return path


def _corrupt_folder(tmp_path):
    from test_data import _write_folder

    root = _write_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "2.png").write_bytes(b"garbage")
    return root


TOY = ["--criteria=l1", "--criteria_batches=1", "--teacher_epochs=1", "--batch_size=32", "--model=small_cnn", "--width=0.25"]


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--dataset=npz:{toy}", "--teacher={teacher_groupnorm}", *TOY], "gn.*GroupNormalization",
                     marks=pytest.mark.slow),
        (["--dataset=npz:{toy}", "--teacher={teacher_wrong_shape}", *TOY], "inputs of shape \\(16, 16, 1\\)"),
        pytest.param(["--dataset=npz:{toy}", "--teacher={teacher_plain}", "--target_macs=0.001", *TOY],
                     "smallest reachable", marks=pytest.mark.slow),
        pytest.param(["--dataset=npz:{toy}", "--teacher_lr=1e30", "--schedule=constant", *TOY],
                     "teacher: the training loss became", marks=pytest.mark.slow),
        (["--dataset=folder:{corrupt}", *TOY], "cannot decode image .*2.png"),
        (["--dataset=npz:{badkeys}"], "lacks arrays"),
        (["--dataset=tfds:mnist", "--data_dir={tmp}/tfds"], "not prepared.*--download"),
        (["--export=int4"], "--export=.*unknown \\['int4'\\]"),
        (["--criteria=l1,vibes"], "--criteria=.*unknown \\['vibes'\\]"),
        (["--target_macs=0"], "--target_macs=0.0: is a fraction"),
        (["--restart_from=deploy"], "--restart_from=deploy: value should be one of"),
        (["--teacher_lr=-1"], "--teacher_lr=-1.0: must be > 0"),
        (["--no_such_flag=3"], "Unknown command line flag 'no_such_flag'"),
        (["--teacher_epochs=many"], "flag --teacher_epochs=many"),
        (["--dataset=folder:/does/not/exist"], "/does/not/exist does not exist"),
        (["--model=resnet7", "--train_subset=64", "--teacher_epochs=1"], "resnet7"),
        (["--teacher=/nope/teacher.keras", "--train_subset=64"], "--teacher=/nope/teacher.keras: no such file"),
        (["--workdir=/proc/mskd_forbidden"], "--workdir=/proc/mskd_forbidden: cannot write"),
        (["stray_positional"], "unexpected arguments"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, message):
    places = {"tmp": tmp_path}
    if any("{toy}" in a for a in args):
        from test_pipeline import make_npz

        places["toy"] = make_npz(tmp_path / "toy.npz", n_train=120, n_test=30)
    for kind in ("groupnorm", "wrong_shape", "plain"):
        if any(f"{{teacher_{kind}}}" in a for a in args):
            places[f"teacher_{kind}"] = _teacher_file(tmp_path, kind)
    if any("{corrupt}" in a for a in args):
        places["corrupt"] = _corrupt_folder(tmp_path)
    if any("{badkeys}" in a for a in args):
        import numpy as np

        places["badkeys"] = tmp_path / "bad.npz"
        np.savez(places["badkeys"], x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2))
    args = [a.format(**places) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args = [*args, f"--workdir={tmp_path / 'wd'}"]
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("mskd-tf: error:")]
    assert len(error_lines) == 1 and __import__("re").search(message, error_lines[0]), proc.stderr[-2000:]
