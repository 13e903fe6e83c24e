"""The ``select`` stage: choose one candidate on validation, by its zero-cost score or after fine-tuning.

MS-KD trusts no single pruning criterion: each candidate (a criterion x layer
allocation) is scored on the validation split (never on test).

Protocol (this project's choice; the paper's abstract gives none):

* ``epochs`` is the whole selection's cost: the optimizer steps of every
  candidate's fine-tuning together, in (fractional) epochs. The distill stage
  counts them against the student's budget, so MS-KD trains no longer than a
  single-criterion fine-tune of the same budget.
* A capacity pool (``min_params_ratio=r``): candidates with fewer than ``r`` x the
  median candidate's parameters are dropped before anything is measured. All
  candidates cost about the same MACs, so what separates them is the capacity
  each allocation kept: on the CIFAR-10 ResNet-20 benchmark (BENCHMARKS.md) the
  parameter count ranked trained candidates better than any score selection can
  afford, so the pool removes the small ones first. The reference is the median,
  not the largest: every uniform candidate has the same widths, and a floor under
  the largest would drop them all for a slightly larger global candidate.
* ``epochs=0`` (the pipeline's default): the pool's best zero-cost candidate
  (below) is chosen and nothing is trained; inside the pool the zero-cost score
  chose as well as fine-tuned selection did on that benchmark.
* A zero-cost first rung (``zero_cost_keep=k``): the candidates are ranked by
  validation accuracy before any step (on their BatchNorm-recalibrated clones,
  EagleEye's adaptive BN, Li et al. 2020) and only the best ``k`` are trained.
* Successive halving (Karnin et al., 2013) over the survivors: ``ceil(log2 n)``
  rungs, each spending the same share of the budget split evenly among its
  survivors; the better half (rounded up) survives each rung.
* With a ``teacher`` the candidates are fine-tuned with the distillation loss the
  winner will be trained with (``alpha`` CE + ``1 - alpha`` T^2 KL), so the choice
  matches how the student is finally trained; without one, with cross-entropy.
  The learning rate is constant so that candidates compare fairly at every rung.
* The choice is made among the candidates that reached the largest budget:
  the best validation accuracy wins, and accuracies within ``tie_tolerance`` of
  the best go to the candidate with the fewest MACs. The winner's fine-tuned
  weights are ``selected.keras``: its selection steps are not lost.
* Every segment of fine-tuning is checkpointed in ``workdir/selection/``
  (``<criterion>.keras`` + ``<criterion>.json``, atomic); a restarted selection
  continues from there and never redoes finished work.

Distribution: the candidates are built, compiled and trained under the given
``tf.distribute`` strategy; with several replicas BatchNormalization runs
synchronized so one step equals the single-device step. ``parallel=True``
instead gives each worker of ``TF_CONFIG`` its own share of the candidates
(each trains locally); the workers meet at file barriers in the shared workdir
and the chief writes the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import keras
import tensorflow as tf

from mskd_tf import flops, training
from mskd_tf.batchnorm import batchnorms, recalibrate_batchnorm
from mskd_tf.distribute import chief_values, is_chief, make_strategy
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import copy_with_weights, weights_digest, with_synchronized_batchnorm
from mskd_tf.training import make_optimizer
from mskd_tf.workdir import atomic_path

SELECTION_DIR = "selection"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------- public API


@training.fused_batchnorm()
def select(
    candidates: dict,
    train_ds,
    val_ds,
    *,
    workdir,
    epochs: float = 1.0,
    successive_halving: bool = True,
    zero_cost_keep: int = 0,
    zero_cost_scores: dict | None = None,
    candidate_costs: dict | None = None,
    min_params_ratio: float = 0.0,
    teacher=None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    tie_tolerance: float = 0.002,
    bn_recalibration_batches: int = 10,
    optimizer: str = "sgd",
    lr: float = 0.01,
    weight_decay: float = training.DEFAULT_WEIGHT_DECAY,
    strategy=None,
    parallel: bool = False,
    seed: int = 0,
    wait_timeout: float = 3600.0,
    wait_check=None,
    verbose: bool = True,
) -> dict:
    """Fine-tune the candidates, choose one, write ``selected.keras`` + ``selection.json``.

    Args:
      candidates: criterion name -> ``keras.Model`` or path of a ``.keras`` file
        (functional models that output logits or probabilities).
      train_ds, val_ds: finite ``tf.data`` datasets of ``(images, int labels)``
        batches; ``train_ds`` is one epoch (it should reshuffle itself). ``train_ds`` may
        also be a function returning a new such pipeline whose first pass is always the
        seed's first order (the stages pass one): then every candidate trains on the same
        batches and BatchNorm re-estimation uses the same ones, where one shared pipeline
        gives each candidate the order its turn comes to (on CIFAR one candidate scored
        61.7% trained first and 50.1% trained second after 66 steps).
      workdir: folder for ``selection/`` checkpoints and the final artifacts.
      epochs: what the whole selection may spend, in (fractional) epochs: the
        optimizer steps of all candidates together. 0: no fine-tuning; the capacity
        pool's candidate with the best validation accuracy before any step is chosen
        (the pipeline's default: on CIFAR-10 it matched the fine-tuned selection, BENCHMARKS.md).
      successive_halving: spend the budget in rungs that keep the better half;
        False splits it evenly over the candidates.
      zero_cost_keep: before any training keep only the best ``k`` candidates by
        validation accuracy as they are (0 = keep all).
      zero_cost_scores: those accuracies, where already measured (criterion ->
        accuracy, e.g. the candidates stage's); the others are measured here.
      candidate_costs: criterion -> ``{"macs": int, "params": int}`` where already
        counted (the candidates stage's rows); the others are counted here, which
        loads their files (~0.3 s each for a ResNet-20: 5.7 s of a CIFAR selection).
      min_params_ratio: first drop the candidates with fewer parameters than
        this fraction of the median candidate's (0 = keep all).
      teacher: fine-tune under the distillation loss from this model (a
        ``keras.Model`` or ``.keras`` path; ``None`` = cross-entropy).
      temperature, alpha: the distillation loss (see :mod:`mskd_tf.distill`).
      bn_recalibration_batches: before each score, re-estimate the candidate's BatchNorm
        statistics on this many training batches (training's are put back after; 0 = off).
      tie_tolerance: validation accuracies this close to the best are a tie,
        won by the candidate with the fewest MACs.
      optimizer, lr, weight_decay: see :func:`mskd_tf.training.make_optimizer`
        (constant learning rate: candidates must be comparable at every rung).
      strategy: a ``tf.distribute.Strategy``, a name for
        :func:`mskd_tf.distribute.make_strategy`, or None for the current one.
      parallel: candidate-parallel mode: worker ``i`` of ``TF_CONFIG`` trains the
        candidates ``i, i + N, ...`` locally; all meet at each rung.
      seed: seeds Keras before each candidate is built.
      wait_timeout: seconds a worker waits for the others in parallel mode.
      wait_check: called while waiting in parallel mode; raises to stop waiting (a dead worker).
      verbose: print one line per trained segment (chief only).

    Returns:
      The ``selection.json`` payload: ``candidates`` rows (criterion, macs,
      params, curve ``[[epoch, val_acc], ...]``, val_acc, budget_epochs, seconds)
      and ``selected`` (criterion, val_acc, macs, reason), plus ``protocol``.
    """
    _check_arguments(candidates, val_ds, epochs, tie_tolerance)
    if not isinstance(zero_cost_keep, int) or zero_cost_keep < 0:
        raise MskdError(f"select: zero_cost_keep={zero_cost_keep!r} must be an integer >= 0 (0 = keep all).")
    if not isinstance(min_params_ratio, (int, float)) or not 0.0 <= min_params_ratio <= 1.0:
        raise MskdError(f"select: min_params_ratio={min_params_ratio!r} must be a number in [0, 1] (0 = keep all).")
    with training.seeded(seed):  # reproducible, and the caller's RNGs are given back
        strategy = _resolve_strategy(strategy, parallel)
        rank, workers = _worker_rank() if parallel else (0, 1)
        chief = is_chief()
        fresh_train = train_ds if callable(train_ds) else None
        if fresh_train is not None:
            train_ds = fresh_train()
        steps_per_epoch = training.steps_per_epoch(train_ds, "select: train_ds")
        total_budget = training.budget_steps(epochs, steps_per_epoch)
        names = list(candidates)
        teacher = _load_teacher(teacher, strategy)
        settings = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                    "steps_per_epoch": steps_per_epoch, "bn_recalibration_batches": bn_recalibration_batches,
                    "loss": "ce" if teacher is None else "kd",
                    # Part of what a resumed record must match: the batches a candidate trained on.
                    "batches": "shared pipeline" if fresh_train is None else "fresh pipeline per candidate",
                    **({} if teacher is None else {"temperature": temperature, "alpha": alpha,
                                                   "teacher": weights_digest(teacher)})}
        trainer = _CandidateTrainer(
            candidates, train_ds, val_ds, workdir=Path(workdir), settings=settings, strategy=strategy,
            steps_per_epoch=steps_per_epoch, writes=parallel or chief, verbose=verbose and chief, rank=rank,
            teacher=teacher, fresh_train=fresh_train,
        )

        alive, zero_cost, capacity, costs = names, None, None, {}

        def cost(name):  # each candidate file is loaded at most once for both pools
            if name not in costs:
                given = (candidate_costs or {}).get(name)
                costs[name] = (flops.Cost(macs=int(given["macs"]), params=int(given["params"]), per_layer={})
                               if given else flops.count(trainer._source(name)))
            return costs[name]

        if min_params_ratio > 0 and len(names) > 1:
            params = {n: int(cost(n).params) for n in names}
            alive = capacity_pool(params, min_params_ratio)
            capacity = {"min_params_ratio": float(min_params_ratio), "params": params, "kept": alive}
            if verbose and chief and len(alive) < len(names):
                print(f"select: capacity pool (>= {min_params_ratio:g} x the median candidate's "
                      f"{statistics.median(params.values()):.0f} parameters) keeps {', '.join(alive)}", flush=True)
        # epochs=0: no fine-tuning at all; the zero-cost rung alone picks (the rung below keeps one).
        zero_cost_only = epochs == 0
        # Never spend more than the budget: keep no more candidates than it can give one step per rung.
        requested = 1 if zero_cost_only else min(zero_cost_keep or len(alive), len(alive))
        keep_at_most = requested
        while keep_at_most > 1 and _smallest_plan_cost(keep_at_most, successive_halving) > total_budget:
            keep_at_most -= 1
        if keep_at_most < requested and verbose and chief:
            print(f"select: a budget of {total_budget} steps can train at most {keep_at_most} candidates", flush=True)
        zero_cost_keep = keep_at_most if keep_at_most < len(alive) else 0
        if zero_cost_keep and len(alive) > zero_cost_keep:
            scores, macs = {n: (zero_cost_scores or {}).get(n) for n in alive}, {}
            for n in alive:
                macs[n] = cost(n).macs  # ties go to the cheaper candidate, as in `choose`
                if scores[n] is None:
                    scores[n] = training.accuracy(trainer._source(n), val_ds, "select: val_ds")
            # Lock-step workers must keep the same candidates: everyone takes the chief's numbers.
            scores = dict(zip(alive, chief_values(strategy, [scores[n] for n in alive])))
            alive = sorted(alive, key=lambda n: (-scores[n], macs[n], n))[:zero_cost_keep]
            zero_cost = {"scores": {n: float(v) for n, v in scores.items()}, "kept": alive}
            trainer.accuracy_before_training.update(zero_cost["scores"])
            if verbose and chief:
                print(f"select: zero-cost rung (validation accuracy before any step) keeps {', '.join(alive)}",
                      flush=True)
        if zero_cost_only:
            rungs = []
        elif successive_halving:
            rungs = halving_rungs(len(alive), total_budget)
        else:
            rungs = [(len(alive), _even_share(total_budget, len(alive)))]
        # Parallel mode deals the survivors of the pools out in turn, and each keeps its worker for every rung
        # (its optimizer state lives there); dealing by position in the full list could give one worker all.
        owner = {n: i % workers for i, n in enumerate(alive)}
        protocol_rungs = []
        for index, (_, target) in enumerate(rungs):
            mine = [n for n in alive if not parallel or owner[n] == rank]
            for name in mine:
                trainer.train_to(name, target, rung=f"{index + 1}/{len(rungs)}")
            if parallel:
                trainer.wait_for(alive, target, timeout=wait_timeout, workers=workers, check=wait_check)
            ranked = sorted(alive, key=lambda n: _rank_key(trainer.state[n], target))
            keep = ranked[: math.ceil(len(alive) / 2)] if index < len(rungs) - 1 else ranked
            protocol_rungs.append({"budget_epochs": round(target / steps_per_epoch, 4), "candidates": alive,
                                   "kept": keep})
            trainer.forget([n for n in alive if n not in keep])
            alive = keep

        if zero_cost_only:
            scores = zero_cost["scores"] if zero_cost else (zero_cost_scores or {})  # no zero_cost: one candidate
            chosen = {"criterion": alive[0], "val_acc": scores.get(alive[0]), "macs": cost(alive[0]).macs, "steps": 0}
            reason = ("zero-cost pick: the best validation accuracy before any training step, no fine-tuning"
                      if zero_cost else "the only candidate")
        else:
            chosen, reason = choose([trainer.state[n] for n in alive], tie_tolerance)
        spent = sum(trainer.state[n]["steps"] for n in names if trainer.state[n] is not None)
        rows = []
        for n in names:
            row = trainer.row(n) if trainer.state[n] is not None else {"criterion": n, "steps": 0, "val_acc": None}
            if capacity:
                row["params_kept"] = n in capacity["kept"]
            if zero_cost and n in zero_cost["scores"]:
                row["zero_cost_acc"] = zero_cost["scores"][n]
            rows.append(row)
        payload = {
            "candidates": rows,
            "selected": {"criterion": chosen["criterion"], "val_acc": chosen["val_acc"], "macs": chosen["macs"],
                         "steps": chosen["steps"], "reason": reason},
            "protocol": {
                "successive_halving": successive_halving,
                "epochs": epochs,
                "steps_per_epoch": steps_per_epoch,
                "budget_steps": total_budget,
                "capacity_pool": capacity,
                "zero_cost": zero_cost,
                "loss": settings["loss"],
                "rungs": protocol_rungs,
                "total_steps": spent,
                "spent_epochs": round(spent / steps_per_epoch, 4),
                "tie_tolerance": tie_tolerance,
                "replicas": strategy.num_replicas_in_sync,
                "parallel_workers": workers,
                "split": "validation",
            },
        }
        if chief:
            write_selection(workdir, payload, trainer.sources[chosen["criterion"]] if zero_cost_only
                            else trainer.checkpoint(chosen["criterion"]))
        if verbose and chief:
            print(f"select: {chosen['criterion']} ({reason}); {spent} optimizer steps "
                  f"({payload['protocol']['spent_epochs']:g} epochs) spent", flush=True)
        return payload


def capacity_pool(params: dict, min_params_ratio: float) -> list:
    """The names in ``params`` (name -> parameter count) with >= ``min_params_ratio`` x the median count."""
    floor = min_params_ratio * statistics.median(params.values())
    return [name for name, count in params.items() if count >= floor]


def _smallest_plan_cost(count: int, successive_halving: bool) -> int:
    """Steps a plan over ``count`` candidates spends at one step per candidate and rung."""
    if not successive_halving:
        return count
    return sum(survivors for survivors, _ in halving_rungs(count, 0))


def _even_share(total_steps: int, count: int) -> int:
    return max(1, total_steps // count)


def _load_teacher(teacher, strategy):
    """The teacher as a model whose variables the strategy can read (or None)."""
    if teacher is None:
        return None
    if not isinstance(teacher, keras.Model):
        try:
            teacher = keras.models.load_model(teacher, compile=False)
        except Exception as exc:  # any unreadable file: name it
            raise MskdError(f"select: cannot load the teacher {teacher} as a Keras model ({exc}).") from exc
    if strategy is not tf.distribute.get_strategy():
        with strategy.scope():
            return copy_with_weights(teacher)
    return teacher


def time_split_total(payload: dict) -> dict:
    """Seconds per part (setup, train, trace, score, save) summed over every candidate and rung of a
    selection payload (``select``'s return value / selection.json); the rest of its wall time was outside
    the candidates (loading, the pools)."""
    total = {}
    for row in payload["candidates"]:
        for rung in row.get("time_split", []):
            for key, value in rung.items():
                if key != "rung":
                    total[key] = total.get(key, 0.0) + value
    return total


def halving_rungs(num_candidates: int, total_steps: int) -> list[tuple[int, int]]:
    """Successive-halving plan: ``[(survivors, cumulative steps each), ...]`` per rung.

    ``ceil(log2 n)`` rungs; every rung spends ``total_steps / rungs`` steps split
    evenly over its ``n_k`` survivors (``n_{k+1} = ceil(n_k / 2)``), at least one
    step each, so the whole plan spends about ``total_steps``. One candidate gets
    all of ``total_steps``.

    >>> halving_rungs(9, 144)
    [(9, 4), (5, 11), (3, 23), (2, 41)]
    """
    if num_candidates < 1:
        raise MskdError("there are no candidates to select from.")
    if num_candidates == 1:
        return [(1, total_steps)]
    count = math.ceil(math.log2(num_candidates))
    per_rung = total_steps / count
    plan, survivors, cumulative = [], num_candidates, 0
    for _ in range(count):
        cumulative += max(1, int(per_rung / survivors))
        plan.append((survivors, cumulative))
        survivors = math.ceil(survivors / 2)
    return plan


def choose(rows: list[dict], tie_tolerance: float) -> tuple[dict, str]:
    """The best row by ``val_acc``; rows within ``tie_tolerance`` of it go to the fewest ``macs``.

    Returns ``(row, reason)``. Rows whose fine-tuning failed (``val_acc`` None) never win.
    """
    usable = [r for r in rows if r.get("val_acc") is not None]
    if not usable:
        failures = "; ".join(f"{r['criterion']}: {r.get('error')}" for r in rows)
        raise MskdError(f"select: every candidate failed to fine-tune ({failures}). Lower --finetune_lr.")
    best = max(usable, key=lambda r: (r["val_acc"], -r["macs"]))
    tied = [r for r in usable if r["val_acc"] >= best["val_acc"] - tie_tolerance]
    winner = min(tied, key=lambda r: (r["macs"], -r["val_acc"], r["criterion"]))
    budget = f"after {winner['budget_epochs']:g} epochs"
    if winner is best:
        others = len(usable) - 1
        reason = f"highest validation accuracy {winner['val_acc']:.4f} {budget}"
        reason += f" among {others + 1} finalists" if others else " (the only finalist)"
    else:
        reason = (f"validation accuracy {winner['val_acc']:.4f} {budget} is within tie_tolerance={tie_tolerance:g} "
                  f"of the best ({best['criterion']}: {best['val_acc']:.4f}) with fewer MACs "
                  f"({winner['macs'] / 1e6:.3f}M vs {best['macs'] / 1e6:.3f}M)")
    return winner, reason


def write_selection(workdir, payload: dict, selected) -> None:
    """Write ``workdir/selected.keras`` (a model or a ``.keras`` path) and ``workdir/selection.json`` atomically."""
    workdir = Path(workdir)
    model = keras.models.load_model(selected, compile=False) if isinstance(selected, (str, Path)) else selected
    # Checkpoints trained on several replicas carry synchronized BatchNorm (a training aid); the artifact is plain.
    plain = _with_batchnorm_sync(model, False) if any(bn.synchronized for bn in batchnorms(model)) else model
    _atomic(workdir / "selected.keras", plain.save)
    _atomic(workdir / "selection.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


class Finetuner:
    """Train and evaluate one classifier under a ``tf.distribute`` strategy with a custom loop.

    Exact under replicas: each replica's summed cross-entropy is divided by the
    *global* number of examples in the step (all-reduced, so uneven last batches
    are right too), and the optimizer sums the replicas' gradients. Accuracy is
    counted, not averaged. (Keras 3 ``fit``/``evaluate`` fail under
    ``MultiWorkerMirroredStrategy``, keras-team/keras#20585, so this loop serves
    every strategy alike.) ``model`` and ``optimizer`` must belong to ``strategy``.
    """

    def __init__(self, model, optimizer, strategy=None, *, from_logits: bool = True, teacher=None,
                 temperature: float = 4.0, alpha: float = 0.5):
        from mskd_tf.distill import LogitsTap

        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.from_logits = from_logits
        # With a teacher the loss is the Distiller's: alpha CE + (1 - alpha) T^2 KL.
        self.teacher = LogitsTap(teacher, "teacher") if teacher is not None else None
        self.temperature, self.alpha = float(temperature), float(alpha)
        self._train_step = training.per_instance_function(self._distributed_train_step)
        self._eval_step = training.per_instance_function(self._distributed_eval_step)
        # The train step's first two calls: the first traces it, so the difference is the tracing time.
        self.first_step_seconds = self.second_step_seconds = None

    def train(self, train_ds, steps: int, *, start: int = 0, steps_per_epoch: int | None = None) -> float | None:
        """Train ``steps`` batches of ``train_ds`` beginning at batch ``start`` (counted across epochs).

        ``start`` = 10 on a 4-batch dataset begins at batch 2 of a fresh pass, so a
        resumed fine-tune continues where it stopped. Returns None, or the first
        non-finite loss (training stops there).
        """
        _, bad_loss = training.run_steps(self._timed_train_step, train_ds, steps, strategy=self.strategy, start=start,
                                         batches_per_epoch=steps_per_epoch, what="select: train_ds")
        return bad_loss

    def _timed_train_step(self, batch):
        if self.second_step_seconds is not None:
            return self._train_step(batch)
        began = time.perf_counter()
        loss = float(self._train_step(batch))
        if self.first_step_seconds is None:
            self.first_step_seconds = time.perf_counter() - began
        else:
            self.second_step_seconds = time.perf_counter() - began
        return loss

    def accuracy(self, dataset) -> float:
        """Top-1 accuracy over all of ``dataset``."""
        correct = total = 0
        for batch in self.strategy.experimental_distribute_dataset(dataset):
            right, count = self._eval_step(batch)
            correct, total = correct + int(right), total + int(count)
        if total == 0:
            raise MskdError("select: the validation dataset is empty.")
        return correct / total

    def _distributed_train_step(self, batch):
        per_replica = self.strategy.run(self._replica_train_step, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _replica_train_step(self, images, labels):
        context = tf.distribute.get_replica_context()
        labels = tf.reshape(labels, [-1])
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.size(labels), tf.float32))
        with tf.GradientTape() as tape:
            outputs = self.model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=self.from_logits)
            if self.teacher is not None:
                from mskd_tf.distill import kd_per_example

                teacher_logits, _ = self.teacher(images, training=False)
                logits = outputs if self.from_logits else tf.math.log(tf.maximum(outputs, 1e-30))
                per_example = self.alpha * per_example + (1.0 - self.alpha) * kd_per_example(
                    teacher_logits, logits, self.temperature)
            loss = tf.reduce_sum(per_example) / tf.maximum(global_count, 1.0)
            if self.model.losses:  # regularizers: each replica adds its share
                loss += tf.add_n(self.model.losses) / context.num_replicas_in_sync
        gradients = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss

    def _distributed_eval_step(self, batch):
        right, count = self.strategy.run(self._replica_eval_step, args=batch)
        total = lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
        return total(right), total(count)

    def _replica_eval_step(self, images, labels):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        predicted = tf.argmax(self.model(images, training=False), axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(predicted == labels, tf.int64)), tf.size(labels, out_type=tf.int64)


# ----------------------------------------------------------------------------- the work


class _CandidateTrainer:
    """Holds each candidate's state (the per-candidate JSON) and its live model."""

    def __init__(self, candidates, train_ds, val_ds, *, workdir, settings, strategy, steps_per_epoch, writes,
                 verbose, rank, teacher=None, fresh_train=None):
        self.sources = candidates
        self.teacher = teacher
        self.train_ds, self.val_ds = train_ds, val_ds
        self.fresh_train = fresh_train  # () -> a new pipeline: the same batches for every candidate
        self.folder = workdir / SELECTION_DIR
        self.settings, self.strategy = settings, strategy
        self.steps_per_epoch, self.writes, self.verbose, self.rank = steps_per_epoch, writes, verbose, rank
        self.sync_bn = strategy.num_replicas_in_sync > 1
        self.models: dict[str, Finetuner] = {}
        self._score_copies: dict[str, keras.Model] = {}  # candidate -> the plain copy it is scored on
        self._recalibration_batches: list | None = None  # built at the first score, reused by every later one
        # Validation accuracy at step 0 where the zero-cost rung already measured it: not measured twice.
        self.accuracy_before_training: dict[str, float] = {}
        self.digests = {name: _source_digest(source) for name, source in candidates.items()}
        # Read once, before any collective step, so every worker starts from the same state.
        self.state = {name: self._read_state(name) for name in candidates}

    # ------------------------------------------------------------------ files

    def checkpoint(self, name) -> Path:
        return self.folder / f"{name}.keras"

    def _record(self, name) -> Path:
        return self.folder / f"{name}.json"

    def _read_state(self, name):
        try:
            state = json.loads(self._record(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if state.get("settings") != self.settings or state.get("source") != self.digests[name]:
            return None  # trained with other settings or from another candidate: start over
        if not state.get("error") and not self.checkpoint(name).exists():
            return None
        return state

    def _save_checkpoint(self, name, model):
        if self.writes:
            _atomic(self.checkpoint(name), model.save)

    def _save_record(self, name):
        """The candidate's JSON, written once its state is final: in parallel mode another worker takes a
        record at the rung's step count as finished (so it comes after the checkpoint, and only once)."""
        if self.writes:
            _atomic(self._record(name), lambda tmp: Path(tmp).write_text(json.dumps(self.state[name], indent=2)))

    def row(self, name) -> dict:
        state = self.state[name]
        keys = ("criterion", "macs", "params", "curve", "val_acc", "budget_epochs", "seconds", "time_split", "steps",
                "weights", "worker", "error")
        return {k: state[k] for k in keys if k in state}

    def forget(self, names):
        for name in names:
            self.models.pop(name, None)
            self._score_copies.pop(name, None)

    # ------------------------------------------------------------------ training

    def _source(self, name) -> keras.Model:
        source = self.sources[name]
        if isinstance(source, keras.Model):
            return source
        try:
            return keras.models.load_model(source, compile=False)
        except Exception as exc:  # any unreadable file: name it
            raise MskdError(f"candidate {name!r}: cannot load {source} as a Keras model ({exc}); re-run the "
                            "candidates stage or pass a keras.Model.") from exc

    def _live_model(self, name) -> Finetuner:
        """The candidate's :class:`Finetuner` under the strategy, at ``state['steps']`` steps."""
        if name in self.models:
            return self.models[name]
        state = self.state[name]
        resumed = state is not None and state["steps"] > 0
        # A model loaded here from a file is this selection's own: on one replica it trains as loaded (made in the
        # strategy's scope). A caller's keras.Model is copied, never trained in place, and so is every model that
        # several replicas train with synchronized BatchNorm. (The copy cost ~0.2 s a candidate, issue 14.)
        own = resumed or not isinstance(self.sources[name], keras.Model)
        with self.strategy.scope() if own and not self.sync_bn else contextlib.nullcontext():
            start = keras.models.load_model(self.checkpoint(name), compile=resumed) if resumed else self._source(name)
        keras.utils.set_random_seed(self.settings["seed"])  # inside select's seeded block: restored on exit
        with self.strategy.scope():
            as_loaded = own and not self.sync_bn and not any(bn.synchronized for bn in batchnorms(start))
            model = start if as_loaded else _with_batchnorm_sync(start, self.sync_bn)
            optimizer = make_optimizer(self.settings["optimizer"], self.settings["lr"], total_steps=1,
                                       schedule="constant", weight_decay=self.settings["weight_decay"])
            optimizer.build(model.trainable_variables)
            if resumed and start.optimizer is not None and start.optimizer.built:
                for mine, saved in zip(optimizer.variables, start.optimizer.variables):
                    mine.assign(saved)  # momentum and step count continue where they stopped
            # Compiled only so that checkpoints carry the optimizer state.
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tuner = Finetuner(model, optimizer, self.strategy, from_logits=not training.outputs_probabilities(start),
                          teacher=self.teacher, temperature=self.settings.get("temperature", 4.0),
                          alpha=self.settings.get("alpha", 0.5))
        if state is None:
            cost = flops.count(start)
            self.state[name] = {
                "criterion": name, "macs": int(cost.macs), "params": int(cost.params),
                "curve": [[0.0, self.accuracy_before_training.get(name) or tuner.accuracy(self.val_ds)]],
                "val_acc": None, "budget_epochs": 0.0,
                "seconds": 0.0, "steps": 0, "settings": self.settings, "source": self.digests[name],
                "worker": self.rank,
            }
        self.models[name] = tuner
        return tuner

    def train_to(self, name, target_steps, rung=""):
        """Fine-tune ``name`` until it has seen ``target_steps`` batches, evaluating at every epoch end."""
        state = self.state[name]
        if state is not None and (state["steps"] >= target_steps or state.get("error")):
            return  # finished earlier (this run or a previous one)
        began = time.perf_counter()
        fresh = name not in self.models
        tuner = self._live_model(name)
        state = self.state[name]
        # Where the rung's seconds go (issue 14): setup = load + first validation, trace = the train
        # step's first call beyond one ordinary step, score = BatchNorm re-estimation + validation.
        split = {"setup": time.perf_counter() - began, "train": 0.0, "trace": 0.0, "score": 0.0, "save": 0.0}
        while state["steps"] < target_steps:
            epoch_end = (state["steps"] // self.steps_per_epoch + 1) * self.steps_per_epoch
            chunk = min(target_steps, epoch_end) - state["steps"]
            clock = time.perf_counter()
            if self.fresh_train is not None:  # batch k of every candidate's run is the same batch
                stream = self.fresh_train().repeat().skip(state["steps"]).take(chunk)
                bad_loss = tuner.train(stream, chunk, steps_per_epoch=chunk)
            else:
                bad_loss = tuner.train(self.train_ds, chunk, start=state["steps"], steps_per_epoch=self.steps_per_epoch)
            split["train"] += time.perf_counter() - clock
            state["steps"] += chunk
            state["budget_epochs"] = round(state["steps"] / self.steps_per_epoch, 4)
            if bad_loss is not None:
                state["val_acc"] = None
                state["error"] = f"the loss became {bad_loss} within {state['steps']} steps"
                self.forget([name])
                break
            clock = time.perf_counter()
            state["val_acc"] = self._score(name, tuner)
            state.setdefault("scores", {})[str(state["steps"])] = state["val_acc"]  # JSON keys: strings
            split["score"] += time.perf_counter() - clock
            state["curve"].append([state["budget_epochs"], state["val_acc"]])
        if fresh and tuner.second_step_seconds is not None:
            # One ordinary step's time stays in "train"; the rest of the first call was tracing.
            split["trace"] = max(0.0, tuner.first_step_seconds - tuner.second_step_seconds)
            split["train"] -= split["trace"]
        if not state.get("error"):
            state["weights"] = weights_digest(tuner.model)  # each worker's copy; equal when synchronous
        clock = time.perf_counter()
        if not state.get("error"):
            self._save_checkpoint(name, tuner.model)
        split["save"] = time.perf_counter() - clock
        spent = time.perf_counter() - began
        state["seconds"] = round(state["seconds"] + spent, 3)
        state.setdefault("time_split", []).append({"rung": rung, **{k: round(v, 2) for k, v in split.items()}})
        self._save_record(name)
        if self.verbose:
            result = state.get("error") or f"val acc {100 * state['val_acc']:.2f}%"
            parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items())
            print(f"select: rung {rung}: {name} at {state['budget_epochs']:g} epochs: {result} "
                  f"({spent:.1f} s this rung: {parts})", flush=True)

    def _score(self, name, tuner) -> float:
        """Validation accuracy after re-estimating BatchNorm statistics (no optimizer step).

        At a constant, fairly high learning rate the moving averages trail the weights, and a
        rung would compare how stale each candidate's statistics are rather than how good it is.
        Training's own statistics are put back after the validation pass (on several replicas the
        recalibration runs on a plain copy instead), so the trained model, its checkpoint and every
        replica stay exactly as training left them (and equal under any strategy).
        """
        batches = self.settings.get("bn_recalibration_batches", 0)
        if not batches:
            return tuner.accuracy(self.val_ds)
        if self._recalibration_batches is None:
            # The same batches for every candidate and rung, drawn once: with a fresh pipeline per score the 8
            # re-estimations of a CIFAR selection_cost run took 6.4 s, drawn once 4.4 s; 10 batches of 128 are 16 MB.
            source = self.fresh_train() if self.fresh_train is not None else self.train_ds
            self._recalibration_batches = list(source.take(batches))
        if not self.sync_bn:
            # One replica: re-estimate on the trained model itself and put training's statistics back after the
            # validation pass; the same numbers as on a copy, without the copy (~0.2 s a candidate, issue 14).
            layers = batchnorms(tuner.model)
            kept = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
            try:
                recalibrate_batchnorm(tuner.model, self._recalibration_batches, batches)
                accuracy = training.accuracy(tuner.model, self.val_ds, "select: val_ds")
            finally:
                for bn, (mean, variance) in zip(layers, kept):
                    bn.moving_mean.assign(mean)
                    bn.moving_variance.assign(variance)
        else:
            # Several replicas: the model's variables are mirrored and its BatchNorm synchronized; score a plain
            # copy, one per candidate so its traced functions serve every rung.
            copy = self._score_copies.get(name)
            if copy is None:
                copy = self._score_copies[name] = _with_batchnorm_sync(tuner.model, False)
            else:
                copy.set_weights(tuner.model.get_weights())
            recalibrate_batchnorm(copy, self._recalibration_batches, batches)
            accuracy = training.accuracy(copy, self.val_ds, "select: val_ds")
        # Scored outside the strategy, on this worker's own batches: lock-step workers take the chief's number,
        # or they rank differently and the next rung's collectives mix different candidates (issue 16).
        return chief_values(self.strategy, [accuracy])[0]

    def wait_for(self, names, target_steps, *, timeout, workers, check=None):
        """Block until every candidate in ``names`` has a record at ``target_steps`` (parallel mode)."""
        order = list(self.sources)
        deadline = time.monotonic() + timeout
        while True:
            missing = []
            for name in names:
                state = self._read_state(name)
                if state is not None and (state["steps"] >= target_steps or state.get("error")):
                    self.state[name] = state
                else:
                    missing.append(name)
            if not missing:
                return
            if check is not None:
                check()
            if time.monotonic() > deadline:
                owners = ", ".join(f"{n} (worker {order.index(n) % workers})" for n in missing)
                raise MskdError(f"select: waited {timeout:g} s for candidates trained by other workers: {owners}. "
                                "Check that every worker runs with the same flags and a shared --workdir.")
            time.sleep(0.5)


# ----------------------------------------------------------------------------- helpers


def _rank_key(state, steps):
    """Sort key at a rung of ``steps``: best validation accuracy there first, then fewer MACs; failed ones last.

    The score *at the rung*, not the latest: in parallel mode a faster worker's candidate may already be a
    rung further when a slower worker ranks this one, and every worker must rank on the same numbers.
    """
    failed = state.get("val_acc") is None
    scores = {int(k): v for k, v in state.get("scores", {}).items() if int(k) <= steps}
    accuracy = scores[max(scores)] if scores else state.get("val_acc")
    return (failed, -(accuracy or 0.0), state["macs"], state["criterion"])


def _check_arguments(candidates, val_ds, epochs, tie_tolerance):
    if not isinstance(candidates, dict) or not candidates:
        raise MskdError("select: candidates must be a non-empty dict of criterion name -> keras.Model or .keras path.")
    for name, source in candidates.items():
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise MskdError(f"select: candidate name {name!r} must use only letters, digits, '_', '-' and '.' "
                            "(it names checkpoint files).")
        if not isinstance(source, (keras.Model, str, os.PathLike)):
            raise MskdError(f"select: candidate {name!r} is a {type(source).__name__}; pass a keras.Model or the "
                            "path of a .keras file.")
    if val_ds is None:
        raise MskdError("select: val_ds is None; selection scores candidates on a validation split, never on test.")
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs >= 0):
        raise MskdError(f"select: epochs={epochs!r} must be a number >= 0 (--select_epochs: what the whole "
                        "selection may spend; 0.5 = half an epoch; 0 = the zero-cost pick, no fine-tuning).")
    if not (isinstance(tie_tolerance, (int, float)) and 0 <= tie_tolerance < 1):
        raise MskdError(f"select: tie_tolerance={tie_tolerance!r} must be in [0, 1) (an accuracy difference).")


def _resolve_strategy(strategy, parallel):
    if isinstance(strategy, str):
        strategy = make_strategy(strategy)
    strategy = strategy or tf.distribute.get_strategy()
    if parallel and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise MskdError("select: parallel=True trains each worker's candidates locally; use a local strategy "
                        "(default, one_device, mirrored) with it, not multi_worker.")
    return strategy


def _worker_rank() -> tuple[int, int]:
    """(this worker's rank, number of workers) from ``TF_CONFIG``: chief first, then workers."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return 0, 1
    members = [("chief", i) for i in range(len(cluster.get("chief", [])))]
    members += [("worker", i) for i in range(len(cluster.get("worker", [])))]
    me = (resolver.task_type, int(resolver.task_id or 0))
    if me not in members:
        raise MskdError(f"TF_CONFIG: task {me[0]}:{me[1]} is not a chief or worker of the cluster {cluster}; "
                        "candidate-parallel selection runs on chief and worker tasks.")
    return members.index(me), len(members)


def _with_batchnorm_sync(model, synchronized: bool) -> keras.Model:
    """A copy of ``model`` with BatchNorm ``synchronized`` set (see :func:`keras_utils.with_synchronized_batchnorm`)."""
    return with_synchronized_batchnorm(model, synchronized)


def _source_digest(source) -> str:
    """Identifies a candidate: its file's bytes, or its weights; a changed candidate restarts."""
    if isinstance(source, keras.Model):
        return weights_digest(source)
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise MskdError(f"select: cannot read candidate file {source} ({exc.strerror}); re-run the "
                        "candidates stage.") from None


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))

