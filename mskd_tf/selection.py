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

import json
import math
import os
import re
import statistics
from pathlib import Path

import keras
import tensorflow as tf

from mskd_tf import flops, training
from mskd_tf.batchnorm import batchnorms
from mskd_tf.candidate_training import CandidateTrainer, save_atomic
from mskd_tf.config import Config
from mskd_tf.distribute import chief_values, is_chief, make_strategy, worker_rank
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import copy_with_weights, weights_digest, with_synchronized_batchnorm

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# select()'s defaults are the pipeline's: a script calling it does what `python -m mskd_tf.run` does.
_PIPELINE = Config()


@training.fused_batchnorm()
def select(
    candidates: dict,
    train_ds,
    val_ds,
    *,
    workdir,
    epochs: float = _PIPELINE.select_epochs,
    successive_halving: bool = _PIPELINE.successive_halving,
    zero_cost_keep: int = _PIPELINE.zero_cost_keep,
    zero_cost_scores: dict | None = None,
    candidate_costs: dict | None = None,
    min_params_ratio: float = _PIPELINE.min_params_ratio,
    teacher=None,
    temperature: float = _PIPELINE.temperature,
    alpha: float = _PIPELINE.alpha,
    tie_tolerance: float = _PIPELINE.tie_tolerance,
    bn_recalibration_batches: int = _PIPELINE.bn_recalibration_batches,
    optimizer: str = _PIPELINE.optimizer,
    lr: float | None = None,
    weight_decay: float = _PIPELINE.weight_decay,
    strategy=None,
    parallel: bool = False,
    seed: int = _PIPELINE.seed,
    wait_timeout: float = _PIPELINE.worker_timeout,
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
        (the default: on CIFAR-10 it matched the fine-tuned selection, BENCHMARKS.md).
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
        (constant learning rate: candidates must be comparable at every rung). ``lr=None``: the pipeline's,
        ``Config.finetune_lr``, x ``Config.kd_lr_scale`` with a ``teacher``.

    Every default is the pipeline's (:class:`mskd_tf.Config`'s): ``epochs=0`` picks by the zero-cost
    score without training; pass ``epochs`` > 0 for fine-tuned selection.
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
    if lr is None:
        lr = _PIPELINE.finetune_rate(kd=teacher is not None)
    with training.seeded(seed):  # reproducible, and the caller's RNGs are given back
        strategy = _resolve_strategy(strategy, parallel)
        rank, workers = worker_rank() if parallel else (0, 1)
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
        trainer = CandidateTrainer(
            candidates, train_ds, val_ds, workdir=Path(workdir), settings=settings, strategy=strategy,
            steps_per_epoch=steps_per_epoch, writes=parallel or chief, verbose=verbose and chief, rank=rank,
            teacher=teacher, fresh_train=fresh_train,
        )

        costs = {}

        def cost(name):  # each candidate file is loaded at most once for both pools
            if name not in costs:
                given = (candidate_costs or {}).get(name)
                costs[name] = (flops.Cost(macs=int(given["macs"]), params=int(given["params"]), per_layer={})
                               if given else flops.count(trainer._source(name)))
            return costs[name]

        say = verbose and chief
        alive, capacity = _capacity_step(names, cost, min_params_ratio, say)
        # epochs=0: no fine-tuning at all; the zero-cost rung alone picks (it keeps one).
        zero_cost_only = epochs == 0
        keep = _zero_cost_keep(alive, zero_cost_keep, zero_cost_only, successive_halving, total_budget, say)
        zero_cost = None
        if keep:
            alive, zero_cost = _zero_cost_step(alive, keep, trainer, cost, zero_cost_scores, val_ds, strategy, say)
        if zero_cost_only:
            rungs = []
        elif successive_halving:
            rungs = halving_rungs(len(alive), total_budget)
        else:
            rungs = [(len(alive), _even_share(total_budget, len(alive)))]
        alive, protocol_rungs = _train_rungs(trainer, alive, rungs, steps_per_epoch, parallel=parallel, rank=rank,
                                             workers=workers, wait_timeout=wait_timeout, wait_check=wait_check)

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
        if say:
            print(f"select: {chosen['criterion']} ({reason}); {spent} optimizer steps "
                  f"({payload['protocol']['spent_epochs']:g} epochs) spent", flush=True)
        return payload


def _capacity_step(names, cost, min_params_ratio, say):
    """The capacity pool: ``(names kept, its record or None)``."""
    if not (min_params_ratio > 0 and len(names) > 1):
        return names, None
    params = {n: int(cost(n).params) for n in names}
    alive = capacity_pool(params, min_params_ratio)
    if say and len(alive) < len(names):
        print(f"select: capacity pool (>= {min_params_ratio:g} x the median candidate's "
              f"{statistics.median(params.values()):.0f} parameters) keeps {', '.join(alive)}", flush=True)
    return alive, {"min_params_ratio": float(min_params_ratio), "params": params, "kept": alive}


def _zero_cost_keep(alive, zero_cost_keep, zero_cost_only, successive_halving, total_budget, say) -> int:
    """How many candidates the zero-cost rung keeps (0: no rung). Never more than the budget can give one step
    per rung."""
    requested = 1 if zero_cost_only else min(zero_cost_keep or len(alive), len(alive))
    keep_at_most = requested
    while keep_at_most > 1 and _smallest_plan_cost(keep_at_most, successive_halving) > total_budget:
        keep_at_most -= 1
    if keep_at_most < requested and say:
        print(f"select: a budget of {total_budget} steps can train at most {keep_at_most} candidates", flush=True)
    return keep_at_most if keep_at_most < len(alive) else 0


def _zero_cost_step(alive, keep, trainer, cost, known_scores, val_ds, strategy, say):
    """The zero-cost rung: the ``keep`` best by validation accuracy before any step; ``(kept, its record)``."""
    scores, macs = {n: (known_scores or {}).get(n) for n in alive}, {}
    for n in alive:
        macs[n] = cost(n).macs  # ties go to the cheaper candidate, as in `choose`
        if scores[n] is None:
            scores[n] = training.accuracy(trainer._source(n), val_ds, "select: val_ds")
    # Lock-step workers must keep the same candidates: everyone takes the chief's numbers.
    scores = dict(zip(alive, chief_values(strategy, [scores[n] for n in alive])))
    kept = sorted(alive, key=lambda n: (-scores[n], macs[n], n))[:keep]
    trainer.accuracy_before_training.update(scores)
    if say:
        print(f"select: zero-cost rung (validation accuracy before any step) keeps {', '.join(kept)}", flush=True)
    return kept, {"scores": {n: float(v) for n, v in scores.items()}, "kept": kept}


def _train_rungs(trainer, alive, rungs, steps_per_epoch, *, parallel, rank, workers, wait_timeout, wait_check):
    """Fine-tune the survivors rung by rung, keeping the better half after each; ``(finalists, rung records)``."""
    # Parallel mode deals the survivors of the pools out in turn, and each keeps its worker for every rung
    # (its optimizer state lives there); dealing by position in the full list could give one worker all.
    owner = {n: i % workers for i, n in enumerate(alive)}
    records = []
    for index, (_, target) in enumerate(rungs):
        for name in [n for n in alive if not parallel or owner[n] == rank]:
            trainer.train_to(name, target, rung=f"{index + 1}/{len(rungs)}")
        if parallel:
            trainer.wait_for(alive, target, timeout=wait_timeout, workers=workers, check=wait_check)
        ranked = sorted(alive, key=lambda n: _rank_key(trainer.state[n], target))
        keep = ranked[: math.ceil(len(alive) / 2)] if index < len(rungs) - 1 else ranked
        records.append({"budget_epochs": round(target / steps_per_epoch, 4), "candidates": alive, "kept": keep})
        trainer.forget([n for n in alive if n not in keep])
        alive = keep
    return alive, records


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
    plain = with_synchronized_batchnorm(model, False) if any(bn.synchronized for bn in batchnorms(model)) else model
    save_atomic(workdir / "selected.keras", plain.save)
    save_atomic(workdir / "selection.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


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
