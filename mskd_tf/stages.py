"""The pipeline's stages: each reads earlier artifacts and writes its own.

``PIPELINE`` lists them in order, each a :class:`Stage`: the Config fields its artifact
depends on, the files it leaves in the workdir and the function that makes them;
:mod:`mskd_tf.api` decides which stages need to run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mskd_tf import data as data_lib
from mskd_tf.config import STAGES, Config
from mskd_tf.errors import MskdError
from mskd_tf.workdir import Workdir, write_atomic

@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what it depends on, what it leaves, what does the work."""

    name: str
    inputs: tuple  # Config fields the artifact depends on (digests chain: upstream changes redo it too)
    artifacts: tuple  # files in the workdir that must exist and load for the stage to count as done
    run: object  # run(ctx)
    listed: object = None  # listed(ctx): more files that must exist, named in the stage's own JSON artifact


def artifacts_of(ctx: Context, stage: Stage) -> list[str]:
    """The files a stage must have left to count as done: its artifacts and the files they list."""
    return [*stage.artifacts, *(stage.listed(ctx) if stage.listed else ())]


def candidate_files(ctx: Context) -> list[str]:
    """The candidates' networks that candidates.json names (a copied or pruned work dir may lack some)."""
    try:
        rows = ctx.wd.read_json("candidates.json")["candidates"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no record, or a damaged one: artifacts_load redoes the stage
    return [f"candidates/{row['criterion']}.keras" for row in rows]


# Config fields that are no stage's input, and why. A new field must be listed here or in a
# stage's inputs (tests/test_pipeline.py checks), so that no setting can leave stale artifacts.
NOT_STAGE_INPUTS = {
    "download": "where data may come from, not what it is",
    "workdir": "where the artifacts live",
    "restart_from": "which stages to redo, not how",
    "stop_after": "where this run ends, not how stages work",
    "strategy": "results are exact across strategies (tested)",
    "num_replicas": "results are exact across replica counts (tested)",
    "parallel_selection": "which worker fine-tunes which candidate, not the protocol (steps, budget, seed)",
    "worker_timeout": "how long workers wait for each other, not what they compute",
}

# Under --strategy=multi_worker these stages train on every worker in lock-step (the teacher only when it
# is trained here); the others run on the chief while the workers wait for its record (mskd_tf.multiworker).
LOCK_STEP_STAGES = ("teacher", "select", "distill")


def runs_on_every_worker(ctx, stage: str) -> bool:
    if stage == "teacher":
        return ctx.user_teacher is None and not ctx.cfg.teacher  # a given teacher is only loaded and checked
    return stage in LOCK_STEP_STAGES


def chain_digest(previous: str, inputs: dict) -> str:
    payload = previous + json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class CompressionResult:
    """What ``compress`` returns: the student and every figure the run measured."""

    student: object  # keras.Model, or None when the pipeline stopped before distillation
    criterion: str | None
    candidates: list
    teacher: dict
    student_metrics: dict  # distill.json: val_acc / test_acc of the shipped student, each run's under "runs"
    exports: list
    timings: dict
    workdir: str
    report: dict

    def summary(self) -> str:
        from mskd_tf import report

        return report.summary_table(self.report)


@dataclasses.dataclass
class UserData:
    """Data handed to ``compress()`` rather than named by a source string."""

    train: object
    val: object
    test: object
    info: data_lib.DatasetInfo
    fresh_train: object = None  # (first_epoch=0) -> a new training pipeline (numpy splits); None: the user's own


def user_data(model, train, val, test, *, batch_size: int, seed: int, class_names=None) -> UserData:
    """Accept tf.data datasets of (images, labels) batches or numpy (x, y) tuples, checked before any training.

    Numpy splits are checked whole, datasets on their first batch, by :func:`mskd_tf.data.check_splits`
    (the check the CLI's ``--dataset`` sources go through): finite images of the model's input shape,
    whole-number labels within the model's outputs. Errors name the argument (``train``, ``val``, ``test``).
    """
    import tensorflow as tf

    def is_arrays(value):
        return isinstance(value, (tuple, list)) and len(value) == 2

    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is None and name != "train":
            continue
        if not (isinstance(value, tf.data.Dataset) or is_arrays(value)):
            raise MskdError(f"{name}: expected a tf.data.Dataset or an (x, y) tuple of arrays, got {type(value).__name__}.")
        if isinstance(value, tf.data.Dataset):
            spec = value.element_spec
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise MskdError(f"{name}: a dataset must yield (images, labels) batches; it yields {spec}.")
    if val is None and isinstance(train, tf.data.Dataset):
        raise MskdError("val: pass validation data (a dataset or (x, y)); it is needed to select candidates.")
    num_classes = int(model.output_shape[-1])
    given = {}
    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is None:
            continue
        if isinstance(value, tf.data.Dataset):  # the first batch stands for the rest: a dataset may be endless
            batch = next(iter(value.take(1)), None)
            if batch is None:
                raise MskdError(f"{name}: the dataset yields no batches.")
            value = (batch[0].numpy(), batch[1].numpy())
            if value[1].ndim == 0:
                raise MskdError(f"{name}: the dataset yields single examples, not batches; add .batch(128).")
        given[name] = value
    checked = data_lib.check_splits(given, num_classes=num_classes, classes_from=f"the model has {num_classes} outputs",
                                    image_shape=tuple(model.input_shape[1:]), shape_from="the model")
    if val is None:
        tr, va = data_lib.split_validation(checked["train"].x, checked["train"].y, 0.1, seed)
        if len(va) == 0 or len(tr) == 0:
            raise MskdError(f"train: {len(checked['train'])} images are too few to hold out 10% for validation; "
                            "pass more images or val=(x, y).")
        checked["train"], checked["val"] = tr, va
    info = data_lib.DatasetInfo(
        name="user", image_shape=tuple(model.input_shape[1:]), num_classes=num_classes,
        class_names=tuple(class_names or (str(i) for i in range(num_classes))),
        mean=(), std=(), num_train=-1, num_val=-1, num_test=-1,
    )

    def pipeline(name, value, first_epoch=0):
        if isinstance(value, tf.data.Dataset):
            return value.with_options(data_lib.without_autotuning())
        if name == "train":
            return data_lib.train_pipeline(checked[name], batch_size, augment=False, seed=seed, first_epoch=first_epoch)
        return data_lib.eval_pipeline(checked[name], 2 * batch_size)

    train_ds, val_ds = pipeline("train", train), pipeline("val", val)
    test_ds = val_ds if test is None else pipeline("test", test)
    fresh = None if isinstance(train, tf.data.Dataset) else (lambda first_epoch=0: pipeline("train", train, first_epoch))
    return UserData(train=train_ds, val=val_ds, test=test_ds, info=info, fresh_train=fresh)


@dataclasses.dataclass
class Context:
    """What the stages share in one run: config, workdir, data, loaded artifacts."""

    cfg: Config
    wd: Workdir
    user_teacher: object = None
    user_data: UserData | None = None
    _splits: object = None
    _models: dict = dataclasses.field(default_factory=dict)
    stage_digest: str = ""  # the running stage's settings digest (keys its mid-stage backup)
    cluster: object = None  # mskd_tf.multiworker.Cluster under --strategy=multi_worker

    @property
    def writes(self) -> bool:
        """Whether this process writes artifacts: always, except on the workers that are not the chief."""
        return self.cluster is None or self.cluster.is_chief

    @property
    def data(self):
        """Train / val / test pipelines and info (the user's, or loaded from --dataset)."""
        if self.user_data is not None:
            return self.user_data
        if self._splits is None:
            c = self.cfg
            self._splits = data_lib.load(
                c.dataset, batch_size=c.batch_size, val_fraction=c.val_fraction, augment=c.augment, seed=c.seed,
                train_subset=c.train_subset or None, data_dir=c.data_dir or None, download=c.download,
            )
            info = self._splits.info
            print(f"data: {info.name}: {info.num_train} train / {info.num_val} val / {info.num_test} test images "
                  f"of {info.image_shape}, {info.num_classes} classes", flush=True)
        return self._splits

    def train_data(self, first_epoch: int = 0):
        """A new training pipeline, whose first pass is epoch ``first_epoch`` of the seed's orders, for each run.

        A pipeline re-shuffles (and re-augments) on every pass, so runs sharing one would see an order that
        depends on how many passes earlier runs drew from it: the select stage of an uninterrupted run and of a
        resumed one trained on different orders (the quickstart chose l1-global in one, fpgm-global in the
        other), and distill's cross-entropy baseline did not see the batches its KD run saw. A run resumed after
        epoch ``e`` passes ``first_epoch=e`` and continues the uninterrupted run's orders. A dataset the user passed
        in is used as given (its order on resuming is the dataset's own).
        """
        d = self.data
        if isinstance(d, UserData):
            return d.fresh_train(first_epoch) if d.fresh_train is not None else d.train
        c = self.cfg
        return data_lib.train_pipeline(d.arrays["train"], c.batch_size, augment=c.augment, seed=c.seed,
                                       first_epoch=first_epoch)

    def selection_train(self):
        """What ``select`` trains on: :meth:`train_data` itself where it builds a new pipeline per call (every
        candidate then trains on the same batches), else the user's one dataset, which candidates share (and the
        selection record says so)."""
        d = self.data
        if isinstance(d, UserData) and d.fresh_train is None:
            return d.train
        return self.train_data

    @property
    def calibration(self):
        """Un-augmented training batches: for data-driven criteria and int8 calibration (never read whole)."""
        d = self.data
        if isinstance(d, UserData):
            return d.train
        return data_lib.eval_pipeline(d.arrays["train"], self.cfg.batch_size, cache=False)

    def model(self, name: str):
        """Load (once) a .keras artifact from the workdir."""
        if name not in self._models:
            import keras

            self._models[name] = keras.models.load_model(self.wd / name)
        return self._models[name]

    def remember(self, name: str, model):
        self._models[name] = model


def artifacts_load(ctx: Context, stage: Stage) -> bool:
    """A cheap integrity check: JSON parses and .keras archives open."""
    for name in stage.artifacts:
        path = ctx.wd / name
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".keras"):
                ctx.model(name)
        except Exception:  # any failure to read means: redo the stage
            ctx._models.pop(name, None)
            return False
    return True


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def evaluate(model, dataset) -> float:
    """Top-1 accuracy of a logits/probabilities model on a (images, labels) dataset."""
    from mskd_tf import training

    return training.accuracy(model, dataset)


# ----------------------------------------------------------------------------- teacher


def _check_teacher_fits(model, info, where: str):
    if tuple(model.input_shape[1:]) != tuple(info.image_shape):
        raise MskdError(f"{where}: the model takes inputs of shape {model.input_shape[1:]}, but the data has "
                        f"images of shape {info.image_shape}.")
    if int(model.output_shape[-1]) != info.num_classes:
        raise MskdError(f"{where}: the model has {model.output_shape[-1]} outputs, but the data has "
                        f"{info.num_classes} classes.")


def _given_teacher(ctx: Context):
    """The ``--teacher`` file, loaded once and checked against the data."""
    import keras

    cfg = ctx.cfg
    key = f"--teacher={cfg.teacher}"
    if key not in ctx._models:
        import zipfile

        if not os.path.isfile(cfg.teacher):
            raise MskdError(f"--teacher={cfg.teacher}: no such file; give the path of a saved .keras model.")
        if str(cfg.teacher).endswith(".keras") and not zipfile.is_zipfile(cfg.teacher):
            raise MskdError(f"--teacher={cfg.teacher}: the file exists but is not a whole .keras archive (truncated "
                            "or another format); save the model again with model.save(path).")
        try:
            teacher = keras.models.load_model(cfg.teacher)
        except Exception as exc:
            raise MskdError(f"--teacher={cfg.teacher}: cannot load it as a Keras model ({exc}).") from exc
        _check_teacher_fits(teacher, ctx.data.info, key)
        ctx.remember(key, teacher)
    return ctx._models[key]


def preflight(ctx: Context, first_stage: str):
    """Every check that needs the data or the model, before ``first_stage`` (the first to run) trains anything.

    Loading the data runs :func:`mskd_tf.data.check_splits` (the API's data were checked by
    :func:`user_data`, with the same function). The teacher, or for ``--model`` the untrained
    architecture (built in well under a second), must have a layer graph the pruning engine can
    follow and must contain every ``--protect`` name; a GroupNormalization teacher or a typo in
    ``--protect`` would otherwise surface only after the teacher trained.
    """
    from mskd_tf import device_targets, models
    from mskd_tf.pruning import build_graph, plan

    if first_stage == "report":
        return  # writes files from the other stages' records: no data, no training
    cfg, d = ctx.cfg, ctx.data
    if first_stage == "teacher" and ctx.user_teacher is None and not cfg.teacher and cfg.model not in models.available():
        raise MskdError(f"--model={cfg.model}: unknown model; available models: {', '.join(models.available())}.")
    if STAGES.index(first_stage) <= STAGES.index("distill"):
        _check_student_budget(ctx)
    if STAGES.index(first_stage) > STAGES.index("candidates"):
        return  # the teacher's graph and --protect were used already, by finished stages
    if ctx.user_teacher is not None:
        teacher, where = ctx.user_teacher, "model"
    elif (ctx.wd / "teacher.keras").exists() and first_stage != "teacher":
        teacher, where = ctx.model("teacher.keras"), "the trained teacher"
    elif cfg.teacher:
        teacher, where = _given_teacher(ctx), f"--teacher={cfg.teacher}"
    else:  # the architecture alone (built in about a second, nothing trained) takes the data's images or not
        teacher = _architecture_for(cfg, d.info)
        where = f"--model={cfg.model}"
        if not cfg.protect and not device_targets.Targets.from_config(cfg).beyond_macs:
            return  # a library architecture: prunable by construction
    graph = build_graph(teacher)
    message = plan.unknown_protect_message(graph, cfg.protect) if cfg.protect else None
    if message:
        raise MskdError(f"--protect={','.join(cfg.protect)}: {message} (checked on {where})")
    device_targets.check_reachable(graph, device_targets.Targets.from_config(cfg), round_to=cfg.round_to,
                                   min_channels=cfg.min_channels, protect=cfg.protect)


def _architecture_for(cfg, info):
    """``--model`` built for the data's images; a size it cannot take is refused with the smallest it can."""
    from mskd_tf import models

    def build(shape):
        return models.build(cfg.model, shape, info.num_classes, width=cfg.width)

    try:
        return build(info.image_shape)
    except (ValueError, TypeError) as exc:  # e.g. a pooling layer whose output would be 0 x 0
        height, width, channels = info.image_shape
        smallest = next((side for side in (4, 8, 16, 24, 32, 48, 64, 96, 128, 224)
                         if side > min(height, width) and _builds(build, (side, side, channels))), None)
        need = f"images of at least {smallest} x {smallest}" if smallest else "larger images"
        raise MskdError(f"--model={cfg.model} cannot take the data's {height} x {width} images ({str(exc).splitlines()[0]}); "
                        f"it needs {need}: resize the images"
                        + (" or choose another --model (small_cnn takes 4 x 4)." if cfg.model != "small_cnn" else ".")
                        ) from None


def _builds(build, shape) -> bool:
    try:
        build(shape)
        return True
    except (ValueError, TypeError):
        return False


def _check_student_budget(ctx: Context) -> None:
    """Selection's epochs are taken from --distill_epochs: refuse, before any training, a budget they use up."""
    from mskd_tf import training

    cfg = ctx.cfg
    if cfg.select_epochs <= 0 or ctx.data.train is None:
        return
    per_epoch = training.steps_per_epoch(ctx.data.train)
    budget = training.budget_steps(cfg.distill_epochs, per_epoch)
    selection = training.budget_steps(cfg.select_epochs, per_epoch)  # at least this; halving may add a few
    if budget - selection < 1:
        raise MskdError(f"--distill_epochs={cfg.distill_epochs:g} ({budget} steps of {per_epoch} per epoch) is the "
                        f"student's whole budget, and --select_epochs={cfg.select_epochs:g} spends {selection} of "
                        "them: raise --distill_epochs or lower --select_epochs (0: the zero-cost pick, no steps).")


def run_teacher(ctx: Context):
    import contextlib

    import keras

    from mskd_tf import batchnorm, models, training
    from mskd_tf.keras_utils import with_synchronized_batchnorm

    cfg, d = ctx.cfg, ctx.data
    history = None
    if ctx.user_teacher is not None:
        teacher = ctx.user_teacher
    elif cfg.teacher:
        teacher = _given_teacher(ctx)
    else:
        strategy = _strategy(ctx) if ctx.cluster is not None else None
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            teacher = models.build(cfg.model, d.info.image_shape, d.info.num_classes,
                                   normalization=(d.info.mean, d.info.std), width=cfg.width)
            if strategy is not None:  # global-batch BatchNorm statistics: the maths of one process
                teacher = with_synchronized_batchnorm(teacher, True)
            steps = cfg.epochs * training.steps_per_epoch(d.train)
            teacher.compile(
                optimizer=training.make_optimizer(cfg.optimizer, cfg.lr, total_steps=steps, schedule=cfg.schedule,
                                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                **training.compile_kwargs(),
            )
            if strategy is not None:  # BackupAndRestore loads the optimizer state: its variables belong here
                teacher.optimizer.build(teacher.trainable_variables)
        guard = training.NanGuard()
        best = ctx.wd / "teacher_best.keras"
        if ctx.writes:
            backup, resumed_at, best_so_far = _teacher_backup(ctx, best)
            if ctx.cluster is not None:  # the workers may now read the backup folder
                ctx.cluster.announce("teacher_backup")
            callbacks = [guard, keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch",
                                                                 delete_checkpoint=True),
                         *training.standard_callbacks(str(ctx.wd / "logs" / "teacher"),
                                                      checkpoint=str(best) if d.val is not None else None,
                                                      append=resumed_at > 0, best_so_far=best_so_far)]
        else:  # resume from the chief's backup (once the chief has cleared a stale one), write nothing
            ctx.cluster.wait("teacher_backup", "the teacher's backup folder")
            backup = ctx.wd / "teacher_backup"
            resumed_at = training.epochs_backed_up(backup)
            callbacks = [guard, training.RestoreOnly(str(backup))]
        if resumed_at:
            print(f"teacher: resuming after epoch {resumed_at} of {cfg.epochs} from {backup}", flush=True)
        if strategy is not None:  # Keras 3 fit crashes under MultiWorkerMirroredStrategy: the plain loop
            history = training.fit_across_workers(teacher, ctx.train_data(resumed_at), d.val, epochs=cfg.epochs,
                                                  strategy=strategy, callbacks=callbacks, what="teacher",
                                                  advice="Lower --lr")
            teacher = with_synchronized_batchnorm(teacher, False)  # a plain model for evaluation and saving
        else:
            history = teacher.fit(**training.one_pass_per_epoch(ctx.train_data(resumed_at)), validation_data=d.val,
                                  epochs=cfg.epochs, callbacks=callbacks, shuffle=False, verbose=_verbose()).history
        guard.raise_if_tripped("teacher")
        if not ctx.writes:
            return  # the chief evaluates and saves; later stages read its teacher.keras
        shutil.rmtree(backup, ignore_errors=True)
        if best.exists():  # restore the best-on-validation weights (saved with the training-time BatchNorm)
            teacher = with_synchronized_batchnorm(keras.models.load_model(best), False)
    teacher, repair = batchnorm.repair_batchnorm(teacher, ctx.calibration, d.val)
    metrics = {"val_acc": evaluate(teacher, d.val) if d.val is not None else None,
               "test_acc": evaluate(teacher, d.test), "batchnorm_repair": repair}
    metrics.update(_cost(teacher))
    if history is not None:
        metrics["history"] = {k: [float(v) for v in vals] for k, vals in history.items()}
        if resumed_at:  # this process saw only the epochs after the interruption; the CSV has them all
            metrics["history"] = _csv_history(ctx.wd / "logs" / "teacher" / "history.csv") or metrics["history"]
    ctx.wd.save_model(teacher, "teacher.keras")
    ctx.wd.write_json("teacher.json", metrics)
    ctx.remember("teacher.keras", teacher)
    (ctx.wd / "teacher_best.keras").unlink(missing_ok=True)
    print(f"teacher: val acc {_pct(metrics['val_acc'])}, test acc {_pct(metrics['test_acc'])}, "
          f"{metrics['macs'] / 1e6:.2f}M MACs, {metrics['params'] / 1e6:.3f}M params", flush=True)


def _epoch_backup(ctx: Context, name: str) -> Path:
    """The folder ``name`` of a loop's epoch backups, emptied when it was written for other settings."""
    folder = ctx.wd / name
    marker = folder / "settings_digest"
    if folder.exists() and (not marker.exists() or marker.read_text() != ctx.stage_digest):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(ctx.stage_digest)
    return folder


def _teacher_backup(ctx: Context, best: Path):
    """The teacher's epoch backup folder, emptied when it was written for other settings.

    Keras' BackupAndRestore saves weights and optimizer state after every epoch, so a teacher
    run that is interrupted (a session that ends, Ctrl-C) continues at the next epoch instead of
    starting over. Returns ``(folder, epochs already done, best validation accuracy so far)``.
    """
    from mskd_tf import training

    folder = _epoch_backup(ctx, "teacher_backup")
    done = training.epochs_backed_up(folder)
    if not done:
        return folder, 0, None
    seen = _csv_history(ctx.wd / "logs" / "teacher" / "history.csv").get("val_accuracy", [])
    return folder, done, (max(seen) if seen and best.exists() else None)


def _csv_history(path: Path) -> dict:
    import csv

    try:
        with open(path) as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}


def _cost(model) -> dict:
    from mskd_tf import flops

    cost = flops.count(model)
    return {"macs": int(cost.macs), "params": int(cost.params)}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


# ----------------------------------------------------------------------------- rank, candidates


def run_rank(ctx: Context):
    from mskd_tf.pruning import build_graph, criteria

    cfg = ctx.cfg
    teacher = ctx.model("teacher.keras")
    graph = build_graph(teacher, skip=())
    needs_data = [c for c in cfg.criteria if criteria.REGISTRY[c].needs_data]
    calibration = ctx.calibration if needs_data else None
    rankings = criteria.rank(teacher, cfg.criteria, calibration, graph=graph, num_batches=cfg.calibration_batches,
                             seed=cfg.seed)
    save_rankings(str(ctx.wd / "rankings.json"), rankings, graph)
    print(f"rank: {len(rankings)} criteria x {sum(g.prunable for g in graph.groups)} prunable groups", flush=True)


RANKINGS_FORMAT = 1


def save_rankings(path, rankings, graph):
    """Write ``rankings`` to ``path`` (JSON) atomically: a temp file in the same folder, renamed.

    The file holds, per group, its size and the layer names it touches (so the ranking can be
    read against the model), and per criterion the scores of every group.
    """
    groups = {}
    for scores in rankings.values():
        for group_id in scores:
            if group_id not in groups:
                group = graph.group(group_id)
                groups[group_id] = {"size": group.size, "producers": [r.layer for r in group.producers],
                                    "layers": group.layers}
    payload = {
        "format": RANKINGS_FORMAT,
        "model": graph.model.name,
        "groups": groups,
        "criteria": {name: {g: [float(v) for v in np.asarray(s).reshape(-1)] for g, s in scores.items()}
                     for name, scores in rankings.items()},
    }
    write_atomic(path, json.dumps(payload, indent=1))


def load_rankings(path, graph=None):
    """Read a ``rankings.json``: ``{criterion: {group_id: np.ndarray}}``.

    With ``graph``, checks that every group exists in it with the same size (the rankings
    belong to this model) and raises :class:`MskdError` naming the first mismatch.
    """
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise MskdError(f"rankings file {path} does not exist; run the rank stage first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MskdError(f"rankings file {path} is not valid JSON ({exc}); "
                        "delete it and rerun the rank stage.") from None
    if not isinstance(payload, dict) or payload.get("format") != RANKINGS_FORMAT or "criteria" not in payload:
        raise MskdError(f"rankings file {path} is not a format-{RANKINGS_FORMAT} rankings file; "
                        "delete it and rerun the rank stage.")
    rankings = {name: {g: np.asarray(v, dtype=np.float64) for g, v in scores.items()}
                for name, scores in payload["criteria"].items()}
    if graph is not None:
        for name, scores in rankings.items():
            for group_id, score in scores.items():
                try:
                    size = graph.group(group_id).size
                except MskdError:
                    raise MskdError(f"rankings file {path}: group {group_id!r} (criterion {name!r}) is not in "
                                    f"model {graph.model.name!r}; the file belongs to another model. "
                                    "Delete it and rerun the rank stage.") from None
                if size != score.size:
                    raise MskdError(f"rankings file {path}: group {group_id!r} has {score.size} scores but the "
                                    f"model's group has {size} channels; rerun the rank stage.")
    return rankings


def candidate_name(criterion: str, allocation: str, allocations) -> str:
    """``l1`` with one allocation; ``l1-global`` / ``l1-uniform`` with several."""
    return criterion if len(allocations) == 1 else f"{criterion}-{allocation}"


SENSITIVITY_IMAGES = 256  # calibration images each cut's KL divergence is measured on
# BatchNorm re-estimation batches per measured cut (at most --bn_recalibration_batches). On the 120-epoch ResNet-20
# teacher, 2 batches gave l1 the allocation 10 gave, and taylor differed only in 2 of 10 groups whose measured curve
# is flat there (benchmarks/results/sensitivity_cost_t120_teacher_bn{2,10}.json); 10 cost about 3x the time.
SENSITIVITY_BN_BATCHES = 2


def _sensitivity_planner(ctx: Context, teacher, graph, plan_options):
    """``fn(scores) -> Plan``: measure every group's sensitivity under these scores, then allocate to the target."""
    from mskd_tf import batchnorm, quantize
    from mskd_tf.pruning import sensitivity

    images, _ = quantize.dataset_arrays(ctx.calibration, SENSITIVITY_IMAGES)  # as the model takes them
    batches = min(ctx.cfg.bn_recalibration_batches, SENSITIVITY_BN_BATCHES)

    def adapt(model):
        batchnorm.recalibrate_batchnorm(model, ctx.calibration, batches)

    def planner(scores):
        measured = sensitivity.measure(teacher, graph, scores, images, adapt=adapt, **plan_options)
        return sensitivity.allocate(graph, scores, measured, target_macs=ctx.cfg.target_macs, **plan_options)[0]

    return planner


def run_candidates(ctx: Context):
    from mskd_tf import batchnorm, device_targets, flops, report
    from mskd_tf.pruning import build_graph
    from mskd_tf.pruning.candidates import build_candidates, layer_widths, overlap_matrix

    cfg = ctx.cfg
    teacher = ctx.model("teacher.keras")
    graph = build_graph(teacher)
    rankings = load_rankings(str(ctx.wd / "rankings.json"), graph=graph)
    rankings = {name: rankings[name] for name in cfg.criteria}
    candidates = []
    adapt = lambda clone: batchnorm.recalibrate_batchnorm(clone, ctx.calibration, cfg.bn_recalibration_batches)  # noqa: E731
    plan_options = dict(round_to=cfg.round_to, min_channels=cfg.min_channels, protect=cfg.protect)
    targets = device_targets.Targets.from_config(cfg)
    teacher_macs = flops.count(teacher).macs
    devices = None
    if targets.beyond_macs:
        images = None
        if targets.on_device:  # for the int8 conversions that measure arena and flash (neither depends on them)
            from mskd_tf import quantize

            images, _ = quantize.dataset_arrays(ctx.calibration, device_targets.CALIBRATION_IMAGES)
        devices = device_targets.TargetPlanner(teacher, graph, targets, images, plan_options)
    for allocation in cfg.allocations:
        mode = "uniform" if allocation == "sensitivity" else allocation

        def build(some_rankings, max_macs=None, mode=mode, allocation=allocation):
            planner = None
            if allocation == "sensitivity":
                planner = _sensitivity_planner(ctx, teacher, graph, plan_options)
            elif devices is not None:
                planner = devices.planner(mode, max_macs)
            return build_candidates(
                teacher, some_rankings, target_macs=cfg.target_macs, graph=graph, mode=mode, planner=planner,
                evaluate=lambda clone: evaluate(clone, ctx.data.val), adapt=adapt, **plan_options,
            )

        for c in build(rankings):  # the candidate's name: its criterion, plus the allocation when there are several
            measured = devices.verified(
                c, lambda max_macs, c=c, build=build: build({c.criterion: rankings[c.criterion]}, max_macs)[0],
                teacher_macs) if devices else (c, {})
            candidates.append((candidate_name(c.criterion, allocation, cfg.allocations), c.criterion, allocation,
                               *measured))
    teacher_widths = layer_widths(graph, {})
    rows = []
    for name, criterion, allocation, c, measured in candidates:
        ctx.wd.save_model(c.model, f"candidates/{name}.keras")
        row = c.row()
        row["val_acc_before_finetune"] = row.pop("accuracy")
        rows.append(dict(row, criterion=name, ranking=criterion, allocation=allocation, macs_ratio=c.macs / teacher_macs,
                         teacher_widths=teacher_widths, kept={k: [int(i) for i in v] for k, v in c.keep.items()},
                         **measured))
    candidates = [dataclasses.replace(c, criterion=name) for name, _, _, c, _ in candidates]
    overlap = overlap_matrix({c.criterion: c.keep for c in candidates})
    record = {"candidates": rows, "jaccard": overlap}
    if devices is not None:
        record["targets"] = {"limits": devices.limits, "teacher": devices.teacher_measured}
    ctx.wd.write_json("candidates.json", record)
    print(report.candidates_table(rows) + "\n\nJaccard overlap of kept channels:\n\n"
          + report.overlap_table(overlap), flush=True)


# ----------------------------------------------------------------------------- select, distill, export


def run_select(ctx: Context):
    from mskd_tf import selection

    cfg = ctx.cfg
    rows = ctx.wd.read_json("candidates.json")["candidates"]
    paths = {row["criterion"]: str(ctx.wd / f"candidates/{row['criterion']}.keras") for row in rows}
    teacher = None
    if cfg.select_loss == "kd":
        teacher_val = ctx.wd.read_json("teacher.json").get("val_acc")
        best = max(rows, key=lambda r: r.get("val_acc_before_finetune") or 0.0)
        if teacher_val is not None and (best.get("val_acc_before_finetune") or 0.0) > teacher_val:
            print(f"select: WARNING: candidate {best['criterion']} scores {_pct(best['val_acc_before_finetune'])} on "
                  f"validation before any fine-tuning, the teacher only {_pct(teacher_val)}: selecting with "
                  "cross-entropy instead of distilling from a worse teacher", flush=True)
        else:
            teacher = ctx.model("teacher.keras")
    result = selection.select(
        paths, ctx.selection_train(), ctx.data.val, workdir=str(ctx.wd.path), epochs=cfg.select_epochs,
        successive_halving=cfg.successive_halving, zero_cost_keep=cfg.zero_cost_keep,
        min_params_ratio=cfg.min_params_ratio,
        zero_cost_scores={row["criterion"]: row.get("val_acc_before_finetune") for row in rows
                          if row.get("val_acc_before_finetune") is not None},
        candidate_costs={row["criterion"]: row for row in rows if "macs" in row and "params" in row},
        teacher=teacher, temperature=cfg.temperature, alpha=cfg.alpha, tie_tolerance=cfg.tie_tolerance,
        bn_recalibration_batches=cfg.bn_recalibration_batches,
        optimizer=cfg.optimizer, lr=cfg.finetune_rate(kd=teacher is not None),
        weight_decay=cfg.weight_decay,
        # Candidate-parallel: each worker trains its share locally, meeting the others at file barriers.
        strategy=None if cfg.parallel_selection else _strategy(ctx), parallel=cfg.parallel_selection,
        wait_timeout=cfg.worker_timeout, wait_check=ctx.cluster.check_alive if ctx.cluster else None,
        seed=cfg.seed,
    )
    sel = result["selected"]
    if ctx.writes:
        print(f"select: chose {sel['criterion']} ({sel['reason']})", flush=True)


def _strategy(ctx: Context):
    if ctx.cfg.strategy == "default":
        return None
    from mskd_tf.distribute import make_strategy

    return make_strategy(ctx.cfg.strategy, ctx.cfg.num_replicas)


def run_distill(ctx: Context):
    import keras

    from mskd_tf import distill, training

    cfg, d = ctx.cfg, ctx.data
    teacher = ctx.model("teacher.keras")
    per_epoch = training.steps_per_epoch(d.train)
    budget = training.budget_steps(cfg.distill_epochs, per_epoch)
    selection = ctx.wd.read_json("selection.json")
    spent = int(selection["protocol"]["total_steps"])
    steps = budget - spent
    if steps < 1:
        raise MskdError(f"--distill_epochs={cfg.distill_epochs:g} ({budget} steps) is the student's whole budget, and "
                        f"selection already spent {spent} steps of it: raise --distill_epochs or lower --select_epochs.")
    settings = dict(epochs=steps / per_epoch, steps=steps, temperature=cfg.temperature, alpha=cfg.alpha,
                    feature_kd=cfg.feature_kd, optimizer=cfg.optimizer,
                    weight_decay=cfg.weight_decay, strategy=_strategy(ctx), seed=cfg.seed, verbose=_verbose())
    out = {"budget_steps": budget, "selection_steps": spent, "distill_steps": steps, "warnings": []}
    teacher_val = ctx.wd.read_json("teacher.json").get("val_acc")
    selected_val = selection["selected"].get("val_acc")
    if teacher_val is not None and selected_val is not None and selected_val > teacher_val:
        note = ("the cross-entropy run decides which student ships" if cfg.distill_baseline
                else "distillation is still used (no cross-entropy run to compare with)")
        out["warnings"].append(f"the selected candidate ({_pct(selected_val)}) is better than the teacher "
                               f"({_pct(teacher_val)}) on validation; {note}")
    students, out["runs"] = {}, {}
    if ctx.writes:
        backups = _epoch_backup(ctx, "distill_backup")
        if ctx.cluster is not None:  # the workers may now read the backup folder
            ctx.cluster.announce("distill_backup")
    else:
        ctx.cluster.wait("distill_backup", "the distillation runs' backup folder")
        backups = ctx.wd / "distill_backup"
    # "ce": the cross-entropy run from the same start and budget, which may ship instead (below)
    for label, kd in [("kd", True)] + ([("ce", False)] if cfg.distill_baseline else []):
        finished = backups / f"{label}.keras"
        if finished.exists() and (backups / f"{label}.json").exists():  # ran to its end before an interruption
            out["runs"][label] = json.loads((backups / f"{label}.json").read_text())
            students[label] = keras.models.load_model(finished) if ctx.writes else None
            print(f"distill: the {label} run finished before the interruption; kept", flush=True)
            continue
        student = keras.models.load_model(ctx.wd / "selected.keras")  # both runs start from the same weights
        start = time.perf_counter()
        lr = cfg.finetune_rate(kd)  # KD's larger steps want a lower rate (Config.kd_lr_scale)
        run_backup = backups / label
        done = training.epochs_backed_up(run_backup)
        if done:
            print(f"distill: resuming the {label} run after epoch {done} from {run_backup}", flush=True)
        callbacks = [(keras.callbacks.BackupAndRestore if ctx.writes else training.RestoreOnly)(
            str(run_backup), save_freq="epoch", delete_checkpoint=False)]
        if ctx.writes:
            callbacks += training.standard_callbacks(str(ctx.wd / "logs" / f"distill_{label}"), append=done > 0)
        student, history = distill.distill(teacher, student, ctx.train_data(done), d.val, kd=kd, lr=lr,
                                           callbacks=callbacks, **settings)
        if not ctx.writes:
            continue  # trained in lock-step with the chief, which measures, chooses and saves
        if done:  # this process saw only the epochs after the interruption; the CSV has them all
            history = _csv_history(ctx.wd / "logs" / f"distill_{label}" / "history.csv") or history
        out["runs"][label] = {
            "seconds": round(time.perf_counter() - start, 3), "lr": lr,
            "val_acc": evaluate(student, d.val) if d.val is not None else None,
            "test_acc": evaluate(student, d.test),
            "history": {k: [float(v) for v in vals] for k, vals in history.items()}}
        if done:
            out["runs"][label]["resumed_after_epoch"] = done
        students[label] = student
        ctx.wd.save_model(student, f"distill_backup/{label}.keras")
        ctx.wd.write_json(f"distill_backup/{label}.json", out["runs"][label])
    if not ctx.writes:
        return
    out.update(_cost(students["kd"]))
    kd_run, ce_run = out["runs"]["kd"], out["runs"].get("ce")
    # Ship the cross-entropy run when validation (never test) shows it better beyond noise: KD from a poor teacher
    # must not win by default, and a few validation images must not overturn distillation by a coin flip.
    shipped = "kd"
    if ce_run is not None and d.val is not None:
        paired = distill.paired_sign_test(training.correct_predictions(students["kd"], d.val),
                                          training.correct_predictions(students["ce"], d.val))
        better = "ce" if ce_run["val_acc"] > kd_run["val_acc"] else "kd" if kd_run["val_acc"] > ce_run["val_acc"] else None
        significant = better is not None and paired["p_value"] < distill.KD_CE_SIGNIFICANCE
        shipped = "ce" if better == "ce" and significant else "kd"
        out["kd_vs_ce"] = dict(paired, verdict=f"{better} better" if significant else "within noise")
        out["kd_gain"] = kd_run["test_acc"] - ce_run["test_acc"]
        out["kd_val_margin"] = kd_run["val_acc"] - ce_run["val_acc"]
    # The top-level figures are the shipped network's; each run's own are under "runs".
    out.update(shipped=shipped, val_acc=out["runs"][shipped]["val_acc"], test_acc=out["runs"][shipped]["test_acc"])
    ctx.wd.save_model(students[shipped], "student.keras")
    ctx.remember("student.keras", students[shipped])
    ctx.wd.write_json("distill.json", out)
    shutil.rmtree(backups, ignore_errors=True)
    for warning in out["warnings"]:
        print(f"distill: WARNING: {warning}", flush=True)
    line = f"distill: student test acc {_pct(kd_run['test_acc'])} with KD"
    if ce_run is not None:
        line += (f", {_pct(ce_run['test_acc'])} with plain cross-entropy; shipped the "
                 f"{'KD' if shipped == 'kd' else 'cross-entropy'} student (validation {_pct(kd_run['val_acc'])} vs "
                 f"{_pct(ce_run['val_acc'])}")
        paired = out.get("kd_vs_ce")
        if paired is not None:
            line += (f"; {paired['kd_only']} images only KD and {paired['ce_only']} only cross-entropy got right, "
                     f"p = {paired['p_value']:.3g}: {paired['verdict']}")
            if paired["verdict"] == "within noise":
                line += ", so the distilled student ships"
        line += ")"
    print(line + f"; {spent} selection + {steps} training steps = {budget} of the budget", flush=True)


def _target_checks(ctx: Context, student, rows, micro) -> dict:
    """Each parameter / arena / flash target against the shipped student and its measured int8 model."""
    from mskd_tf import device_targets, flops

    targets = device_targets.Targets.from_config(ctx.cfg)
    int8 = next((r for r in rows if r["kind"] in ("int8_qat", "int8")), None)
    checks = {}
    params_limit = targets.limits(ctx.wd.read_json("teacher.json")["params"]).get("params")
    measured = {"--target_params": (targets.params, params_limit, flops.count(student).params, "parameters"),
                "--target_arena_kb": (targets.arena_kb, targets.arena_kb,
                                      micro and micro["arena_bytes"] / device_targets.KB, "KB"),
                "--target_flash_kb": (targets.flash_kb, targets.flash_kb,
                                      int8 and int8["bytes"] / device_targets.KB, "KB"),
                "--target_latency_ms": (targets.latency_ms, targets.latency_ms,
                                        int8 and int8["latency_ms"].get(targets.latency_threads), "ms")}
    for flag, (given, limit, value, unit) in measured.items():
        if not given:
            continue
        if value is None:  # the export that would measure it was not asked for
            checks[f"{flag}={given:g}"] = {"measured": None, "unit": unit, "margin": None, "met": None}
            continue
        digits = 3 if unit == "ms" else 1
        checks[f"{flag}={given:g}"] = {"measured": round(value, digits), "unit": unit,
                                       "margin": round(limit - value, digits), "met": bool(value <= limit)}
    return checks


def run_export(ctx: Context):
    from mskd_tf import deploy

    cfg, d = ctx.cfg, ctx.data
    student = ctx.model("student.keras")
    qat = {"train_ds": ctx.train_data(), "teacher": ctx.model("teacher.keras"), "epochs": 1} if cfg.qat else None
    rows = deploy.export_all(
        student, str(ctx.wd / "export"), kinds=cfg.export, representative_ds=ctx.calibration, test_ds=d.test,
        num_calibration=cfg.calibration_samples, class_names=list(d.info.class_names), qat=qat, micro=cfg.micro,
        seed=cfg.seed,
    )
    micro = next((r.get("micro") for r in rows if r.get("micro")), None)
    checks = _target_checks(ctx, student, rows, micro)
    ctx.wd.write_json("export.json", {"exports": rows, "micro": micro, "targets": checks})
    from mskd_tf import report

    print(report.exports_table(rows), flush=True)
    for flag, check in checks.items():
        if check["met"] is None:
            print(f"export: {flag} not checked: it needs --export=int8 (and --micro for the arena, --latency_threads "
                  "of 1 or 2 for the latency)", flush=True)
            continue
        verdict = "meets" if check["met"] else "WARNING: misses"
        print(f"export: the shipped int8 student {verdict} {flag}: {check['measured']} {check['unit']} "
              f"measured, {abs(check['margin'])} {check['unit']} {'to spare' if check['met'] else 'over'}", flush=True)


# ----------------------------------------------------------------------------- report


def run_report(ctx: Context):
    from mskd_tf import report

    payload = report.build(ctx)
    ctx.wd.write_json("report.json", payload)
    with ctx.wd.atomic("report.md") as tmp:
        tmp.write_text(report.markdown(payload))
    report.plots(payload, ctx.wd)
    print("\n" + report.summary_table(payload), flush=True)


def result(ctx: Context, timings: dict):
    wd = ctx.wd
    read = lambda name: wd.read_json(name) if (wd / name).exists() else {}  # noqa: E731
    rep = read("report.json")
    student = ctx.model("student.keras") if (wd / "student.keras").exists() else None
    selection = read("selection.json")
    return CompressionResult(
        student=student,
        criterion=selection.get("selected", {}).get("criterion"),
        candidates=read("candidates.json").get("candidates", []),
        teacher=read("teacher.json"),
        student_metrics=read("distill.json"),
        exports=read("export.json").get("exports", []),
        timings=timings,
        workdir=str(wd.path),
        report=rep,
    )


PIPELINE = (
    Stage("teacher", ("dataset", "data_dir", "val_fraction", "train_subset", "augment", "batch_size", "seed", "model",
                      "teacher", "width", "epochs", "optimizer", "lr", "schedule", "momentum", "weight_decay"),
          ("teacher.keras", "teacher.json"), run_teacher),
    Stage("rank", ("criteria", "calibration_batches"), ("rankings.json",), run_rank),
    Stage("candidates", ("target_macs", "target_params", "target_arena_kb", "target_flash_kb", "target_latency_ms",
                         "latency_threads", "allocations", "round_to", "min_channels", "protect",
                         "bn_recalibration_batches"), ("candidates.json",), run_candidates, listed=candidate_files),
    Stage("select", ("select_epochs", "zero_cost_keep", "min_params_ratio", "select_loss", "successive_halving", "tie_tolerance",
                     "finetune_lr", "kd_lr_scale", "temperature", "alpha"), ("selected.keras", "selection.json"),
          run_select),
    Stage("distill", ("distill_epochs", "temperature", "alpha", "feature_kd", "distill_baseline"),
          ("student.keras", "distill.json"), run_distill),
    Stage("export", ("export", "calibration_samples", "qat", "micro"), ("export.json",), run_export),
    Stage("report", (), ("report.json", "report.md"), run_report),
)
assert tuple(stage.name for stage in PIPELINE) == STAGES, "config.STAGES names the flag choices: keep them equal"
