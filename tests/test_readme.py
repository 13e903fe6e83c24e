"""The documentation's Python examples run as written: each ```python block of README.md, then of the docs/ pages
in PAGES' order, is executed verbatim, in order, in one namespace that holds the names the pages assume (training
arrays, a trained ``teacher.keras``, ``model``, ``train_ds``...), on tiny data in a temporary directory."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from mskd_tf import data, models

REPO = Path(__file__).resolve().parent.parent
# README first, then the reference pages whose blocks build on it (pruning defines ``scores``; distillation uses
# ``teacher``, ``student``, ``train_ds``; speed uses ``model``). A docs/ page with Python blocks must be listed here.
PAGES = ("README.md", "docs/pruning.md", "docs/selection_and_distillation.md", "docs/speed.md")
SLOW_BLOCKS = ("keras.applications.MobileNetV2",)  # a 96x96 MobileNetV2 trained and compressed: ~10 minutes
FENCE = r"^```python\n(.*?)^```"


def python_blocks():
    """[(where, code)] for every ```python block of PAGES, in order."""
    blocks = []
    for page in PAGES:
        for i, code in enumerate(re.findall(FENCE, (REPO / page).read_text(), flags=re.S | re.M), 1):
            blocks.append((f"{page} block {i}", code))
    return blocks


def _arrays(n, seed, size=12, classes=3, channels=1):
    """Images in [0, 1] whose class is where a bright stripe lies: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.uniform(0, 0.2, (n, size, size, channels)).astype(np.float32)
    for i, label in enumerate(y):
        rows = slice(label * size // classes, (label + 1) * size // classes)
        x[i, rows] += 0.7
    return x, y


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x_train, y_train = _arrays(192, 0)
    x_test, y_test = _arrays(64, 1)
    keras.utils.set_random_seed(0)
    teacher = models.build("small_cnn", (12, 12, 1), 3, width=0.25)
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
    teacher.save("teacher.keras")
    student = models.build("small_cnn", (12, 12, 1), 3, width=0.125)
    train_ds = data.train_pipeline(data.Arrays((x_train * 255).astype(np.uint8), y_train), 32, augment=False)
    val_ds = data.eval_pipeline(data.Arrays((x_test * 255).astype(np.uint8), y_test), 64)
    from mskd_tf.pruning.criteria import REGISTRY

    registered = set(REGISTRY)
    yield dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, teacher=teacher, student=student,
               model=keras.models.clone_model(teacher), train_ds=train_ds, val_ds=val_ds, keras=keras)
    for name in set(REGISTRY) - registered:  # a block registers an example criterion: not for the other tests
        del REGISTRY[name]


def test_the_readme_has_the_examples_this_test_runs():
    blocks = [code for _, code in python_blocks()]
    assert len(blocks) >= 5
    assert "mskd_tf.compress(teacher" in blocks[0]  # the README's first example
    assert sum(any(marker in block for marker in SLOW_BLOCKS) for block in blocks) == 1
    unlisted = [str(page.relative_to(REPO)) for page in sorted((REPO / "docs").rglob("*.md"))
                if str(page.relative_to(REPO)) not in PAGES and re.search(FENCE, page.read_text(), flags=re.S | re.M)]
    assert unlisted == [], "add these pages to PAGES so their Python blocks run"


# Keras warns on every fit() of a tf.data dataset without shuffle=False; the examples pass the library's pipelines,
# which shuffle themselves, and stay as short as a user would write them.
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed, but will be ignored:UserWarning")
def test_the_readme_python_examples_run_as_written(namespace, capsys):
    ran = 0
    for where, block in python_blocks():
        if any(marker in block for marker in SLOW_BLOCKS):
            continue
        exec(compile(block, where, "exec"), namespace)  # noqa: S102 - the documentation's own code
        ran += 1
    assert ran >= 5
    assert Path("student.keras").exists() and Path("slim.keras").exists()
    assert "max_act" in namespace and namespace["result"].student is not None
    assert namespace["result"].summary() in capsys.readouterr().out  # the first example prints it


@pytest.mark.slow
def test_the_readme_nested_keras_applications_example_runs_as_written(namespace):
    x, y = _arrays(256, 2, size=96, classes=4, channels=3)
    x_val, y_val = _arrays(96, 3, size=96, classes=4, channels=3)
    namespace.update(x=x, y=y, x_val=x_val, y_val=y_val, mskd_tf=__import__("mskd_tf"))
    where, block = next((w, b) for w, b in python_blocks() if any(marker in b for marker in SLOW_BLOCKS))
    exec(compile(block, f"{where} (nested example)", "exec"), namespace)  # noqa: S102 - the documentation's own code
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= set(namespace["result"].exports[0]["micro"]["ops"])


SHELL_FENCE = r"^```(?:bash|sh)\n(.*?)^```"


def cli_commands():
    """[(where, argv)] for every ``python -m mskd_tf.run`` command in a shell block of README.md and docs/."""
    import shlex

    commands = []
    for page in ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))):
        for block in re.findall(SHELL_FENCE, (REPO / page).read_text(), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:3] == ["python", "-m", "mskd_tf.run"] and "--helpfull" not in words:
                    commands.append((f"{page}: {line.strip()}", words[3:]))
    return commands


def test_the_docs_have_the_commands_the_next_test_parses():
    pages = {where.split(":")[0] for where, _ in cli_commands()}
    assert {"README.md", "docs/deployment.md", "docs/cli_and_data.md"} <= pages


@pytest.mark.parametrize("where, argv", cli_commands(), ids=[where for where, _ in cli_commands()])
def test_the_documented_commands_are_valid_settings(where, argv, monkeypatch):
    """Every documented CLI command names flags that exist, with values the config accepts (no training)."""
    from absl import flags

    from mskd_tf import config as config_lib

    monkeypatch.chdir(REPO)  # the commands' flagfiles are relative to the checkout
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["prog", *argv])
    config_lib.config_from_flags(flag_values)  # raises MskdError naming the flag on an invalid value
