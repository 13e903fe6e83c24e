"""Checks before any training: the data, the architecture or teacher, ``--protect``, device targets, the budget."""

from __future__ import annotations

from mskd_tf.config import STAGES
from mskd_tf.context import Context
from mskd_tf.errors import MskdError
from mskd_tf.stages.teacher import given_teacher


def preflight(ctx: Context, first_stage: str):
    """Every check that needs the data or the model, before ``first_stage`` (the first to run) trains anything.

    Loading the data runs :func:`mskd_tf.data.check_splits` (the API's data were checked by
    :func:`mskd_tf.context.user_data`, with the same function). The teacher, or for ``--model`` the untrained
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
        teacher, where = given_teacher(ctx), f"--teacher={cfg.teacher}"
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
    """Selection's epochs are taken from --student_epochs: refuse, before any training, a budget they use up."""
    from mskd_tf import training

    cfg = ctx.cfg
    if cfg.select_epochs <= 0 or ctx.data.train is None:
        return
    per_epoch = training.steps_per_epoch(ctx.data.train)
    budget = training.budget_steps(cfg.student_epochs, per_epoch)
    selection = training.budget_steps(cfg.select_epochs, per_epoch)  # at least this; halving may add a few
    if budget - selection < 1:
        raise MskdError(f"--student_epochs={cfg.student_epochs:g} ({budget} steps of {per_epoch} per epoch) is the "
                        f"student's whole budget, and --select_epochs={cfg.select_epochs:g} spends {selection} of "
                        "them: raise --student_epochs or lower --select_epochs (0: the zero-cost pick, no steps).")
