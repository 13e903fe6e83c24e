"""The CLI's contract: flags map onto the config, bad input gives one clear line and exit 2."""

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
    flag_values(["prog", "--lr=0.2", "--criteria=l1,fpgm", "--noaugment", "--train_subset=7", "--strategy=mirrored"])
    cfg = config_lib.config_from_flags(flag_values)
    assert {f.name for f in config_lib.Config.fields()} <= set(flag_values)
    assert (cfg.lr, cfg.criteria, cfg.augment, cfg.train_subset, cfg.strategy) == (0.2, ("l1", "fpgm"), False, 7, "mirrored")
    assert config_lib.Config() == config_lib.Config().validate()


def test_shipped_flagfiles_parse():
    for path in sorted((REPO / "configs").glob("*.cfg")):
        flag_values = flags.FlagValues()
        config_lib.define_flags(flag_values)
        flag_values(["prog", f"--flagfile={path}"])
        config_lib.config_from_flags(flag_values)  # raises on an invalid value


def test_digest_follows_only_named_fields():
    a, b = config_lib.Config(), config_lib.Config(lr=0.3)
    assert a.digest(["epochs", "seed"]) == b.digest(["epochs", "seed"])
    assert a.digest(["lr"]) != b.digest(["lr"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", -1.0, "--lr=-1.0: must be > 0"),
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr=-1"], "--lr=-1.0: must be > 0"),
        (["--no_such_flag=3"], "Unknown command line flag 'no_such_flag'"),
        (["--epochs=many"], "flag --epochs=many"),
        (["--dataset=folder:/does/not/exist"], "/does/not/exist does not exist"),
        (["--model=resnet7", "--train_subset=64", "--epochs=1"], "resnet7"),
        (["--teacher=/nope/teacher.keras", "--train_subset=64"], "--teacher=/nope/teacher.keras: cannot load"),
        (["--workdir=/proc/mskd_forbidden"], "--workdir=/proc/mskd_forbidden: cannot write"),
        (["stray_positional"], "unexpected arguments"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, message):
    if not any(a.startswith("--workdir") for a in args):
        args = [*args, f"--workdir={tmp_path / 'wd'}"]
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("mskd-tf: error:")]
    assert len(error_lines) == 1 and __import__("re").search(message, error_lines[0]), proc.stderr[-2000:]
