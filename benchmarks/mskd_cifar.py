"""MS-KD vs single-criterion prune + fine-tune on full CIFAR-10, at one training budget (issue 13).

    benchmarks/mskd_cifar.sh                  # the whole table, resumable; -> benchmarks/results/mskd_cifar.{json,md}
    benchmarks/mskd_cifar.sh --max_rows=3     # stop after three newly finished rows (one sitting)
    benchmarks/mskd_cifar.sh --render_only    # print the table of the rows finished so far
    benchmarks/mskd_cifar.sh --plan_only      # print the plan: every row in order, cached or still to compute
    benchmarks/mskd_cifar.sh --quick          # a ~10-minute smoke version on 5k images (its own files)
    benchmarks/mskd_cifar.sh --model=mobilenet_v2 --width=0.5 --teacher_epochs=80 --teacher_only  # its teacher only
    benchmarks/mskd_cifar.sh --model=mobilenet_v2 --width=0.5 --teacher_epochs=80  # the MobileNetV2 0.5 study
        # -> benchmarks/results/mskd_cifar_mobilenet_v2_w0.5.{json,md}; add --plan_only to see its rows first

This driver holds the flags and a sitting's order; the rows and their plan (``mskd_cifar_rows.py``), the table and
its cache (``mskd_cifar_table.py``), the candidate sets' pipeline stages (``mskd_cifar_sets.py``), training a row
(``mskd_cifar_training.py``), the rendered table (``mskd_cifar_report.py``) and the MobileNetV2 rules
(``mskd_cifar_rules.py``) are modules of their own.

Protocol
--------
* Data: CIFAR-10 from ``../shared/data`` (45k train / 5k validation carved with seed 0 / the 10k test set).
* Teacher: ``--model`` at ``--width`` (ResNet-20 by default) trained once by the pipeline's own teacher stage (``--teacher_epochs``, SGD, cosine);
  ranks and candidates by the pipeline's own rank and candidates stages (every criterion x the global and
  uniform allocations, BatchNorm-recalibrated, at ``--target_macs``). Every row starts from these files;
  their content (the teacher's weights, the candidates' kept channels) is stored with the rows, and a change
  empties the table. The teacher and the rankings are mirrored into ``benchmarks/artifacts/`` (committed with the
  rows) and restored from there into a fresh clone, which rebuilds the candidates from them, so a table is built
  over several sessions against the same networks (``benchmarks/artifacts.py``).
* Budget: every student row gets the same ``--budget`` epochs of optimizer steps (batch 128), counted in
  steps and printed per row. **MS-KD's selection steps are inside the budget**: selection spends
  ``--select_epochs`` over all candidates, the winner keeps its fine-tuned weights, and distillation
  trains what is left. Same optimizer, schedule (cosine to 0) and data for every row; the peak learning rate is
  ``--finetune_lr`` for CE and ``--finetune_lr`` x the library's ``Config.kd_lr_scale`` under the KD loss, as in
  the pipeline (rows of another KD rate say so: ``kd:l1-uniform[lr=0.05]``).
* Rows: ``experiment_plan`` (``mskd_cifar_rows.py``) is the whole experiment, one ``Row`` (kind, candidate, loss, seed,
  MACs target, overridden settings) per training, in the order they are computed (a sitting ends after any of
  them; a rerun resumes at the first not cached). In that order: seed 0's decisive rows: ``ce:l1-uniform`` (l1 +
  CE with a uniform per-layer ratio: Li et al. / Torch-Pruning's default), ``mskd`` (the library's select +
  distill), ``select+ce`` (MS-KD's selection, then CE: the KD ablation), ``kd:l1-uniform`` (l1 + KD, no
  selection); seeds 1 and 2 of ``ce:l1-uniform`` and seed 1 of ``ce:l2-uniform`` (one row's seed noise); seeds 1
  and 2 of the decisive rows; ``zc+kd`` (the capacity pool's zero-cost top + KD for the whole budget: what the
  selection's training steps buy; also at the ``--zc_kd_seeds``, and at those seeds on every other target);
  every candidate + CE (the oracle table, seed 0, best zero-cost score first); the ``--other_targets`` (l1 + CE,
  l1 + KD, MS-KD at seed 0; l1 + KD and MS-KD also at the ``--other_target_seeds``); the oracle-best + CE at
  seeds 1 and 2; then the ablations (right after seed 0's decisive rows with ``--ablations_first``): l1 + KD with
  one ``--kd_ablation`` setting changed each (``kd:l1-uniform[alpha=0.1]``); MS-KD and l1 + KD at every seed
  under each ``--mskd_kd_ablation`` setting (``mskd[alpha=0.1]``: selection and distillation both under it); l1
  + CE at the ``--lr_ablation`` learning rates (is the baseline tuned fairly?); MS-KD with the
  ``--pool_ablation`` capacity pools (``mskd[min_params_ratio=0]`` = selection among all candidates, as before
  the pool existed). A row's name in the results file, its cache key, is ``row_key`` of it.
* MobileNetV2 (``--model=mobilenet_v2``): the protocol committed before any of its rows
  (docs/benchmarks/mskd_cifar_mobilenet_v2.md; its rules also in BENCHMARKS.md) instead, in its order: at
  each seed (0, then 1 and 2) ``ce:l1-uniform``, ``kd:l1-uniform``, ``zc+kd`` (the library's default: what
  ``python -m mskd_tf.run`` does with no selection flags) and ``mskd`` (fine-tuned selection for the table's
  ``--select_epochs``, 1.5); for decision rule R2, ``zc+kd[allocations=global+uniform+sensitivity]`` at every
  seed (the default on candidates built with the opt-in ``sensitivity`` allocation too, in the work dir
  ``..._global+uniform+sensitivity``, digest-checked as the other targets' are); the oracle (every distinct
  candidate + CE at seed 0, candidates keeping the same channels merged, best zero-cost score first; if more
  than 12, the best two of each allocation plus ``l1`` of each; ``--plan_only`` says which rule applied); l1 + CE,
  l1 + KD and ``zc+kd`` at the ``--other_targets``. No ablations unless their flags are given. Its decision rules
  R1-R4 are applied, as written, in the rendered table (``mskd_cifar_rules.py``).
* Every student row is also exported as the export stage ships it (full int8, calibrated on 200 training images)
  and its LiteRT test accuracy recorded beside the Keras one (``int8_test_acc``; rows cached before this have none);
  the .tflite stays in the candidate set's work dir under ``int8/``.
* A student row keeps an epoch backup (``<workdir>/row_backups/``, named by the row and its start weights) until
  it is cached: a sitting that ends mid-row resumes it at its last finished epoch, on the same batches.
"""

from __future__ import annotations

import dataclasses
import json

import results_io
from mskd_cifar_report import plot_macs, render
from mskd_cifar_rows import (ORACLE_MAX_NETWORKS, candidate_set, experiment_plan, follows_mobilenet_protocol,
                             mobilenet_oracle, oracle_criterion, row_key, setting_tags, zero_cost_twins)
from mskd_cifar_sets import guard_the_table, prepare, run_stages, stored_candidates
from mskd_cifar_table import Results, guard_the_images, machine
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet20", "Teacher architecture (mskd_tf.models.build name).")
flags.DEFINE_float("width", 1.0, "Width multiplier of the teacher (mobilenet_v2).")
flags.DEFINE_bool("teacher_only", False, "Train (or resume) the teacher through the pipeline's teacher stage, then stop.")
flags.DEFINE_bool("quick", False, "Smoke version: 5k training images, 4-epoch teacher, 2-epoch budget, 1 seed.")
flags.DEFINE_integer("teacher_epochs", 50, "Teacher epochs (the full protocol's teacher; ~1 h on 2 cores).")
flags.DEFINE_float("budget", 15.0, "Student budget B in epochs of the training split, selection included.")
flags.DEFINE_float("select_epochs", 1.5, "What MS-KD's selection spends of B (all candidates together).")
flags.DEFINE_integer("zero_cost_keep", 4, "Candidates kept by the zero-cost rung.")
flags.DEFINE_float("min_params_ratio", None, "MS-KD's capacity pool (default: the library's, Config.min_params_ratio); "
                   "the rows of other values are named mskd[min_params_ratio=R].")
flags.DEFINE_list("pool_ablation", ["0"], "min_params_ratio values of the MS-KD ablation rows (seed 0); 0 is the "
                  "selection before the capacity pool existed. Like --kd_ablation and --lr_ablation: none in the "
                  "MobileNetV2 protocol unless given.")
flags.DEFINE_float("weight_decay", 5e-3, "Decoupled weight decay of the teacher and every student row (Keras "
                   "applies lr x wd per step: 5e-3 equals the usual SGD-momentum-0.9 L2 of 5e-4).")
flags.DEFINE_float("finetune_lr", 0.05, "Peak learning rate of every CE student row (cosine to 0); runs under the KD "
                   "loss (selection, KD rows) train at finetune_lr x the library's Config.kd_lr_scale, as the "
                   "pipeline does.")
flags.DEFINE_float("temperature", 4.0, "KD temperature.")
flags.DEFINE_float("alpha", 0.5, "KD weight of the label cross-entropy.")
flags.DEFINE_integer("round_to", 8, "Kept widths are multiples of this. Measured: the l1-uniform clone at 50% MACs with "
                     "free widths (7, 13, 26 channels) trained no faster than the whole teacher (426 vs 427 ms/step), "
                     "with multiples of 8 at 262 ms/step (oneDNN's blocked kernels).")
flags.DEFINE_float("target_macs", 0.5, "Fraction of the teacher's MACs of the decisive rows.")
flags.DEFINE_list("other_targets", ["0.3", "0.7"], "Further MACs fractions (l1 + CE, l1 + KD, MS-KD, seed 0).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the decisive rows.")
flags.DEFINE_list("other_target_seeds", [], "Seeds beyond the first for l1 + KD and MS-KD (MobileNetV2 protocol: "
                  "zc+kd) at the --other_targets (after their seed-0 rows): is a difference between them there more "
                  "than one row's noise?")
flags.DEFINE_list("lr_ablation", ["0.02", "0.1"], "Other peak learning rates for l1 + CE (seed 0): is the "
                  "baseline's learning rate a fair one?")
flags.DEFINE_list("kd_ablation", ["alpha=0.1", "temperature=2", "feature_kd=1"],
                  "l1 + KD rows with one KD setting changed (seed 0), key=value of distill.distill, or lr=<peak learning rate>.")
flags.DEFINE_list("mskd_kd_ablation", [],
                  "KD settings (key=value, as --kd_ablation) under which MS-KD (selection and distillation) and l1 + KD "
                  "are recomputed at every seed: the 3-seed test of a KD setting that won its --kd_ablation row.")
flags.DEFINE_bool("sensitivity_rows", False, "ResNet-20 plan: add decision rule R2's rows (the zero-cost pick + KD on "
                  "candidates built with the sensitivity allocation too, at every seed) after the other targets; the "
                  "MobileNetV2 protocol has them always.")
flags.DEFINE_bool("ablations_first", False, "Compute the ablation rows right after seed 0's decisive rows instead of "
                  "last (when seed 0 already raises the question they answer); the table is the same.")
flags.DEFINE_list("first", [], "Rows of one candidate to compute before the script's order, each "
                  "'ce:<candidate>/s<seed>' or 'kd:<candidate>[lr=<rate>]/s<seed>' (e.g. an oracle row that a finished row raised a "
                  "question about); they are the same rows the order computes later (same names, same cache).")
flags.DEFINE_list("later", [], "Row names not to compute in this sitting (the script goes on with the next row; "
                  "a run without them computes them where the order puts them), e.g. an ablation whose answer is "
                  "already in another row.")
flags.DEFINE_list("zc_kd_seeds", [], "Seeds at which to compute zc+kd (the capacity pool's zero-cost top + KD for the "
                  "whole budget, no selection training) at every MACs target: the 3-seed test of zero-cost-only "
                  "selection against MS-KD and l1 + KD. Where the table already has kd:<that candidate>/s<seed>, that "
                  "row is the zc+kd row (the same run).")
flags.DEFINE_integer("max_rows", 0, "Stop after this many newly computed rows (0 = all).")
flags.DEFINE_list("forget", [], "Drop the cached rows whose names start with these prefixes before running, e.g. "
                  "--forget=select/,mskd/,select+ce/ after a change to selection (rows are cached by name and by the "
                  "digests of their input files, not by library commit); a name ending in $ drops that row only "
                  "(mskd/s0$ keeps mskd/s0@30).")
flags.DEFINE_bool("keep_artifacts", True, "Mirror the teacher, its epoch backup, the stage records and rankings into "
                  "benchmarks/artifacts/ as they are made and restore them into an empty work dir (a fresh clone): "
                  "commit that folder with the rows and the next session resumes the same table. Off with --quick.")
flags.DEFINE_bool("new_teacher", False, "Allow training a new teacher for a table whose rows came from another "
                  "(it empties the table; without this flag such a run stops with an error).")
flags.DEFINE_bool("render_only", False, "Only print the table of the finished rows (no training).")
flags.DEFINE_bool("plan_only", False, "Only print the plan: every row in the order it is computed, its name and "
                  "whether the results file has it (nothing is trained or prepared; a run also checks the digests of "
                  "the files the rows start from).")
flags.DEFINE_string("name", None, "Results name under benchmarks/results (default mskd_cifar[_quick]).")


def settings() -> dict:
    from mskd_tf.config import Config

    quick = FLAGS.quick
    s = {"quick": quick, "dataset": f"folder:{results_io.SHARED_CIFAR10}", "model": FLAGS.model, "width": FLAGS.width,
         "batch_size": 128,
         "train_subset": 5000 if quick else 0, "teacher_epochs": 4 if quick else FLAGS.teacher_epochs,
         "teacher_lr": 0.1, "weight_decay": FLAGS.weight_decay, "budget": 2.0 if quick else FLAGS.budget,
         "select_epochs": 0.5 if quick else FLAGS.select_epochs, "zero_cost_keep": FLAGS.zero_cost_keep,
         "min_params_ratio": Config.min_params_ratio if FLAGS.min_params_ratio is None else FLAGS.min_params_ratio,
         "finetune_lr": FLAGS.finetune_lr, "kd_lr": Config(finetune_lr=FLAGS.finetune_lr).finetune_rate(kd=True),
         "temperature": FLAGS.temperature, "alpha": FLAGS.alpha,
         "target_macs": FLAGS.target_macs, "round_to": FLAGS.round_to, "other_targets": [float(t) for t in FLAGS.other_targets],
         "seeds": [0] if quick else [int(x) for x in FLAGS.seeds],
         # The library's capacity-pool floor is min_params_ratio x the median candidate's parameters (before
         # commit "capacity pool under the median": x the largest's; such rows are renamed, see Results).
         "capacity_reference": "median"}
    network = "" if (FLAGS.model, FLAGS.width) == ("resnet20", 1.0) else f"_{FLAGS.model}_w{FLAGS.width:g}"
    s["name"] = FLAGS.name or ("mskd_cifar" + network + ("_quick" if quick else ""))
    s["workdir"] = f"runs/bench_{s['name']}"
    return s


def main(_):
    s = settings()
    if FLAGS.render_only:  # also refreshes the .md and the plot, so the finished rows can be committed mid-table
        figures = json.loads((results_io.RESULTS / f"{s['name']}.json").read_text())["figures"]
        text = render(figures)
        (results_io.RESULTS / f"{s['name']}.md").write_text(text)
        plot_macs(figures, results_io.RESULTS / f"{s['name']}_macs.png")
        print(text, flush=True)
        return

    res = Results(s["name"], s, max_rows=FLAGS.max_rows)
    if FLAGS.forget:
        exact = {f[:-1] for f in FLAGS.forget if f.endswith("$")}
        prefixes = tuple(f for f in FLAGS.forget if not f.endswith("$"))
        dropped = [k for k in res.data.get("rows", {}) if k in exact or (prefixes and k.startswith(prefixes))]
        res.data["rows"] = {k: v for k, v in res.data.get("rows", {}).items() if k not in dropped}
        print(f"forgot {len(dropped)} cached rows: {', '.join(dropped) or '-'}", flush=True)
    if FLAGS.plan_only:
        print_plan(res, s)
        return

    from mskd_cifar_training import RowTrainer

    from mskd_tf import data as data_lib

    res.data["machine"] = machine()
    print(json.dumps(s), flush=True)
    splits = data_lib.load(s["dataset"], batch_size=s["batch_size"], train_subset=s["train_subset"] or None, seed=0)
    guard_the_images(res, s, data_lib.fingerprint(splits.arrays))

    # The decisive target: teacher, rank and candidates by the pipeline (the teacher trains here once).
    mirror = FLAGS.keep_artifacts and not s["quick"]
    guard_the_table(res, s, mirror=mirror, new_teacher=FLAGS.new_teacher)
    if FLAGS.teacher_only:
        wd = run_stages(s, s["target_macs"], stop_after="teacher", mirror=mirror)
        print((wd / "teacher.json").read_text(), flush=True)
        return
    wd, digests = prepare(s, s["target_macs"], mirror=mirror)
    if res.data.get("digests") != digests:
        res.data.update(digests=digests, rows={}, targets={})
    trainer = RowTrainer(s, res, splits, wd, mirror=mirror)
    teacher_info = json.loads((wd / "teacher.json").read_text())
    res.data["teacher"] = {k: teacher_info.get(k) for k in ("macs", "params", "val_acc", "test_acc", "batchnorm_repair")}
    res.data["teacher"].update(epochs=s["teacher_epochs"], seconds=json.loads((wd / "stages.json").read_text())
                               ["teacher"]["seconds"], train_images=splits.info.num_train,
                               val_images=splits.info.num_val, test_images=splits.info.num_test)
    res.data["budget_steps"], res.data["steps_per_epoch"] = trainer.budget, trainer.per_epoch

    _, _, candidates = trainer.inputs_of(s["target_macs"])
    res.data["candidates"] = {c: {k: r.get(k) for k in ("macs", "params", "val_acc_before_finetune", "ranking",
                                                         "allocation")} for c, r in candidates.items()}
    res.save()

    def next_row():
        """The plan's first row neither cached nor put off by --later (None: the table is done), each target's
        stages run as the plan reaches it."""
        res.data["oracle_criterion"] = oracle = oracle_criterion(res, candidates, s)
        for row in experiment_plan(s, candidates, oracle):
            trainer.inputs_of(*candidate_set(row))
            if not res.row(row) and row_key(row, s) not in FLAGS.later:
                return row
        return None

    while row := next_row():
        trainer.compute(row)

    text = render(res.data)
    (results_io.RESULTS / f"{s['name']}.md").write_text(text)
    plot_macs(res.data, results_io.RESULTS / f"{s['name']}_macs.png")
    print("\n" + text, flush=True)


def print_plan(res: Results, s: dict):
    """--plan_only: the plan in order, each row cached, put off (--later), the copy of a cached run or to compute,
    from the candidates a run would start from (else, at the decisive target, the table's record of them)."""
    table_set = s["target_macs"], None
    candidates = {table_set: stored_candidates(s, s["target_macs"]) or res.data.get("candidates", {})}

    def candidates_of(target, allocations):
        if (target, allocations) not in candidates:
            candidates[target, allocations] = stored_candidates(s, target, allocations)
        return candidates[target, allocations]

    plan = experiment_plan(s, candidates[table_set], oracle_criterion(res, candidates[table_set], s))
    cached = [row for row in plan if res.row(row)]
    print(f"{s['name']}: {len(plan)} rows planned, {len(cached)} cached" + ("" if candidates[table_set] else
          "; no candidates yet (their stage has not run): the rows of every candidate are not planned yet"))
    if follows_mobilenet_protocol(s):
        oracle_rule = (mobilenet_oracle(candidates[table_set])[1] if candidates[table_set] else
                       f"its rows wait for the candidates (every distinct network, candidates keeping the same "
                       f"channels being one; if more than {ORACLE_MAX_NETWORKS}, the best two by zero-cost score of "
                       "each allocation plus l1 of each allocation)")
        print(f"MobileNetV2 protocol (docs/benchmarks/mskd_cifar_mobilenet_v2.md, written before any row): mskd selects for --select_epochs="
              f"{s['select_epochs']:g} of B = {s['budget']:g} epochs (the table's, so its names carry no override); "
              f"zc+kd is the library default; oracle: {oracle_rule}")
    names = max([46, *(len(row_key(row, s)) for row in plan)])  # the column of the rows' names
    print(f"{'#':>3}  {'status':<11} {'row (its name in the results file)':<{names}} {'kind':<9} {'candidate':<18} "
          f"{'loss':<4} {'seed':>4} {'target':>6}  settings")
    selections = set()  # selections a row to compute runs first (mskd and select+ce rows share theirs)
    for number, row in enumerate(plan, 1):
        status = "cached" if row in cached else "later" if row_key(row, s) in FLAGS.later else "to compute"
        note = ""
        selection_row = dataclasses.replace(row, kind="select", loss="kd")
        if status == "to compute" and row.kind in ("mskd", "select+ce") and not res.row(selection_row):
            note = (f"  ({'after' if selection_row in selections else 'runs first'} the selection "
                    f"{row_key(selection_row, s)})")
            selections.add(selection_row)
        if status == "to compute" and row.kind == "zc+kd":
            twin = next((twin for twin in zero_cost_twins(row, s, candidates_of) if res.row(twin)), None)
            if twin:
                status, note = "copy", f"  (of {row_key(twin, s)}, the same run)"
        print(f"{number:>3}  {status:<11} {row_key(row, s):<{names}} {row.kind:<9} {row.candidate or '-':<18} "
              f"{row.loss:<4} {row.seed:>4} {row.target:>6g}  {', '.join(setting_tags(row.settings)) or '-'}{note}")


if __name__ == "__main__":
    app.run(main)
