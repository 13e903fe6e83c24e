"""The pipeline's stages: each reads earlier artifacts and writes its own.

``PIPELINE`` lists them in order, each a :class:`Stage`: the Config fields its artifact
depends on, the files it leaves in the workdir and the function that makes them;
:mod:`mskd_tf.api` decides which stages need to run. The short stages (rank, select, report)
are here; the others have a module each in this package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from mskd_tf.config import STAGES
from mskd_tf.context import Context, pct
from mskd_tf.pruning.rankings import save_rankings
from mskd_tf.stages.candidates import run as run_candidates
from mskd_tf.stages.distill import run as run_distill
from mskd_tf.stages.export import run as run_export
from mskd_tf.stages.teacher import run as run_teacher


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
    "targets": "which students one run makes, each in its own work dir with its own targets",
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


def run_rank(ctx: Context):
    from mskd_tf.pruning import build_graph, criteria

    cfg = ctx.cfg
    teacher = ctx.model("teacher.keras")
    graph = build_graph(teacher, skip=())
    needs_data = [c for c in cfg.criteria if criteria.REGISTRY[c].needs_data]
    calibration = ctx.calibration if needs_data else None
    rankings = criteria.rank(teacher, cfg.criteria, calibration, graph=graph, num_batches=cfg.criteria_batches,
                             seed=cfg.seed)
    save_rankings(str(ctx.wd / "rankings.json"), rankings, graph)
    print(f"rank: {len(rankings)} criteria x {sum(g.prunable for g in graph.groups)} prunable groups", flush=True)


def run_select(ctx: Context):
    from mskd_tf import selection

    cfg = ctx.cfg
    rows = [row for row in ctx.wd.read_json("candidates.json")["candidates"] if "same_as" not in row]  # distinct ones
    paths = {row["criterion"]: str(ctx.wd / f"candidates/{row['criterion']}.keras") for row in rows}
    teacher = None
    if cfg.select_loss == "kd":
        teacher_val = ctx.wd.read_json("teacher.json").get("val_acc")
        best = max(rows, key=lambda r: r.get("val_acc_before_finetune") or 0.0)
        if teacher_val is not None and (best.get("val_acc_before_finetune") or 0.0) > teacher_val:
            print(f"select: WARNING: candidate {best['criterion']} scores {pct(best['val_acc_before_finetune'])} on "
                  f"validation before any fine-tuning, the teacher only {pct(teacher_val)}: selecting with "
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
        strategy=None if cfg.parallel_selection else ctx.strategy(), parallel=cfg.parallel_selection,
        wait_timeout=cfg.worker_timeout, wait_check=ctx.cluster.check_alive if ctx.cluster else None,
        seed=cfg.seed,
    )
    sel = result["selected"]
    if ctx.writes:
        print(f"select: chose {sel['criterion']} ({sel['reason']})", flush=True)


def run_report(ctx: Context):
    from mskd_tf import report

    payload = report.build(ctx)
    ctx.wd.write_json("report.json", payload)
    with ctx.wd.atomic("report.md") as tmp:
        tmp.write_text(report.markdown(payload))
    report.plots(payload, ctx.wd)
    print("\n" + report.summary_table(payload), flush=True)


PIPELINE = (
    Stage("teacher", ("dataset", "data_dir", "val_fraction", "train_subset", "augment", "batch_size", "seed", "model",
                      "teacher", "width", "teacher_epochs", "optimizer", "teacher_lr", "schedule", "momentum", "weight_decay"),
          ("teacher.keras", "teacher.json"), run_teacher),
    Stage("rank", ("criteria", "criteria_batches"), ("rankings.json",), run_rank),
    Stage("candidates", ("target_macs", "target_params", "target_arena_kb", "target_flash_kb", "target_latency_ms",
                         "latency_threads", "allocations", "round_to", "min_channels", "protect",
                         "bn_recalibration_batches"), ("candidates.json",), run_candidates, listed=candidate_files),
    Stage("select", ("select_epochs", "zero_cost_keep", "min_params_ratio", "select_loss", "successive_halving", "tie_tolerance",
                     "finetune_lr", "kd_lr_scale", "temperature", "alpha"), ("selected.keras", "selection.json"),
          run_select),
    Stage("distill", ("student_epochs", "temperature", "alpha", "feature_kd", "distill_baseline"),
          ("student.keras", "distill.json"), run_distill),
    Stage("export", ("export", "int8_calibration_samples", "qat", "micro"), ("export.json",), run_export),
    Stage("report", (), ("report.json", "report.md"), run_report),
)
assert tuple(stage.name for stage in PIPELINE) == STAGES, "config.STAGES names the flag choices: keep them equal"
