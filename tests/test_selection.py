"""Selection: halving plan, choice rule, exact custom loop, artifacts, resumption, bad input."""

import functools
import inspect
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mskd_tf import selection
from mskd_tf.candidate_training import Finetuner
from mskd_tf.config import Config
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import weights_digest
from mskd_tf.selection import choose, halving_rungs, time_split_total
from mskd_tf.training import make_optimizer
from multiworker_select import EVERY_CANDIDATE, tiny_arrays, tiny_candidate, tiny_datasets

# These tests fine-tune every candidate they pass, at a fixed rate, for an epoch unless they say otherwise; the
# library's own defaults (the pipeline's: the zero-cost pick in a capacity pool) are tested by name.
select = functools.partial(selection.select, epochs=1.0, lr=0.01, **EVERY_CANDIDATE)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


# ----------------------------------------------------------------------------- plan and choice


def test_halving_plan_for_nine_candidates():
    # 4 rungs of 144 / 4 = 36 steps each, split over 9, 5, 3, 2 survivors.
    assert halving_rungs(9, 144) == [(9, 4), (5, 11), (3, 23), (2, 41)]
    assert halving_rungs(1, 50) == [(1, 50)]
    assert halving_rungs(2, 50) == [(2, 25)]  # two candidates share the budget


@pytest.mark.parametrize("count", range(2, 17))
def test_halving_spends_at_most_the_budget(count):
    full = 800
    plan = halving_rungs(count, full)
    spent, previous = 0, 0
    for survivors, cumulative in plan:
        spent += survivors * (cumulative - previous)
        previous = cumulative
    assert spent <= full
    assert spent >= full - 2 * len(plan) * count  # only rounding is lost
    assert plan[-1][0] == 2 and [s for s, _ in plan] == sorted((s for s, _ in plan), reverse=True)


def row(name, acc, macs, budget=1.0):
    return {"criterion": name, "val_acc": acc, "macs": macs, "budget_epochs": budget}


def test_choice_prefers_fewer_macs_within_tolerance():
    winner, reason = choose([row("l1", 0.900, 2e6), row("bn", 0.899, 1e6), row("taylor", 0.850, 0.5e6)], 0.002)
    assert winner["criterion"] == "bn"
    assert "within tie_tolerance=0.002 of the best (l1: 0.9000)" in reason and "1.000M vs 2.000M" in reason


def test_choice_outside_tolerance_takes_the_best_and_skips_failures():
    rows = [row("l1", 0.900, 2e6), row("bn", 0.890, 1e6), {**row("nan", None, 1), "error": "the loss became nan"}]
    winner, reason = choose(rows, 0.002)
    assert winner["criterion"] == "l1" and reason.startswith("highest validation accuracy 0.9000")
    with pytest.raises(MskdError, match="every candidate failed to fine-tune .*nan: the loss became nan"):
        choose([rows[2]], 0.002)


# ----------------------------------------------------------------------------- the training loop


def test_one_step_equals_keras_train_on_batch():
    x, y = tiny_arrays(48)
    reference, ours = tiny_candidate(6, "a", seed=3), tiny_candidate(6, "b", seed=3)
    reference.compile(make_optimizer("sgd", 0.1, total_steps=1, schedule="constant"),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.train_on_batch(x, y)
    optimizer = make_optimizer("sgd", 0.1, total_steps=1, schedule="constant")
    bad = Finetuner(ours, optimizer).train(tf.data.Dataset.from_tensor_slices((x, y)).batch(48), 1)
    assert bad is None
    for mine, theirs in zip(weights_of(ours), weights_of(reference)):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    assert not np.allclose(weights_of(ours)[0], weights_of(tiny_candidate(6, "c", seed=3))[0])


def test_accuracy_counts_every_example_with_a_ragged_last_batch():
    x, y = tiny_arrays(53)
    model = tiny_candidate(4, "a", seed=5)
    expected = float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))
    tuner = Finetuner(model, make_optimizer("sgd", 0.1, total_steps=1))
    assert tuner.accuracy(tf.data.Dataset.from_tensor_slices((x, y)).batch(16)) == pytest.approx(expected, abs=1e-12)


def test_training_resumes_at_the_batch_where_it_stopped():
    """Steps 0-2 then 3-4 see the same batches as steps 0-4 in one go (unshuffled data, plain SGD)."""
    x, y = tiny_arrays(64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 4 batches an epoch
    whole, split = tiny_candidate(4, "a", seed=2, batchnorm=False), tiny_candidate(4, "b", seed=2, batchnorm=False)
    sgd = lambda: make_optimizer("sgd", 0.05, total_steps=1, schedule="constant", momentum=0.0)  # noqa: E731
    Finetuner(whole, sgd()).train(data, 5)
    resumed = Finetuner(split, sgd())
    resumed.train(data, 3)
    resumed.train(data, 2, start=3)  # batch 3, then batch 0 of the next pass
    for a, b in zip(weights_of(whole), weights_of(split)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_diverging_candidate_reports_the_loss():
    x, y = tiny_arrays(32)
    model = tiny_candidate(4, "a", seed=1, batchnorm=False)
    kernel = model.get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.inf, np.float32))
    bad = Finetuner(model, make_optimizer("sgd", 0.1, total_steps=1)).train(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16), 2)
    assert bad is not None and not math.isfinite(bad)


# ----------------------------------------------------------------------------- select end to end


@pytest.fixture(scope="module")
def data():
    return tiny_datasets()  # 6 training batches of 32, 2 validation batches


def three_candidates():
    return {f"w{w}": tiny_candidate(w, f"w{w}", seed=w) for w in (4, 6, 8)}


def test_select_writes_artifacts_and_follows_the_plan(tmp_path, data):
    payload = select(three_candidates(), *data, workdir=tmp_path, epochs=2.0, lr=0.05, verbose=False)
    rows = {r["criterion"]: r for r in payload["candidates"]}
    # 3 candidates, 12 steps in all (6 an epoch): rungs of 12/2 = 6 steps -> 2 each, then 3 more for 2 finalists.
    assert [r["budget_epochs"] for r in payload["protocol"]["rungs"]] == [round(2 / 6, 4), round(5 / 6, 4)]
    assert sorted(r["steps"] for r in rows.values()) == [2, 5, 5]
    assert payload["protocol"]["total_steps"] == 12 and payload["protocol"]["spent_epochs"] == 2.0
    assert payload["selected"]["steps"] == 5 and payload["protocol"]["loss"] == "ce"
    for r in rows.values():
        assert r["curve"][0][0] == 0.0 and r["curve"][-1] == [r["budget_epochs"], r["val_acc"]]
        assert 0.0 <= r["val_acc"] <= 1.0 and r["macs"] > 0 and r["params"] > 0 and r["seconds"] > 0
        # Where the seconds went, per rung: the parts account for the candidate's total.
        assert [split["rung"] for split in r["time_split"]] == ["1/2", "2/2"][:len(r["time_split"])]
        parts = sum(v for split in r["time_split"] for k, v in split.items() if k != "rung")
        assert abs(parts - r["seconds"]) <= 0.05 * r["seconds"] + 0.05
        assert r["time_split"][0]["trace"] > 0 and all(split["train"] > 0 for split in r["time_split"])
    chosen = payload["selected"]["criterion"]
    finalists = payload["protocol"]["rungs"][-1]["candidates"]
    assert chosen in finalists
    assert rows[chosen]["val_acc"] == max(rows[n]["val_acc"] for n in finalists) or "tie_tolerance" in \
        payload["selected"]["reason"]
    assert json.loads((tmp_path / "selection.json").read_text()) == payload
    selected = keras.models.load_model(tmp_path / "selected.keras")
    assert weights_digest(selected) == rows[chosen]["weights"]
    assert sorted(p.name for p in (tmp_path / "selection").iterdir()) == sorted(
        f"w{w}.{ext}" for w in (4, 6, 8) for ext in ("json", "keras"))


def test_without_halving_the_candidates_share_the_budget_evenly(tmp_path, data):
    payload = select(three_candidates(), *data, workdir=tmp_path, epochs=1.5, successive_halving=False,
                     verbose=False)
    assert [r["steps"] for r in payload["candidates"]] == [3, 3, 3]
    assert [r["budget_epochs"] for r in payload["candidates"]] == [0.5, 0.5, 0.5]
    assert payload["protocol"]["spent_epochs"] == 1.5


def test_resume_skips_finished_work_and_continues_partial_work(tmp_path, data, monkeypatch):
    candidates = three_candidates()
    first = select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, verbose=False)
    calls = []
    original = Finetuner.train
    monkeypatch.setattr(Finetuner, "train", lambda self, ds, steps, **kw: calls.append((steps, kw["start"]))
                        or original(self, ds, steps, **kw))
    (tmp_path / "selection.json").unlink()
    again = select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, verbose=False)
    assert calls == [] and again["selected"] == first["selected"]
    assert [r["weights"] for r in again["candidates"]] == [r["weights"] for r in first["candidates"]]
    longer = select(candidates, *data, workdir=tmp_path, epochs=3.0, successive_halving=False, verbose=False)
    assert calls == [(3, 3)] * 3  # only the missing half epoch, from batch 3
    assert [len(r["curve"]) for r in longer["candidates"]] == [3, 3, 3]  # 0, 0.5 and 1 epoch


@pytest.mark.slow  # three selections: ~8 s
def test_changed_candidate_or_settings_start_over(tmp_path, data):
    candidates = three_candidates()
    digests = lambda payload: [r["weights"] for r in payload["candidates"]]  # noqa: E731
    first = digests(select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, verbose=False))
    candidates["w4"] = tiny_candidate(4, "w4", seed=99)
    second = digests(select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, verbose=False))
    assert second[0] != first[0] and second[1:] == first[1:]  # only the changed candidate was retrained
    third = digests(select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, lr=0.05,
                           verbose=False))
    assert all(a != b for a, b in zip(third, second))


def test_candidates_given_as_keras_files(tmp_path, data):
    paths = {}
    for name, model in three_candidates().items():
        paths[name] = str(tmp_path / f"{name}.keras")
        model.save(paths[name])
    payload = select(paths, *data, workdir=tmp_path / "work", epochs=0.5, verbose=False)
    assert {r["criterion"] for r in payload["candidates"]} == set(paths)
    with pytest.raises(MskdError, match="cannot read candidate file .*missing.keras"):
        select({"gone": str(tmp_path / "missing.keras")}, *data, workdir=tmp_path / "w2", verbose=False)


def test_a_diverging_candidate_is_recorded_and_never_chosen(tmp_path, data):
    candidates = three_candidates()
    kernel = candidates["w8"].get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    payload = select(candidates, *data, workdir=tmp_path, epochs=1.5, successive_halving=False, verbose=False)
    failed = next(r for r in payload["candidates"] if r["criterion"] == "w8")
    assert failed["val_acc"] is None and "the loss became nan" in failed["error"]
    assert payload["selected"]["criterion"] != "w8"


def test_zero_cost_rung_trains_only_the_best_by_accuracy_before_any_step(tmp_path, data):
    candidates = three_candidates()
    given = {"w4": 0.2, "w6": 0.9, "w8": 0.5}
    payload = select(candidates, *data, workdir=tmp_path, epochs=1.0, zero_cost_keep=2, zero_cost_scores=given,
                     verbose=False)
    steps = {r["criterion"]: r["steps"] for r in payload["candidates"]}
    assert steps["w4"] == 0 and steps["w6"] == steps["w8"] == 3  # two survivors share 6 steps in one rung
    assert payload["protocol"]["zero_cost"]["kept"] == ["w6", "w8"]
    assert payload["selected"]["criterion"] in ("w6", "w8") and payload["protocol"]["total_steps"] == 6
    # The step-0 point of each curve is the score the rung already had, not a second validation pass.
    assert {r["criterion"]: r["curve"][0] for r in payload["candidates"] if r["steps"]} == {
        "w6": [0.0, 0.9], "w8": [0.0, 0.5]}
    # Without given scores the rung measures them: the same numbers as a plain evaluation.
    measured = select(candidates, *data, workdir=tmp_path / "m", epochs=1.0, zero_cost_keep=1, verbose=False)
    from mskd_tf.training import accuracy

    expected = {n: accuracy(m, data[1]) for n, m in three_candidates().items()}
    assert measured["protocol"]["zero_cost"]["scores"] == pytest.approx(expected, abs=1e-12)
    best = max(expected, key=lambda n: (expected[n], -int(n[1:])))
    assert measured["selected"]["criterion"] == best and measured["protocol"]["rungs"][0]["budget_epochs"] == 1.0


def test_capacity_pool_drops_the_small_candidates_before_the_zero_cost_rung(tmp_path, data):
    from mskd_tf import flops

    candidates = three_candidates()
    params = {n: int(flops.count(m).params) for n, m in candidates.items()}
    assert params["w4"] < params["w6"] < params["w8"]
    ratio = (params["w4"] + params["w6"]) / 2 / params["w6"]  # between w4's and w6's share of the median, w6
    given = {"w4": 0.9, "w6": 0.5, "w8": 0.2}  # the small one has the best zero-cost score and must still go
    payload = select(candidates, *data, workdir=tmp_path, epochs=1.0, zero_cost_keep=1, zero_cost_scores=given,
                     min_params_ratio=ratio, verbose=False)
    assert payload["protocol"]["capacity_pool"] == {"min_params_ratio": ratio, "params": params, "kept": ["w6", "w8"]}
    assert payload["protocol"]["zero_cost"]["kept"] == ["w6"] and payload["selected"]["criterion"] == "w6"
    rows = {r["criterion"]: r for r in payload["candidates"]}
    assert rows["w4"]["steps"] == 0 and not rows["w4"]["params_kept"] and "zero_cost_acc" not in rows["w4"]
    # Without the pool the zero-cost rung keeps the small one.
    plain = select(three_candidates(), *data, workdir=tmp_path / "all", epochs=1.0, zero_cost_keep=1,
                   zero_cost_scores=given, verbose=False)
    assert plain["selected"]["criterion"] == "w4" and plain["protocol"]["capacity_pool"] is None


def test_capacity_pool_keeps_the_equal_width_uniform_candidates_beside_a_larger_global_one():
    """The CIFAR-10 t120 candidates (parameters at 50% MACs): every uniform candidate has 159,882 parameters,
    the largest global one 178,098. A floor at 0.9 x the largest (160,288) dropped every uniform candidate, the
    default allocation included; the floor at 0.9 x the median keeps them and drops the small globals only."""
    from mskd_tf.selection import capacity_pool

    params = {**{f"{c}-uniform": 159882 for c in ("l1", "l2", "fpgm", "taylor", "hrank", "activation", "apoz",
                                                   "bn_gamma", "random")},
              "l1-global": 166890, "l2-global": 178098, "fpgm-global": 178098, "bn_gamma-global": 165410,
              "taylor-global": 130346, "activation-global": 131610, "random-global": 132186,
              "apoz-global": 117082, "hrank-global": 95146}
    kept = capacity_pool(params, 0.9)
    assert sorted(set(params) - set(kept)) == ["activation-global", "apoz-global", "hrank-global", "random-global",
                                               "taylor-global"]
    assert capacity_pool(params, 0.0) == list(params)


def test_given_candidate_costs_spare_loading_the_files_the_pools_drop(tmp_path, data, monkeypatch):
    """The candidates stage has counted every candidate: the pools use its figures and load only the survivors."""
    from mskd_tf import flops

    paths, costs = {}, {}
    for name, model in three_candidates().items():
        paths[name] = str(tmp_path / f"{name}.keras")
        model.save(paths[name])
        cost = flops.count(model)
        costs[name] = {"macs": cost.macs, "params": cost.params}
    # Given figures win over the files': w8 is declared the smallest, so the pool drops it.
    costs["w8"] = {**costs["w8"], "params": 1}
    loaded = []
    real_load = keras.models.load_model
    monkeypatch.setattr(keras.models, "load_model", lambda path, **kw: loaded.append(str(path)) or real_load(path, **kw))
    payload = select(paths, *data, workdir=tmp_path / "sel", epochs=1.0, zero_cost_keep=1,
                     zero_cost_scores={"w4": 0.5, "w6": 0.9, "w8": 0.95}, candidate_costs=costs,
                     min_params_ratio=0.5, verbose=False)
    assert payload["protocol"]["capacity_pool"]["kept"] == ["w4", "w6"]
    assert payload["protocol"]["capacity_pool"]["params"]["w8"] == 1
    assert payload["selected"]["criterion"] == "w6"
    assert paths["w8"] not in loaded and paths["w4"] not in loaded and paths["w6"] in loaded


def test_kd_selection_step_equals_the_distillers_step():
    """Selection under KD takes the same step as the Distiller that trains the winner (no BatchNorm: exact)."""
    from mskd_tf.distill import Distiller

    x, y = tiny_arrays(48)
    teacher = tiny_candidate(8, "t", seed=7, batchnorm=False)
    reference, ours = tiny_candidate(4, "a", seed=3, batchnorm=False), tiny_candidate(4, "b", seed=3, batchnorm=False)
    distiller = Distiller(teacher, reference)
    distiller.compile(make_optimizer("sgd", 0.1, total_steps=1, schedule="constant"), temperature=3.0, alpha=0.3)
    distiller.train_on_batch(x, y)
    tuner = Finetuner(ours, make_optimizer("sgd", 0.1, total_steps=1, schedule="constant"), teacher=teacher,
                      temperature=3.0, alpha=0.3)
    assert tuner.train(tf.data.Dataset.from_tensor_slices((x, y)).batch(48), 1) is None
    for mine, theirs in zip(weights_of(ours), weights_of(reference)):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    plain = tiny_candidate(4, "c", seed=3, batchnorm=False)
    Finetuner(plain, make_optimizer("sgd", 0.1, total_steps=1, schedule="constant")).train(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(48), 1)
    assert not np.allclose(weights_of(plain)[0], weights_of(ours)[0])  # the KD term changed the step


def test_zero_epochs_pick_the_best_zero_cost_candidate_and_train_nothing(tmp_path, data):
    from mskd_tf import training

    train, val = data
    candidates = three_candidates()
    measured = {name: training.accuracy(model, val) for name, model in candidates.items()}
    payload = select(candidates, train, val, workdir=tmp_path / "measured", epochs=0, min_params_ratio=0.0,
                     verbose=False)
    best = max(measured, key=lambda n: (measured[n], -int(n[1:])))  # ties go to fewer MACs: the narrower one
    assert payload["selected"]["criterion"] == best and payload["selected"]["val_acc"] == measured[best]
    assert payload["protocol"]["total_steps"] == 0 and payload["protocol"]["rungs"] == []
    assert "zero-cost pick" in payload["selected"]["reason"]
    assert not list((tmp_path / "measured").glob("selection/*.keras"))  # nothing was fine-tuned
    selected = keras.models.load_model(tmp_path / "measured" / "selected.keras")
    assert weights_digest(selected) == weights_digest(candidates[best])

    # Given scores (the candidates stage's) are used as they are; a tie goes to the cheaper candidate.
    given = {"w4": 0.5, "w6": 0.7, "w8": 0.7}
    payload = select(candidates, train, val, workdir=tmp_path / "given", epochs=0, zero_cost_scores=given,
                     verbose=False)
    assert payload["selected"]["criterion"] == "w6" and payload["selected"]["val_acc"] == 0.7
    assert {r["criterion"]: r["zero_cost_acc"] for r in payload["candidates"]} == given


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        ({"candidates": {}}, "candidates must be a non-empty dict"),
        ({"candidates": {"a/b": None}}, "candidate name 'a/b' must use only letters"),
        ({"candidates": {"ok": 3}}, "candidate 'ok' is a int; pass a keras.Model"),
        ({"val_ds": None}, "val_ds is None; selection scores candidates on a validation split"),
        ({"epochs": -1}, r"epochs=-1 must be a number >= 0 \(--select_epochs"),
        ({"tie_tolerance": -0.1}, r"tie_tolerance=-0.1 must be in \[0, 1\)"),
        ({"zero_cost_keep": -1}, r"zero_cost_keep=-1 must be an integer >= 0"),
        ({"min_params_ratio": 1.5}, r"min_params_ratio=1.5 must be a number in \[0, 1\]"),
        ({"teacher": "/no/such/teacher.keras"}, r"cannot load the teacher /no/such/teacher.keras"),
        ({"train_ds": "repeat"}, "train_ds is infinite"),
    ],
)
def test_bad_arguments(tmp_path, data, change, message):
    kwargs = {"candidates": {"w4": tiny_candidate(4, "w4")}, "train_ds": data[0], "val_ds": data[1]}
    kwargs.update(change)
    if kwargs["train_ds"] == "repeat":
        kwargs["train_ds"] = data[0].repeat()
    candidates, train, val = kwargs.pop("candidates"), kwargs.pop("train_ds"), kwargs.pop("val_ds")
    with pytest.raises(MskdError, match=message):
        select(candidates, train, val, workdir=tmp_path, verbose=False, **kwargs)


def test_recalibrate_batchnorm_matches_numpy_batch_statistics():
    from mskd_tf.batchnorm import recalibrate_batchnorm

    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")
    outputs = keras.layers.BatchNormalization(name="bn")(conv(inputs))
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").moving_mean.assign(np.full(3, 50.0, np.float32))  # stale teacher statistics
    x = rng.normal(size=(3 * 8, 6, 6, 2)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(8)
    assert recalibrate_batchnorm(model, ds, 3) == 3
    features = conv(x).numpy().reshape(3, -1, 3)  # per batch, all positions
    expected_mean = features.mean(axis=1).mean(axis=0)
    expected_var = features.var(axis=1).mean(axis=0)
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.get_layer("bn").moving_variance.numpy(), expected_var, rtol=1e-3)
    assert model.get_layer("bn").momentum == 0.99  # restored
    # A list of batches (what selection draws once and reuses) gives the same statistics as the dataset.
    model.get_layer("bn").moving_mean.assign(np.full(3, 50.0, np.float32))
    assert recalibrate_batchnorm(model, list(ds), 3) == 3
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5)


def test_every_score_recalibrates_batchnorm_on_one_list_of_batches_drawn_once(tmp_path, data, monkeypatch):
    # Issue 14: a fresh pipeline per score cost a third of each CIFAR score; the batches are drawn once instead.
    from mskd_tf import candidate_training

    train, val = data
    seen, pipelines = [], []
    real = candidate_training.recalibrate_batchnorm
    monkeypatch.setattr(candidate_training, "recalibrate_batchnorm",
                        lambda model, batches, count: seen.append(batches) or real(model, batches, count))

    def fresh():
        pipelines.append(1)
        return train

    select(three_candidates(), fresh, val, workdir=tmp_path, epochs=2.0, lr=0.05, bn_recalibration_batches=2,
           verbose=False)
    assert len(seen) == 5  # 3 candidates scored at rung 1, 2 finalists at rung 2
    assert all(batches is seen[0] for batches in seen) and isinstance(seen[0], list) and len(seen[0]) == 2
    assert len(pipelines) == 1 + 5 + 1  # the first, one per candidate's training stretch, one for the scores


def test_a_score_on_one_replica_copies_nothing_and_gives_training_its_statistics_back(tmp_path, data, monkeypatch):
    # Issue 14: each candidate used to be copied twice (to train, to score), ~0.2 s each on CIFAR. On one
    # replica a file's model trains as loaded and is scored in place: the score must equal a copy's, and
    # training must continue from its own BatchNorm statistics, not the re-estimated ones.
    from mskd_tf import candidate_training, training
    from mskd_tf.keras_utils import with_synchronized_batchnorm

    train, val = data
    copies, checked = [], []
    real_copy, real_score = candidate_training.with_synchronized_batchnorm, candidate_training.CandidateTrainer._score
    monkeypatch.setattr(candidate_training, "with_synchronized_batchnorm",
                        lambda m, s: copies.append(m.name) or real_copy(m, s))

    def score_and_check(self, name, tuner):
        before = [v.numpy().copy() for v in tuner.model.variables]  # weights and moving statistics
        reference = with_synchronized_batchnorm(tuner.model, False)
        got = real_score(self, name, tuner)
        candidate_training.recalibrate_batchnorm(reference, self._recalibration_batches, 2)  # the batches the score drew
        assert got == training.accuracy(reference, val)
        for old, now in zip(before, tuner.model.variables):
            np.testing.assert_array_equal(old, now.numpy())
        images = next(iter(val))[0]  # the re-estimation really moved the statistics the score used
        assert not np.allclose(reference(images, training=False), tuner.model(images, training=False))
        checked.append(name)
        return got

    monkeypatch.setattr(candidate_training.CandidateTrainer, "_score", score_and_check)
    folder = tmp_path / "files"
    folder.mkdir()
    files = {}
    for name, model in three_candidates().items():
        files[name] = str(folder / f"{name}.keras")
        model.save(files[name])
    select(files, train, val, workdir=tmp_path / "from_files", epochs=2.0, lr=0.05, bn_recalibration_batches=2,
           verbose=False)
    assert len(checked) == 5 and copies == []  # 3 scores at rung 1, 2 at rung 2; no copy at all

    # A caller's models are copied once each to train, and are left exactly as they were.
    given = three_candidates()
    digests = {name: weights_digest(model) for name, model in given.items()}
    select(given, train, val, workdir=tmp_path / "from_models", epochs=2.0, lr=0.05, bn_recalibration_batches=2,
           verbose=False)
    assert sorted(copies) == sorted(given) and {n: weights_digest(m) for n, m in given.items()} == digests


def test_a_rung_ranks_on_the_scores_at_its_step_count():
    from mskd_tf.selection import _rank_key

    # In parallel mode a faster worker's candidate can be a rung ahead when a slower worker ranks rung 1:
    # its later (here lower) score must not be used, or the workers keep different survivors.
    ahead = {"criterion": "a", "macs": 10, "val_acc": 0.20, "scores": {"1": 0.23, "2": 0.20}}
    level = {"criterion": "b", "macs": 10, "val_acc": 0.21, "scores": {"1": 0.21}}
    assert sorted([level, ahead], key=lambda s: _rank_key(s, 1))[0]["criterion"] == "a"
    assert sorted([level, ahead], key=lambda s: _rank_key(s, 2))[0]["criterion"] == "b"
    failed = {"criterion": "c", "macs": 1, "val_acc": None, "scores": {}}
    assert sorted([failed, level], key=lambda s: _rank_key(s, 1))[-1]["criterion"] == "c"


def test_many_candidates_trigger_no_retracing_warning(tmp_path, data, caplog):
    # One traced step per candidate is by design (each has its own variables and shapes); TensorFlow counts
    # retracing per code object, so unless each candidate's functions are keyed apart, nine candidates that
    # train a few steps each look like one function retracing and flood the log (issue 14).
    candidates = {f"w{w}": tiny_candidate(w, f"w{w}", seed=w) for w in (2, 3, 4, 5, 6, 7, 8, 9, 10)}
    with caplog.at_level("WARNING", logger="tensorflow"):
        select(candidates, *data, workdir=tmp_path, epochs=3.0, lr=0.05, verbose=False)
    assert not [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]


def test_time_split_total_sums_every_candidate_and_rung_but_not_the_rung_number():
    payload = {"candidates": [
        {"time_split": [{"rung": 0, "train": 1.5, "score": 0.25}, {"rung": 1, "train": 2.0, "trace": 0.5}]},
        {"time_split": [{"rung": 0, "train": 1.0, "score": 0.75, "save": 0.1}]},
        {"error": "out of memory"},  # a candidate that never trained has no split
    ]}
    assert time_split_total(payload) == pytest.approx(
        {"train": 4.5, "score": 1.0, "trace": 0.5, "save": 0.1})


def test_with_a_pipeline_function_every_candidate_trains_on_the_same_batches(tmp_path):
    # Two copies of one network under two names: from a function that builds a fresh pipeline they see the
    # same batches and end identical; from one shared reshuffling pipeline the second copy met other orders.
    from mskd_tf import data as data_lib

    x, y = tiny_arrays(160)
    train_arrays, (val_x, val_y) = data_lib.Arrays(x[:128], y[:128]), (x[128:], y[128:])
    val = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(32)

    def fresh():
        return data_lib.train_pipeline(train_arrays, 32, augment=True, seed=0)

    curves = {}
    for mode, train in (("fresh", fresh), ("shared", fresh())):
        payload = select({"a": tiny_candidate(6, "a", seed=3), "b": tiny_candidate(6, "b", seed=3)}, train, val,
                         workdir=tmp_path / mode, epochs=3, successive_halving=False, bn_recalibration_batches=2,
                         lr=0.05, verbose=False)
        rows = {r["criterion"]: r for r in payload["candidates"]}
        assert rows["a"]["steps"] == rows["b"]["steps"] == 6  # 1.5 epochs of 4 batches each, crossing an epoch end
        curves[mode] = (rows["a"]["curve"], rows["b"]["curve"], rows["a"]["weights"], rows["b"]["weights"])
    a, b, weights_a, weights_b = curves["fresh"]
    assert a == b and weights_a == weights_b
    assert curves["shared"][2] != curves["shared"][3]  # the shared pipeline really gave them different batches


def test_select_defaults_are_the_pipelines(tmp_path, data):
    """A script calling select() with no options does what the pipeline does: the capacity pool, then the
    zero-cost pick, no training step."""
    defaults = {name: p.default for name, p in inspect.signature(selection.select).parameters.items()}
    cfg = Config()
    assert ({k: defaults[k] for k in ("epochs", "zero_cost_keep", "min_params_ratio", "successive_halving",
                                       "temperature", "alpha", "tie_tolerance", "bn_recalibration_batches",
                                       "optimizer", "weight_decay", "wait_timeout")}
            == {"epochs": cfg.select_epochs, "zero_cost_keep": cfg.zero_cost_keep,
                "min_params_ratio": cfg.min_params_ratio, "successive_halving": cfg.successive_halving,
                "temperature": cfg.temperature, "alpha": cfg.alpha, "tie_tolerance": cfg.tie_tolerance,
                "bn_recalibration_batches": cfg.bn_recalibration_batches, "optimizer": cfg.optimizer,
                "weight_decay": cfg.weight_decay, "wait_timeout": cfg.worker_timeout})
    payload = selection.select(three_candidates(), *data, workdir=tmp_path, verbose=False)
    assert payload["protocol"]["total_steps"] == 0
    assert payload["protocol"]["capacity_pool"]["min_params_ratio"] == cfg.min_params_ratio
    assert payload["selected"]["reason"].startswith("zero-cost pick")

