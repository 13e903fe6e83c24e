"""The candidates stage: one slimmer network per criterion x allocation, each planned to the targets."""

from __future__ import annotations

import dataclasses
import json

from mskd_tf.context import Context, evaluate
from mskd_tf.pruning.rankings import load_rankings


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


def run(ctx: Context):
    from mskd_tf import batchnorm, device_targets, flops, report
    from mskd_tf.pruning import build_graph
    from mskd_tf.pruning.candidates import build_candidates, layer_widths, overlap_matrix

    cfg = ctx.cfg
    teacher = ctx.model("teacher.keras")
    graph = build_graph(teacher)
    rankings = load_rankings(str(ctx.wd / "rankings.json"), graph=graph)
    rankings = {name: rankings[name] for name in cfg.criteria}
    candidates = []

    def finish(clone) -> float:
        """BatchNorm statistics re-estimated on calibration batches, then the accuracy on validation."""
        batchnorm.recalibrate_batchnorm(clone, ctx.calibration, cfg.bn_recalibration_batches)
        return float(evaluate(clone, ctx.data.val))

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

        def build(some_rankings, max_macs=None, predicted=True, mode=mode, allocation=allocation, finished=True):
            planner = None
            if allocation == "sensitivity":
                planner = _sensitivity_planner(ctx, teacher, graph, plan_options)
            elif devices is not None:
                planner = devices.planner(mode, max_macs, predicted)
            return build_candidates(
                teacher, some_rankings, target_macs=cfg.target_macs, graph=graph, mode=mode, planner=planner,
                evaluate=finish if finished else None, **plan_options,
            )

        # With device targets a plan is measured first (its shape decides, and a miss is planned again): only the
        # network kept gets its BatchNorm re-estimated and its validation accuracy.
        for c in build(rankings, finished=devices is None):  # named by criterion (+ allocation when several)
            measured = (c, {})
            if devices:
                kept, costs = devices.verified(
                    c, lambda max_macs, predicted, c=c, build=build: build({c.criterion: rankings[c.criterion]},
                                                                           max_macs, predicted, finished=False)[0],
                    teacher_macs, search_key=allocation, widen=allocation == "uniform")
                measured = (dataclasses.replace(kept, accuracy=finish(kept.model)), costs)
            candidates.append((candidate_name(c.criterion, allocation, cfg.allocations), c.criterion, allocation,
                               *measured))
    teacher_widths = layer_widths(graph, {})
    rows, first_keeping = [], {}
    for name, criterion, allocation, c, measured in candidates:
        ctx.wd.save_model(c.model, f"candidates/{name}.keras")
        row = c.row()
        row["val_acc_before_finetune"] = row.pop("accuracy")
        kept = {k: [int(i) for i in v] for k, v in c.keep.items()}
        rows.append(dict(row, criterion=name, ranking=criterion, allocation=allocation,
                         macs_ratio=c.macs / teacher_macs, teacher_widths=teacher_widths, kept=kept, **measured))
        # Two candidates keeping the same channels are one network: selection sees it once, under the first name.
        same = first_keeping.setdefault(json.dumps(kept, sort_keys=True), name)
        if same != name:
            rows[-1]["same_as"] = same
            print(f"candidates: {name} keeps the same channels as {same}: one network, selected as {same}", flush=True)
    candidates = [dataclasses.replace(c, criterion=name) for (name, _, _, c, _), row in zip(candidates, rows)
                  if "same_as" not in row]
    overlap = overlap_matrix({c.criterion: c.keep for c in candidates})
    record = {"candidates": rows, "jaccard": overlap}
    if devices is not None:
        record["targets"] = {"limits": devices.limits, "teacher": devices.teacher_measured}
    ctx.wd.write_json("candidates.json", record)
    print(report.candidates_table(rows) + "\n\nJaccard overlap of kept channels:\n\n"
          + report.overlap_table(overlap), flush=True)
