"""The stage runner: resume, invalidation by config, damaged artifacts, atomic writes."""

import json

import numpy as np
import pytest

from mskd_tf.api import run_pipeline
from mskd_tf.config import Config
from mskd_tf.errors import MskdError
from mskd_tf.workdir import Workdir


def make_npz(path, n_train=240, n_test=60, size=12, classes=3, seed=0):
    """Learnable toy images: the class decides which third of the image is bright."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
        band = size // classes
        for i, label in enumerate(y):
            x[i, label * band:(label + 1) * band] += 150
        return x, y

    (x_train, y_train), (x_test, y_test) = draw(n_train), draw(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def tiny_cfg(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    return Config(dataset=f"npz:{data}", model="small_cnn", width=0.25, teacher_epochs=1, batch_size=32, teacher_lr=0.05,
                  workdir=str(tmp_path / "wd"), val_fraction=0.2)


def test_every_config_field_is_a_stage_input_or_deliberately_not():
    from mskd_tf import stages

    fields = {f.name for f in Config.fields()}
    inputs = [name for stage in stages.PIPELINE for name in stage.inputs]
    assert set(inputs) <= fields, set(inputs) - fields  # no stage depends on a field that does not exist
    assert not set(inputs) & set(stages.NOT_STAGE_INPUTS)
    assert set(inputs) | set(stages.NOT_STAGE_INPUTS) == fields, "list a new Config field as some stage's input"
    assert all(stage.artifacts and callable(stage.run) for stage in stages.PIPELINE)


def test_teacher_stage_resumes_and_detects_changes(tiny_cfg, capsys):
    run_pipeline(tiny_cfg, stop_after="teacher")
    wd = tiny_cfg.workdir
    first = json.loads(open(f"{wd}/teacher.json").read())
    assert 0 <= first["test_acc"] <= 1 and first["macs"] > 0
    capsys.readouterr()

    run_pipeline(tiny_cfg, stop_after="teacher")
    out = capsys.readouterr().out
    assert "[teacher] done already" in out and "[rank]" not in out  # stop_after holds for finished stages too

    tiny_cfg.teacher_lr = 0.02
    run_pipeline(tiny_cfg, stop_after="teacher")
    assert "config changed since it ran (teacher_lr)" in capsys.readouterr().out


def _interrupted_teacher_run(cfg, monkeypatch, epoch_index):
    """A 3-epoch teacher run stopped (as a killed session) right after epoch ``epoch_index``'s backup."""
    import keras

    from mskd_tf import training

    original = training.standard_callbacks

    class Interrupt(keras.callbacks.Callback):  # runs after BackupAndRestore wrote the epoch
        def on_epoch_end(self, epoch, logs=None):
            if epoch == epoch_index:
                raise KeyboardInterrupt

    cfg.teacher_epochs = 3
    monkeypatch.setattr(training, "standard_callbacks", lambda *a, **k: [*original(*a, **k), Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, stop_after="teacher")
    monkeypatch.setattr(training, "standard_callbacks", original)


def test_interrupted_teacher_resumes_at_the_next_epoch(tiny_cfg, monkeypatch, capsys):
    _interrupted_teacher_run(tiny_cfg, monkeypatch, 1)
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    out = capsys.readouterr().out
    assert "teacher: resuming after epoch 2 of 3" in out
    assert "Epoch 3/3" in out and "Epoch 1/3" not in out and "Epoch 2/3" not in out
    record = json.loads(open(f"{tiny_cfg.workdir}/teacher.json").read())
    assert len(record["history"]["loss"]) == 3 and len(record["history"]["val_accuracy"]) == 3
    assert not (Workdir(tiny_cfg.workdir) / "teacher_backup").exists()


def test_teacher_backup_from_other_settings_is_not_resumed(tiny_cfg, monkeypatch, capsys):
    _interrupted_teacher_run(tiny_cfg, monkeypatch, 0)
    tiny_cfg.teacher_lr = 0.02
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    out = capsys.readouterr().out
    assert "resuming" not in out and "Epoch 1/3" in out


def test_damaged_artifact_is_redone(tiny_cfg, capsys):
    run_pipeline(tiny_cfg, stop_after="teacher")
    path = f"{tiny_cfg.workdir}/teacher.keras"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a truncated archive, as after a crash mid-copy
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    assert "damaged" in capsys.readouterr().out
    import keras

    keras.models.load_model(path)  # whole again


def test_a_missing_candidate_network_redoes_only_the_candidates_stage(tiny_cfg, capsys):
    import os

    tiny_cfg.criteria, tiny_cfg.target_macs = ("l1", "random"), 0.6
    run_pipeline(tiny_cfg, stop_after="candidates")
    names = [r["criterion"] for r in json.loads(open(f"{tiny_cfg.workdir}/candidates.json").read())["candidates"]]
    os.remove(f"{tiny_cfg.workdir}/candidates/{names[-1]}.keras")  # as a work dir copied without its networks
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="candidates")
    out = capsys.readouterr().out
    assert "[rank] done already" in out
    assert f"[candidates] running (artifact candidates/{names[-1]}.keras is missing)" in out
    assert all(os.path.exists(f"{tiny_cfg.workdir}/candidates/{n}.keras") for n in names)


def test_restart_from_redoes_that_stage(tiny_cfg, capsys):
    run_pipeline(tiny_cfg, stop_after="teacher")
    tiny_cfg.restart_from = "teacher"
    capsys.readouterr()
    run_pipeline(tiny_cfg, stop_after="teacher")
    assert "--restart_from=teacher" in capsys.readouterr().out


def test_nan_loss_stops_with_clear_error_and_saves_nothing(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    cfg = Config(dataset=f"npz:{data}", model="small_cnn", width=0.25, teacher_epochs=1, batch_size=32, teacher_lr=1e30,
                 schedule="constant", workdir=str(tmp_path / "wd"))
    with pytest.raises(MskdError, match="teacher: the training loss became"):
        run_pipeline(cfg, stop_after="teacher")
    assert not (tmp_path / "wd" / "teacher.keras").exists()


def test_atomic_write_leaves_old_artifact_on_failure(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_json("a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with wd.atomic("a.json") as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_candidate_styles_colour_by_criterion_and_mark_the_allocation():
    from mskd_tf.report import candidate_styles

    rows = [{"criterion": f"{c}-{a}", "ranking": c, "allocation": a} for a in ("global", "uniform")
            for c in ("l1", "taylor", "random")]
    styles = candidate_styles(rows)
    assert styles["l1-global"]["color"] == styles["l1-uniform"]["color"]  # one colour per criterion
    assert len({styles[f"{c}-global"]["color"] for c in ("l1", "taylor", "random")}) == 3
    assert styles["l1-global"]["marker"] != styles["l1-uniform"]["marker"]
    assert styles["l1-global"]["linestyle"] != styles["l1-uniform"]["linestyle"]
    assert candidate_styles(rows) == styles  # the same in every plot of a report


def test_a_resumed_run_trains_on_the_order_an_uninterrupted_one_does(tiny_cfg, tmp_path):
    """Each stage starts its own pass over the data: stopping after a stage and resuming must not change the
    later stages' data order (a shared pipeline re-shuffles on every pass, so select saw the orders after the
    teacher's epochs in one process and the first ones in a resumed process)."""
    import dataclasses

    tiny_cfg.criteria = ("l1", "random")
    tiny_cfg.teacher_epochs = 2
    tiny_cfg.select_epochs = 1.0  # fine-tuned candidates: their order is part of what is compared
    run_pipeline(tiny_cfg, stop_after="distill")
    resumed = dataclasses.replace(tiny_cfg, workdir=str(tmp_path / "resumed"))
    run_pipeline(resumed, stop_after="candidates")
    run_pipeline(resumed, stop_after="select")
    run_pipeline(resumed, stop_after="distill")

    def trained(workdir):
        selection = json.loads(open(f"{workdir}/selection.json").read())
        distilled = json.loads(open(f"{workdir}/distill.json").read())
        return ([(c["criterion"], c["curve"], c.get("weights")) for c in selection["candidates"] if c.get("steps")],
                {run: {k: v for k, v in values.items() if k != "seconds"} for run, values in distilled["runs"].items()})

    uninterrupted = trained(tiny_cfg.workdir)
    assert uninterrupted[0], "no candidate was fine-tuned: the comparison would be empty"
    assert trained(resumed.workdir) == uninterrupted


def test_default_widths_are_simd_multiples_and_tiny_groups_still_reach_the_target(tiny_cfg):
    """The library default round_to=8: every layer of 16 or more channels keeps a multiple of 8 (odd widths
    trained 1.6-4.7x slower on oneDNN), the 8-channel stem a multiple of 4, and the 50% target is still met."""
    tiny_cfg.criteria = ("l1", "random")
    assert tiny_cfg.round_to == 8
    run_pipeline(tiny_cfg, stop_after="candidates")
    candidates = json.loads(open(f"{tiny_cfg.workdir}/candidates.json").read())["candidates"]
    assert candidates
    for candidate in candidates:
        teacher_widths = candidate["teacher_widths"]
        for layer, width in candidate["widths"].items():
            step = 8 if teacher_widths[layer] >= 16 else 4
            assert width % step == 0, (candidate["criterion"], layer, width, teacher_widths[layer])
        assert abs(candidate["macs_ratio"] - tiny_cfg.target_macs) <= 0.05, candidate["macs_ratio"]


def test_selection_shares_a_users_dataset_but_gives_numpy_splits_a_fresh_pipeline_per_candidate(tmp_path):
    """A tf.data dataset handed to compress() cannot be rebuilt: select gets it as is, autotuning off (and records a
    shared pipeline); numpy splits give select a function whose every call starts the seed's first order again."""
    import keras
    import tensorflow as tf

    from mskd_tf import context

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    cfg = Config(workdir=str(tmp_path / "wd"), batch_size=16)

    def run_context(train):
        data = context.user_data(model, train, (x, y), None, batch_size=16, seed=0)
        return context.Context(cfg=cfg, wd=Workdir(cfg.workdir), user_data=data)

    given = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    shared = run_context(given).selection_train()
    assert not callable(shared) and [b[1].numpy().tolist() for b in shared] == [b[1].numpy().tolist() for b in given]
    # Read in many short passes: without autotuning (each pass's end waited for its tuning thread)
    assert given.options().autotune.enabled is not False and shared.options().autotune.enabled is False

    fresh = run_context((x, y)).selection_train()
    assert callable(fresh)
    first, again = next(iter(fresh())), next(iter(fresh()))
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())


def test_runs_under_the_kd_loss_train_at_the_scaled_rate(tiny_cfg, monkeypatch):
    """Selection under KD and the distill stage's KD run train at --finetune_lr x --kd_lr_scale; cross-entropy
    runs (the baseline, a selection that fell back to CE) at --finetune_lr."""
    from mskd_tf import distill, selection

    seen = []
    real_distill, real_select = distill.distill, selection.select
    monkeypatch.setattr(distill, "distill", lambda *a, **k: seen.append(("distill", k["kd"], k["lr"]))
                        or real_distill(*a, **k))
    monkeypatch.setattr(selection, "select", lambda *a, **k: seen.append(("select", k["teacher"] is not None,
                                                                          k["lr"])) or real_select(*a, **k))
    tiny_cfg.criteria, tiny_cfg.finetune_lr, tiny_cfg.kd_lr_scale = ("l1", "random"), 0.04, 0.25
    run_pipeline(tiny_cfg, stop_after="distill")
    assert [(stage, kd) for stage, kd, _ in seen][1:] == [("distill", True), ("distill", False)]
    assert all(lr == pytest.approx(0.01 if kd else 0.04) for _, kd, lr in seen), seen
    record = json.loads(open(f"{tiny_cfg.workdir}/distill.json").read())
    assert (record["runs"]["kd"]["lr"], record["runs"]["ce"]["lr"]) == (pytest.approx(0.01), pytest.approx(0.04))


def test_select_epochs_zero_distills_the_zero_cost_pick_for_the_whole_budget(tiny_cfg):
    """--select_epochs=0: the candidates stage's zero-cost scores choose, no step is spent selecting, and the
    distill stage trains the chosen candidate for all of --student_epochs."""
    tiny_cfg.criteria, tiny_cfg.select_epochs, tiny_cfg.student_epochs = ("l1", "random"), 0.0, 1.0
    run_pipeline(tiny_cfg, stop_after="distill")
    wd = tiny_cfg.workdir
    rows = json.loads(open(f"{wd}/candidates.json").read())["candidates"]
    selection = json.loads(open(f"{wd}/selection.json").read())
    pooled = [r for r in rows if r["params"] >= tiny_cfg.min_params_ratio * np.median([q["params"] for q in rows])]
    best = max(pooled, key=lambda r: (r["val_acc_before_finetune"], -r["macs"]))
    assert selection["selected"]["criterion"] == best["criterion"]
    assert selection["protocol"]["total_steps"] == 0
    record = json.loads(open(f"{wd}/distill.json").read())
    assert record["selection_steps"] == 0 and record["distill_steps"] == record["budget_steps"] == 6  # 192 / 32


def test_the_summary_says_which_filter_stopped_a_candidate_that_never_trained():
    from mskd_tf.report import summary_table

    rep = {"config": {"epochs": 5}, "teacher": {}, "selected": {"criterion": "b"},
           "candidates": [{"criterion": "a", "params_kept": False, "val_acc_before_finetune": 0.2},
                          {"criterion": "b", "params_kept": True, "val_acc_before_finetune": 0.5},
                          {"criterion": "c", "val_acc_before_finetune": 0.4},
                          {"criterion": "d", "budget_epochs": 0.5, "val_acc": 0.6}]}
    lines = {line.split("|")[1].strip(): line for line in summary_table(rep).splitlines()[2:]}
    assert "20.00" in lines["candidate a"] and "under the capacity pool" in lines["candidate a"]
    assert "the zero-cost pick" in lines["candidate b (selected)"]
    assert lines["candidate c"].rstrip(" |").endswith("no step (zero-cost rung)")
    assert "60.00" in lines["candidate d"] and "fine-tuned 0.5 epochs" in lines["candidate d"]


def test_the_summary_gives_the_teachers_epochs_trained_or_where_a_given_teacher_came_from():
    from mskd_tf.report import summary_table

    def teacher_note(rep):
        return summary_table(rep).splitlines()[2].split("|")[-2].strip()

    trained = {"config": {"teacher_epochs": 5}, "teacher": {}, "history": {"teacher": {"loss": [1.0, 0.9, 0.8]}}}
    assert teacher_note(trained) == "3 epochs"  # the epochs it ran, not the flag's default
    given = {"config": {"teacher_epochs": 5, "teacher": "t.keras", "dataset": "cifar10"}, "teacher": {},
             "history": {"teacher": None}}
    assert teacher_note(given) == "given (--teacher=t.keras), not trained here"
    assert "compress(model)" in teacher_note({"config": {"teacher_epochs": 5}, "teacher": {}})


def test_sensitivity_allocation_builds_a_candidate_at_the_target(tiny_cfg):
    """--allocations=sensitivity: each ranking's groups are measured alone, then cut to the MACs target together."""
    tiny_cfg.criteria, tiny_cfg.allocations = ("l1",), ("uniform", "sensitivity")
    run_pipeline(tiny_cfg, stop_after="candidates")
    rows = {r["criterion"]: r for r in json.loads(open(f"{tiny_cfg.workdir}/candidates.json").read())["candidates"]}
    assert set(rows) == {"l1-uniform", "l1-sensitivity"} and rows["l1-sensitivity"]["allocation"] == "sensitivity"
    assert abs(rows["l1-sensitivity"]["macs_ratio"] - tiny_cfg.target_macs) <= 0.1
    assert rows["l1-sensitivity"]["val_acc_before_finetune"] is not None


def test_candidates_keeping_the_same_channels_are_selected_as_one_network(tiny_cfg, capsys):
    from mskd_tf.pruning import criteria as C

    @C.register_criterion("test_twice_l1")  # l1's order: it keeps l1's channels at every allocation
    def twice_l1(group, context):
        return 2 * C.REGISTRY["l1"].fn(group, context)

    try:
        tiny_cfg.criteria, tiny_cfg.allocations = ("l1", "test_twice_l1", "random"), ("uniform",)
        tiny_cfg.select_epochs, tiny_cfg.student_epochs = 0.5, 1.0
        run_pipeline(tiny_cfg, stop_after="select")
    finally:
        del C.REGISTRY["test_twice_l1"]
    rows = {r["criterion"]: r for r in json.loads(open(f"{tiny_cfg.workdir}/candidates.json").read())["candidates"]}
    assert rows["test_twice_l1"]["same_as"] == "l1" and rows["test_twice_l1"]["kept"] == rows["l1"]["kept"]
    assert "same_as" not in rows["l1"] and "same_as" not in rows["random"]
    assert "test_twice_l1 keeps the same channels as l1" in capsys.readouterr().out
    selection = json.loads(open(f"{tiny_cfg.workdir}/selection.json").read())
    assert "test_twice_l1" not in json.dumps(selection) and "l1" in json.dumps(selection)
