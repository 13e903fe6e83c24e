"""``compress()``: the MS-KD stage runner shared by the API and the CLI.

Stages run in order; each reads the previous stage's artifact from the work
directory and writes its own atomically. A stage is skipped when its artifacts
exist, load, and were made from the same config (see :mod:`mskd_tf.workdir`);
otherwise it and every later stage run again, and the reason is printed.

One run per workdir: the runner holds ``Workdir.lock`` throughout, so a second run on the
same folder fails at once naming the holder's PID. Bad input fails before anything trains:
``Config.validate`` first, then, just before the first stage with work to do,
``stages.checks.preflight`` (data through ``data.check_splits``, the teacher's graph, ``protect``).
``compress`` checks its arrays with the same ``check_splits`` and words every error as
Python arguments (``target_macs=``) rather than flags (``--target_macs=``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
import warnings
from pathlib import Path

from mskd_tf import context, front, multiworker, stages, training
from mskd_tf.config import CURRENT_NAMES, STAGES, Config, as_arguments, digest_name, renamed_warning
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import weights_digest
from mskd_tf.stages import checks
from mskd_tf.workdir import Workdir


@dataclasses.dataclass
class CompressionResult:
    """What ``compress`` returns: the student and every figure the run measured."""

    student: object  # keras.Model, or None when the pipeline stopped before distillation
    candidate: str | None  # the selected candidate's name: its criterion, and its allocation when there are several
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

    @property
    def criterion(self) -> str | None:
        """The selected candidate's name (``l1-global``), not only a criterion: read ``candidate``."""
        warnings.warn("CompressionResult.criterion is renamed CompressionResult.candidate (it names a candidate, "
                      "e.g. l1-global); the old name still works for now.", DeprecationWarning, stacklevel=2)
        return self.candidate


def result(ctx: context.Context, timings: dict) -> CompressionResult:
    wd = ctx.wd
    read = lambda name: wd.read_json(name) if (wd / name).exists() else {}  # noqa: E731
    rep = read("report.json")
    student = ctx.model("student.keras") if (wd / "student.keras").exists() else None
    selection = read("selection.json")
    return CompressionResult(
        student=student,
        candidate=selection.get("selected", {}).get("criterion"),
        candidates=read("candidates.json").get("candidates", []),
        teacher=read("teacher.json"),
        student_metrics=read("distill.json"),
        exports=read("export.json").get("exports", []),
        timings=timings,
        workdir=str(wd.path),
        report=rep,
    )


def _digest_inputs(cfg: Config, step) -> dict:
    """The stage's settings as its digest and record hold them (by each setting's first name)."""
    return json.loads(json.dumps({digest_name(n): getattr(cfg, n) for n in step.inputs}))


def _banner(stage: str, text: str):
    print(f"\n==== [{stage}] {text}", flush=True)


@training.fused_batchnorm()  # the measured training speed-up (BENCHMARKS.md), only while the stages run
def run_pipeline(cfg: Config, *, user_teacher=None, user_data=None, stop_after: str | None = None) -> CompressionResult:
    """Run (or resume) every stage for ``cfg``; the CLI and ``compress`` both land here.

    ``stop_after`` (default ``cfg.stop_after``) ends the run after that stage, finished or reused.
    """
    cfg.validate()
    stop_after = stop_after or cfg.stop_after or None
    if cfg.targets:
        return _run_front(cfg, user_teacher, user_data, stop_after)
    if cfg.strategy == "multi_worker":
        cluster = multiworker.Cluster(cfg.workdir, multiworker.config_digest(cfg.to_dict()), timeout=cfg.worker_timeout)
        wd = Workdir(cfg.workdir)
        # Every worker runs this in one shared workdir on purpose: each holds its task's lock.
        with wd.lock(f".lock-{cluster.me}"), multiworker.running(cluster):
            return _run_locked(cfg, wd, user_teacher, user_data, stop_after, cluster)
    wd = Workdir(cfg.workdir)
    with wd.lock(".lock"):
        return _run_locked(cfg, wd, user_teacher, user_data, stop_after)


def _run_front(cfg: Config, user_teacher, user_data, stop_after) -> list[CompressionResult]:
    """One student per ``--targets`` item (:mod:`mskd_tf.front`): the shared stages once, then each item's run."""
    runs = front.item_configs(cfg)
    base_cfg = dataclasses.replace(cfg, targets=())
    wd = Workdir(cfg.workdir)
    with wd.lock(".lock"):
        splits = None if user_data is not None else context.Context(cfg=base_cfg, wd=wd).data  # loaded once
        for _, run_cfg in runs:  # every item's targets are checked before anything trains
            checks.preflight(context.Context(cfg=run_cfg, wd=wd, user_teacher=user_teacher, user_data=user_data,
                                             _splits=splits), "teacher")
        shared_end = stop_after if stop_after in front.SHARED_STAGES else front.SHARED_STAGES[-1]
        _run_locked(base_cfg, wd, user_teacher, user_data, shared_end, splits=splits)
        if stop_after in front.SHARED_STAGES:
            return []
        results = []
        for item, run_cfg in runs:
            run_wd = Workdir(run_cfg.workdir)
            with run_wd.lock(".lock"):
                had_candidates = "candidates" in run_wd.state
                if front.share(wd, run_wd) and had_candidates and not run_cfg.restart_from:  # new teacher/rankings
                    run_cfg = dataclasses.replace(run_cfg, restart_from="candidates")
                if run_cfg.restart_from in front.SHARED_STAGES:
                    run_cfg = dataclasses.replace(run_cfg, restart_from="candidates")
                print(f"\n######## --targets item {item}: {run_cfg.workdir}", flush=True)
                results.append(_run_locked(run_cfg, run_wd, user_teacher, user_data, stop_after, splits=splits))
            # After every item, so a user reads the students finished so far while the next ones train (hours each).
            finished = runs[:len(results)]
            front.write(wd, front.rows([item for item, _ in finished], [Path(c.workdir) for _, c in finished]),
                        pending=[item for item, _ in runs[len(results):]])
    return results


def _run_locked(cfg: Config, wd: Workdir, user_teacher, user_data, stop_after, cluster=None,
                splits=None) -> CompressionResult:
    ctx = context.Context(cfg=cfg, wd=wd, user_teacher=user_teacher, user_data=user_data, cluster=cluster,
                          _splits=splits)
    if cluster is not None and not cluster.is_chief:
        return _follow_chief(ctx, stop_after)
    restart = cfg.restart_from
    previous_digest = ""
    redo = False
    timings = {}
    for step in stages.PIPELINE:
        stage = step.name
        inputs = _digest_inputs(cfg, step)
        if stage == "teacher" and user_teacher is not None:
            inputs["user_teacher_weights"] = weights_digest(user_teacher)
        digest = stages.chain_digest(previous_digest, inputs)
        previous_digest = digest
        artifacts = stages.artifacts_of(ctx, step)
        if cluster is not None:
            cluster.stage = stage
        done, why = wd.stage_status(stage, digest, inputs, artifacts, shown=CURRENT_NAMES)
        if done and stage == restart:
            done, why = False, f"--restart_from={restart}"
        if done and redo:
            done, why = False, "an earlier stage was redone"
        if done and not stages.artifacts_load(ctx, step):
            done, why = False, "its artifact is damaged (cannot be loaded)"
        if cluster is not None:  # the workers follow the chief's decision, never their own reading of the files
            cluster.announce(f"plan-{stage}", {"run": not done, "why": why})
        if done:
            _banner(stage, f"done already, reusing {', '.join(artifacts)}")
            timings[stage] = wd.state[stage]["seconds"]
            if stage == stop_after:
                break
            continue
        if not redo:  # the first stage with work to do: check data and model before anything trains
            checks.preflight(ctx, stage)
        redo = True
        _banner(stage, f"running ({why})")
        wd.forget(stage)
        start = time.perf_counter()
        ctx.stage_digest = digest
        with training.seeded(cfg.seed):  # every stage starts from the seed; the caller's RNGs are given back
            step.run(ctx)
        seconds = time.perf_counter() - start
        wd.mark_done(stage, digest, inputs, seconds)
        if cluster is not None:
            cluster.announce(f"done-{stage}")
        timings[stage] = round(seconds, 3)
        print(f"==== [{stage}] finished in {seconds:.1f} s", flush=True)
        if stage == stop_after:
            break
    if stop_after and stop_after != STAGES[-1]:
        print(f"\nStopped after {stop_after} (stop_after); the same command without it continues from here.", flush=True)
    return result(ctx, timings)


def _follow_chief(ctx, stop_after) -> CompressionResult:
    """A worker that is not the chief: train the lock-step stages with it, wait for its artifacts of the others."""
    cluster, cfg = ctx.cluster, ctx.cfg
    previous_digest, timings = "", {}
    for step in stages.PIPELINE:
        stage = step.name
        inputs = _digest_inputs(cfg, step)
        previous_digest = ctx.stage_digest = stages.chain_digest(previous_digest, inputs)
        cluster.stage = stage
        plan = cluster.wait(f"plan-{stage}", f"the chief's decision about the {stage} stage")
        start = time.perf_counter()
        if not plan["run"]:
            _banner(stage, f"done already, reusing {', '.join(step.artifacts)} (the chief's decision)")
        elif stages.runs_on_every_worker(ctx, stage):
            _banner(stage, f"training in lock-step with the chief ({cluster.chief}); it writes the artifacts")
            with training.seeded(cfg.seed):
                step.run(ctx)
            cluster.wait(f"done-{stage}", f"the {stage} stage's artifacts")
        else:
            _banner(stage, f"runs on the chief ({cluster.chief}); waiting for {', '.join(step.artifacts)}")
            cluster.wait(f"done-{stage}", f"the {stage} stage's artifacts ({', '.join(step.artifacts)})")
        timings[stage] = round(time.perf_counter() - start, 3)
        if stage == stop_after:
            break
    return result(ctx, timings)


# compress()'s own arguments: a settings dict or keyword naming one of them would set it twice.
_OWN_ARGUMENTS = ("target_macs", "target_params", "target_arena_kb", "target_flash_kb", "criteria", "strategy", "export",
                  "workdir", "seed")
# Settings of a run that trains its own teacher on a named data source; compress() takes a trained model and data.
_NOT_FOR_A_TRAINED_MODEL = {
    **dict.fromkeys(("dataset", "data_dir", "download", "train_subset"),
                    "compress() takes the data as arguments (train, val, test); slice your arrays to use fewer"),
    "val_fraction": "pass val=(x_val, y_val) (with val=None, 10% of numpy train data is held out)",
    "augment": "numpy input is not augmented; pass a tf.data dataset that augments, as train",
    **dict.fromkeys(("model", "teacher", "width"), "the model is compress()'s first argument"),
    **dict.fromkeys(("teacher_epochs", "epochs", "teacher_lr", "lr", "schedule", "momentum"),
                    "it trains a teacher, and compress() starts from yours (the student's training: "
                    "student_epochs, finetune_lr, kd_lr_scale)"),
}


def _settings(values: dict, *, where: str) -> dict:
    """Config settings given to compress() by name, each checked to be one that applies to a trained model."""
    names = {f.name for f in Config.fields()}
    values = dict(values)
    for old in [k for k in values if k in CURRENT_NAMES and k not in _NOT_FOR_A_TRAINED_MODEL]:
        warnings.warn(renamed_warning(old, ""), DeprecationWarning, stacklevel=4)
        values[CURRENT_NAMES[old]] = values.pop(old)
    for key in values:
        if key in _OWN_ARGUMENTS:
            raise MskdError(f"{where}{key}: pass it as compress()'s own argument, compress(..., {key}=...).")
        if key in _NOT_FOR_A_TRAINED_MODEL:
            raise MskdError(f"{where}{key}={values[key]!r} does not apply to compress(): {_NOT_FOR_A_TRAINED_MODEL[key]}.")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names - set(_NOT_FOR_A_TRAINED_MODEL)), n=1)
            raise MskdError(f"{where}{key}: not a setting" + (f"; did you mean {close[0]}?" if close else "")
                            + " (the fields of mskd_tf.Config are the settings).")
    return dict(values)


def compress(
    model,
    train,
    val=None,
    *,
    test=None,
    target_macs: float = 0.5,
    target_params: float = 0.0,
    target_arena_kb: float = 0.0,
    target_flash_kb: float = 0.0,
    criteria=None,
    selection: dict | None = None,
    distill: dict | None = None,
    strategy: str | None = None,
    export=None,
    workdir: str | None = None,
    seed: int = 0,
    class_names=None,
    **settings,
) -> CompressionResult:
    """Compress a trained Keras functional model with MS-KD.

    Ranks the model's channels with several criteria, builds one slimmer clone per
    criterion and allocation at ``target_macs`` of the model's MACs, chooses one on
    validation data (by default before any training step; ``select_epochs`` > 0
    fine-tunes the candidates first), distills it from ``model``, and exports TFLite files.

    Args:
      model: a trained ``keras.Model`` (functional) that outputs logits or probabilities.
      train: ``tf.data.Dataset`` of ``(images, int_labels)`` batches, or a numpy
        tuple ``(x, y)`` (batched here with batch size 128; uint8 images are scaled to
        [0, 1], float images are passed to the model as they are).
      val: the same for validation; ``None`` carves 10% of ``train`` (numpy only).
      test: optional held-out data for the final and exported accuracies (defaults to ``val``).
      target_macs: fraction of the model's MACs the student keeps at most, in (0, 1].
      target_params: parameters the student keeps at most: a fraction (<= 1) or a count; 0 = no limit.
      target_arena_kb: the int8 student must run in a TFLite Micro tensor arena of this many KB (measured on
        each candidate); 0 = no limit. With a device target the candidates keep the largest MACs ratio, up to
        ``target_macs``, that meets every target: pass ``target_macs=1`` to let the device alone decide.
      target_flash_kb: the int8 student's .tflite file must be at most this many KB; 0 = no limit.
      criteria: names of pruning criteria (default: all registered).
      selection, distill: deprecated dicts of settings; pass them as keyword arguments instead.
      strategy: ``"default"``, ``"one_device"``, ``"mirrored"``, ``"multi_worker"`` or ``"tpu"``.
      export: TFLite variants among ``float32``, ``dynamic``, ``float16``, ``int8`` (default: the pipeline's,
        ``float32`` and ``int8``).
      workdir: where artifacts go (a temporary folder when ``None``); rerunning with the same
        workdir resumes.
      seed: seeds every stage.
      **settings: any other setting of :class:`mskd_tf.Config` that applies to a model you trained, by its
        name and type: ``select_epochs=2``, ``student_epochs=5``, ``alpha=0.5``, ``allocations=("uniform",)``,
        ``round_to=1``, ``batch_size=64`` ... (the fields of :class:`mskd_tf.Config`). A name that is
        not a setting, or a teacher-training or data-source setting (``teacher_epochs``, ``teacher_lr``, ``dataset``,
        ``val_fraction`` ...), raises :class:`MskdError` saying what to do instead. ``targets=("macs=0.3",
        "arena_kb=64")`` makes one student per item (sharing the rankings) and returns a list of results.

    Example::

        import keras, numpy as np, mskd_tf
        (x, y), _ = keras.datasets.mnist.load_data()        # any (N, H, W, C) images + int labels
        teacher = keras.models.load_model("teacher.keras")  # a trained functional model
        result = mskd_tf.compress(teacher, (x[..., None] / 255.0, y), target_macs=0.5)
        result.student.save("student.keras"); print(result.summary())
    """
    try:
        return _compress(model, train, val, test=test, target_macs=target_macs, target_params=target_params,
                         target_arena_kb=target_arena_kb, target_flash_kb=target_flash_kb, criteria=criteria,
                         selection=selection, distill=distill, strategy=strategy, export=export, workdir=workdir,
                         seed=seed, class_names=class_names, settings=settings)
    except MskdError as exc:  # the API speaks of arguments (target_macs=2.0), not flags (--target_macs=2.0)
        exc.args = (as_arguments(str(exc)),)
        raise


def _compress(model, train, val, *, test, target_macs, target_params, target_arena_kb, target_flash_kb, criteria,
              selection, distill, strategy, export, workdir, seed, class_names, settings) -> CompressionResult:
    import tempfile

    import keras

    from mskd_tf.pruning.graph import require_layer_graph

    if not isinstance(model, keras.Model):
        raise MskdError(f"model: expected a keras.Model, got {type(model).__name__}.")
    require_layer_graph(model)  # a subclassed model has no input/output shapes to check the data against
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise MskdError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                        "mskd_tf compresses single-input, single-output classifiers (images in, class scores out).")
    overrides = {}
    for name, group in (("selection", selection), ("distill", distill)):
        if group is not None and not isinstance(group, dict):
            raise MskdError(f"{name}: expected a dict of settings, e.g. {{'select_epochs': 2}}; got {type(group).__name__}.")
        overrides.update(_settings(group or {}, where=f"{name}: "))
        if group:
            warnings.warn(f"compress({name}={{...}}) is deprecated: pass the settings as keyword arguments, e.g. "
                          f"compress(..., {', '.join(f'{k}={v!r}' for k, v in group.items())}).", DeprecationWarning,
                          stacklevel=3)
    overrides.update(_settings(settings, where=""))
    export = Config().export if export is None else (export,) if isinstance(export, str) else export
    criteria = (criteria,) if isinstance(criteria, str) else criteria
    for name, value in (("export", export), ("criteria", criteria), ("class_names", class_names)):
        if value is not None and not isinstance(value, (tuple, list)):
            raise MskdError(f"{name}: expected a list of names, got {type(value).__name__} {value!r}.")
    if workdir is not None and not isinstance(workdir, (str, Path)):
        raise MskdError(f"workdir: expected a folder path, got {type(workdir).__name__} {workdir!r}.")
    # The MCU kit follows the int8 export unless asked for: export=("float32",) alone is no reason to warn.
    explicit_micro = "micro" in overrides
    overrides.setdefault("micro", "int8" in tuple(export))
    cfg = Config(
        dataset="user",
        workdir=str(workdir) if workdir else tempfile.mkdtemp(prefix="mskd_tf-"),
        target_macs=target_macs,
        target_params=target_params,
        target_arena_kb=target_arena_kb,
        target_flash_kb=target_flash_kb,
        strategy=strategy or "default",
        export=tuple(export),
        seed=seed,
        **overrides,
    )
    if criteria is not None:
        cfg.criteria = tuple(criteria)
    cfg.validate()
    cfg.check_micro(explicit=explicit_micro)
    user_data = context.user_data(model, train, val, test, batch_size=cfg.batch_size, seed=seed,
                                 class_names=class_names)
    if class_names is not None and len(class_names) != user_data.info.num_classes:
        raise MskdError(f"class_names: {len(class_names)} names for a model with {user_data.info.num_classes} outputs.")
    return run_pipeline(cfg, user_teacher=model, user_data=user_data)


