"""MS-KD vs single-criterion prune + fine-tune on full CIFAR-10, at one training budget (issue 13).

    benchmarks/mskd_cifar.sh                  # the whole table, resumable; -> benchmarks/results/mskd_cifar.{json,md}
    benchmarks/mskd_cifar.sh --max_rows=3     # stop after three newly finished rows (one sitting)
    benchmarks/mskd_cifar.sh --render_only    # print the table of the rows finished so far
    benchmarks/mskd_cifar.sh --plan_only      # print the plan: every row in order, cached or still to compute
    benchmarks/mskd_cifar.sh --quick          # a ~10-minute smoke version on 5k images (its own files)
    benchmarks/mskd_cifar.sh --model=mobilenet_v2 --width=0.5 --teacher_epochs=80 --teacher_only  # its teacher only
    benchmarks/mskd_cifar.sh --model=mobilenet_v2 --width=0.5 --teacher_epochs=80  # the MobileNetV2 0.5 study
        # -> benchmarks/results/mskd_cifar_mobilenet_v2_w0.5.{json,md}; add --plan_only to see its rows first

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
* Rows: ``experiment_plan`` (below the flags) is the whole experiment, one ``Row`` (kind, candidate, loss, seed,
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
* MobileNetV2 (``--model=mobilenet_v2``): the protocol committed before any of its rows (BENCHMARKS.md, "MS-KD on
  MobileNetV2 0.5 (CIFAR-10): protocol and decision rules, written before any row") instead, in its order: at
  each seed (0, then 1 and 2) ``ce:l1-uniform``, ``kd:l1-uniform``, ``zc+kd`` (the library's default: what
  ``python -m mskd_tf.run`` does with no selection flags) and ``mskd`` (fine-tuned selection for the table's
  ``--select_epochs``, 1.5); for decision rule R2, ``zc+kd[allocations=global+uniform+sensitivity]`` at every
  seed (the default on candidates built with the opt-in ``sensitivity`` allocation too, in the work dir
  ``..._global+uniform+sensitivity``, digest-checked as the other targets' are); the oracle (every distinct
  candidate + CE at seed 0, candidates keeping the same channels merged, best zero-cost score first; if more
  than 12, the best two of each allocation plus ``l1`` of each; ``--plan_only`` says which rule applied); l1 + CE,
  l1 + KD and ``zc+kd`` at the ``--other_targets``. No ablations unless their flags are given. Its decision rules
  R1-R4 are applied, as written, in the rendered table (``study_rules.py``).
* Every student row is also exported as the export stage ships it (full int8, calibrated on 200 training images)
  and its LiteRT test accuracy recorded beside the Keras one (``int8_test_acc``; rows cached before this have none);
  the .tflite stays in the candidate set's work dir under ``int8/``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import artifacts
import results_io
import study_rules
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


BASELINE = "l1-uniform"  # what most users do: L1 filter norms, the same ratio in every layer
POOL_SETTINGS = ("min_params_ratio", "capacity_reference")  # settings of a selection's capacity pool
# The allocations of the MobileNetV2 protocol's R2 rows: the library's default ones plus the opt-in sensitivity one
# (Config.allocations); their candidates are built in a work dir of their own.
WITH_SENSITIVITY = "global+uniform+sensitivity"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table (one training), cached in the results file under ``row_key(row, s)``.

    kind: "student" (``candidate`` fine-tuned for the budget under ``loss``), "mskd" (the library's selection, then
    KD on its pick for what the selection left of the budget), "select+ce" (the same selection, then CE: the KD
    ablation), "zc+kd" (the capacity pool's zero-cost top at the row's target + KD for the whole budget), or
    "select" (the selection a mskd or select+ce row starts from, cached as a row of its own).
    candidate: None where the kind picks it. loss: "kd" or "ce". target: the fraction of the teacher's MACs.
    settings: the row's overrides of the table's settings, sorted by name: the KD loss's (alpha, temperature,
    feature_kd), the peak learning rate (lr; for the kinds with a selection the rate of its KD runs), the
    capacity pool (min_params_ratio, and capacity_reference where it is not the table's) and the allocations its
    candidates were built with ("+"-joined, where not the library's default ones: another candidate set).
    """

    kind: str
    candidate: str | None
    loss: str
    seed: int
    target: float
    settings: tuple = ()


def kd_overrides(s: dict, **values) -> tuple:
    """The settings of a row trained or selected under the KD loss. The table's own KD rate and capacity pool are
    not overrides: a row given them is the default row, whose name never said them."""
    defaults = {"lr": s["kd_lr"], "min_params_ratio": s["min_params_ratio"]}
    return tuple(sorted((name, value) for name, value in values.items()
                        if name not in defaults or not math.isclose(value, defaults[name], rel_tol=0, abs_tol=1e-12)))


def experiment_plan(s: dict, candidates: dict, oracle: str | None) -> list[Row]:
    """The whole experiment: every row of the table, in the order they are computed.

    A sitting ends after any row and a rerun resumes at the first one not cached, so the order puts first what a
    partial table should already answer. candidates: the decisive target's (criterion -> its record, with the
    zero-cost score val_acc_before_finetune); oracle: the best candidate + CE at seed 0 once all of those rows are
    cached (until then None, and its rows at more seeds wait). A row listed twice is computed where it comes first.
    Two plans: issue 13's (ResNet-20) and, for --model=mobilenet_v2, the MobileNetV2 study's protocol.
    """
    decisive_target, seeds = s["target_macs"], s["seeds"]
    s0, more_seeds = seeds[0], seeds[1:]
    mobilenet = follows_mobilenet_protocol(s)

    def ce(candidate, seed, target=decisive_target, lr=None):
        return Row("student", candidate, "ce", seed, target, () if lr is None else (("lr", lr),))

    def kd(candidate, seed, target=decisive_target, **kd_settings):
        return Row("student", candidate, "kd", seed, target, kd_overrides(s, **kd_settings))

    def mskd(seed, target=decisive_target, **kd_settings):  # selection and distillation both under kd_settings
        return Row("mskd", None, "kd", seed, target, kd_overrides(s, **kd_settings))

    def select_ce(seed, **kd_settings):  # the selection under kd_settings, then CE
        return Row("select+ce", None, "ce", seed, decisive_target, kd_overrides(s, **kd_settings))

    def zc_kd(seed, target=decisive_target, allocations=None):  # allocations: another candidate set's (see Row)
        return Row("zc+kd", None, "kd", seed, target, () if allocations is None else (("allocations", allocations),))

    def decisive(seed):  # at seed 0 also selection + CE, which splits MS-KD's gain
        return [ce(BASELINE, seed), mskd(seed), *([select_ce(seed)] if seed == s0 else []), kd(BASELINE, seed)]

    zc_kd_seeds = [int(x) for x in FLAGS.zc_kd_seeds]

    def other_target(target, method):  # l1 + CE at seed 0; l1 + KD and method also at the --other_target_seeds; zc+kd
        return [ce(BASELINE, s0, target),
                *[row for seed in [s0, *map(int, FLAGS.other_target_seeds)]
                  for row in (kd(BASELINE, seed, target), method(seed, target))],
                *[zc_kd(seed, target) for seed in zc_kd_seeds]]

    def ablation_flag(name):  # the MobileNetV2 protocol has none unless their flags are given
        return FLAGS[name].value if FLAGS[name].present or not mobilenet else []

    # The ablations, most useful first: the KD loss is the one lever left on bar 1 (the oracle best + CE is level
    # with l1 + CE, so selection cannot add there; KD adds +0.5-0.7); then the baseline's lr; then the pool.
    ablations = [
        *[kd(BASELINE, s0, **setting)  # which settings help l1 + KD
          for setting in _settings_flag(ablation_flag("kd_ablation"))],
        *[row for setting in _settings_flag(FLAGS.mskd_kd_ablation) for seed in seeds  # a winning one, at every seed
          for row in (kd(BASELINE, seed, **setting), mskd(seed, **setting))],
        *[ce(BASELINE, s0, lr=float(lr))  # is the baseline's learning rate a fair one?
          for lr in ablation_flag("lr_ablation")],
        *[row for ratio in map(float, ablation_flag("pool_ablation"))  # what the capacity pool gave
          for row in (mskd(s0, min_params_ratio=ratio), select_ce(s0, min_params_ratio=ratio))],
    ]
    if mobilenet:  # BENCHMARKS.md, "MS-KD on MobileNetV2 0.5 (CIFAR-10)": its rows (1)-(4) and R2's, in its order

        def compared(seed):  # the rows the decision rules compare, paired by seed
            return [ce(BASELINE, seed), kd(BASELINE, seed), zc_kd(seed), mskd(seed)]

        plan = [
            *first_rows(s, candidates),
            # (1) seed 0: l1 + CE, l1 + KD, the library's default (what `python -m mskd_tf.run` does with no
            # selection flags: the capacity pool's zero-cost pick + KD for all of B), MS-KD with fine-tuned selection
            # (the table's --select_epochs, 1.5, inside B).
            *compared(s0),
            *(ablations if FLAGS.ablations_first else []),
            *[row for seed in more_seeds for row in compared(seed)],  # (2) the same at seeds 1 and 2
            # R2 (does the opt-in sensitivity allocation join the default ones?): the default again, on candidates
            # built with it too (a work dir of their own), paired by seed with the default rows above.
            *[zc_kd(seed, allocations=WITH_SENSITIVITY) for seed in seeds],
            # (3) the oracle: every distinct candidate + CE, best zero-cost score first (or the protocol's subset).
            *[ce(c, s0) for c in oracle_candidates(s, candidates)],
            # (4) l1 + CE, l1 + KD and the default at the other MACs targets.
            *[row for target in s["other_targets"] for row in other_target(target, zc_kd)],
            *([] if FLAGS.ablations_first else ablations),
        ]
        return list(dict.fromkeys(plan))
    plan = [
        *first_rows(s, candidates),
        *decisive(s0),
        *(ablations if FLAGS.ablations_first else []),
        # The seed noise of one row, before the rest of the oracle: the candidates end within ~1.3 points of each
        # other and l2-uniform (l1-uniform's widths; uniform widths no longer depend on the ranking) ended 1.08
        # below it; whether any selection can beat the default criterion depends on that spread exceeding the
        # noise. l2-uniform's seed 1 separates kept channels from noise.
        *[ce(BASELINE, seed) for seed in more_seeds],
        *([ce("l2-uniform", more_seeds[0])] if more_seeds and "l2-uniform" in candidates else []),
        # The decisive rows' other seeds before the rest of the oracle: the bars are on 3-seed means, and the
        # remaining oracle rows then test the capacity pool on candidates it was not derived from.
        *[row for seed in more_seeds for row in decisive(seed)],
        # What the selection's training buys: the capacity pool's zero-cost top + KD for the whole budget (no
        # halving steps). At seed 0 that is MS-KD's own pick, so the row isolates the 528 selection steps.
        *[zc_kd(seed) for seed in [s0, *zc_kd_seeds]],
        # The oracle table, in the order a selection meets the candidates (best zero-cost score first), so a
        # partial table already scores the picks of the selection rules (benchmarks/selection_signals.py).
        *[ce(c, s0) for c in oracle_candidates(s, candidates)],
        # The other MACs targets (does KD's gain grow with the teacher-student gap?).
        *[row for target in s["other_targets"] for row in other_target(target, mskd)],
        *[ce(oracle, seed) for seed in (more_seeds if oracle else [])],
        # R2's ResNet-20 half: does the default lose more than 0.1 when the sensitivity allocation joins its candidates?
        *([zc_kd(seed, allocations=WITH_SENSITIVITY) for seed in seeds] if FLAGS.sensitivity_rows else []),
        *([] if FLAGS.ablations_first else ablations),
    ]
    return list(dict.fromkeys(plan))


def _settings_flag(entries: list) -> list[dict]:
    """--kd_ablation's key=value entries as {key: value}."""
    return [{key: float(value)} for key, value in (entry.split("=") for entry in entries)]


def first_rows(s: dict, candidates: dict) -> list[Row]:
    """The --first rows: single-candidate rows a finished row raised a question about, before the order."""
    rows = []
    for name in FLAGS.first:
        match = re.fullmatch(r"(ce|kd):([\w-]+)(?:\[lr=(\d+(?:\.\d+)?)\])?/s(\d+)", name)
        if not match or match[2] not in candidates or (match[3] and match[1] == "ce"):
            raise SystemExit(f"--first={name!r}: expected ce:<candidate>/s<seed> or kd:<candidate>[lr=<rate>]/s<seed> "
                             f"with a candidate of this table ({', '.join(sorted(candidates))}).")
        rows.append(Row("student", match[2], match[1], int(match[4]), s["target_macs"],
                        kd_overrides(s, lr=float(match[3])) if match[3] else ()))
    return rows


def follows_mobilenet_protocol(s: dict) -> bool:
    """Whether the table follows the MobileNetV2 study's protocol (BENCHMARKS.md, "MS-KD on MobileNetV2 0.5
    (CIFAR-10): protocol and decision rules, written before any row"): derived from --model, so the driver command
    committed there computes it as written; every other table follows issue 13's ResNet-20 plan."""
    return s["model"] == "mobilenet_v2"


ORACLE_MAX_NETWORKS = 12  # the MobileNetV2 protocol's oracle trains every distinct candidate up to this many


def by_zero_cost(names, candidates: dict) -> list[str]:
    """The names, best zero-cost score first (ties in the order given)."""
    return sorted(names, key=lambda c: -candidates[c]["val_acc_before_finetune"])


def oracle_candidates(s: dict, candidates: dict) -> list[str]:
    """The candidates of the oracle table (each + CE at seed 0), best zero-cost score first: every one (issue 13),
    or the MobileNetV2 protocol's choice (mobilenet_oracle)."""
    if follows_mobilenet_protocol(s):
        return mobilenet_oracle(candidates)[0]
    return by_zero_cost(candidates, candidates)


def mobilenet_oracle(candidates: dict) -> tuple[list[str], str]:
    """The MobileNetV2 protocol's oracle candidates, best zero-cost score first, and the rule that chose them: every
    distinct network (candidates keeping the same channels are one), or, if there are more than 12, the best two by
    zero-cost score of each allocation plus l1 of each allocation."""
    networks = {}  # kept channels -> the candidates keeping them (a results file's summary has none: each its own)
    for c, record in candidates.items():
        networks.setdefault(json.dumps(record.get("kept", c), sort_keys=True), []).append(c)
    # A network's name: l1's where l1 keeps it (its CE row is the baseline's, planned anyway), else the first name.
    named = {min(group, key=lambda c: (candidates[c]["ranking"] != "l1", c)): group for group in networks.values()}
    ranked = by_zero_cost(named, candidates)
    merged = "; ".join(" = ".join(group) for group in networks.values() if len(group) > 1)
    found = f"{len(named)} distinct networks among {len(candidates)} candidates" + (f" ({merged})" if merged else "")
    if len(named) <= ORACLE_MAX_NETWORKS:
        return ranked, f"every one of the {found}"
    chosen = set()
    for allocation in sorted({record["allocation"] for record in candidates.values()}):
        of_allocation = [n for n in ranked if any(candidates[c]["allocation"] == allocation for c in named[n])]
        chosen.update(of_allocation[:2])
        chosen.update(n for n in of_allocation if any(candidates[c]["ranking"] == "l1" for c in named[n]))
    return [n for n in ranked if n in chosen], (
        f"{found}, more than {ORACLE_MAX_NETWORKS}: the best two by zero-cost score of each allocation plus l1 of "
        f"each allocation, {len(chosen)} candidates")


def oracle_criterion(res, candidates: dict, s: dict) -> str | None:
    """The oracle candidate with the best validation accuracy after B steps of CE at seed 0, once every oracle
    candidate has that row cached (else None, e.g. while --later leaves oracle rows out)."""
    trained = set(oracle_candidates(s, candidates))
    # In the candidates' own order, so that a tie goes to the same candidate whatever the plan's order.
    found = {c: res.row(Row("student", c, "ce", s["seeds"][0], s["target_macs"])) for c in candidates if c in trained}
    if not found or None in found.values():
        return None
    return max(found, key=lambda c: found[c]["val_acc"])


def row_key(row: Row, s: dict) -> str:
    """The row's name in the results file, its cache key: ce:l1-uniform/s0, ce:l1-uniform@lr0.02/s0,
    kd:l1-uniform[alpha=0.1]/s0, mskd[min_params_ratio=0]/s1, select/s0, select+ce/s0, zc+kd/s2@30, ..."""
    if row.kind != "student":
        return f"{row.kind}{bracketed(row.settings)}/{seed_and_target(row, s)}"
    if row.loss == "ce":  # a CE row's one setting, its learning rate, named so before KD rows had settings
        lr = dict(row.settings).get("lr")
        return f"ce:{row.candidate}" + ("" if lr is None else f"@lr{lr:g}") + f"/{seed_and_target(row, s)}"
    return f"kd:{row.candidate}{bracketed(row.settings)}/{seed_and_target(row, s)}"


def seed_and_target(row: Row, s: dict) -> str:
    """s0, s1@30: the row's seed, and its MACs target unless that is the decisive one."""
    return f"s{row.seed}" + ("" if row.target == s["target_macs"] else target_tag(row.target))


def target_tag(target: float) -> str:
    return f"@{round(100 * target)}"


def candidate_set(row: Row) -> tuple:
    """What the row's candidates were built for: its MACs target and its allocations (None: the library's default)."""
    return row.target, dict(row.settings).get("allocations")


def candidate_set_tag(target: float, allocations: str | None) -> str:
    """A candidate set's name among the results file's digests: @30, @50[allocations=global+uniform+sensitivity]."""
    return target_tag(target) + ("" if allocations is None else f"[allocations={allocations}]")


def setting_tags(settings: tuple) -> list[str]:
    """Overrides as names write them: the capacity pool first, then the others by name."""
    values = dict(settings)
    pool = []
    if "min_params_ratio" in values:
        reference = values.pop("capacity_reference", None)
        pool = [f"min_params_ratio={values.pop('min_params_ratio'):g}" + (f" x {reference}" if reference else "")]
    return pool + [f"{name}={value}" if isinstance(value, str) else f"{name}={value:g}"
                   for name, value in values.items()]


def bracketed(settings: tuple) -> str:
    return "".join(f"[{tag}]" for tag in setting_tags(settings))


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


def network_name(s) -> str:
    """The teacher as the table names it: ResNet-20, MobileNetV2 0.5, ..."""
    model, width = s.get("model", "resnet20"), s.get("width", 1.0)
    if model.startswith("resnet"):
        return f"ResNet-{model[6:]}" + (f" {width:g}" if width != 1.0 else "")
    return {"mobilenet_v2": "MobileNetV2"}.get(model, model) + (f" {width:g}" if width != 1.0 else "")


def pipeline_config(s, target, teacher_path="", allocations=None):
    """The pipeline's settings for a candidate set: a MACs target and allocations (None: the library's default)."""
    from mskd_tf.config import Config

    suffix = (("" if target == s["target_macs"] else f"_t{round(100 * target)}")
              + (f"_{allocations}" if allocations else ""))
    return Config(dataset=s["dataset"], model=s["model"], width=s.get("width", 1.0), train_subset=s["train_subset"], batch_size=s["batch_size"],
                  teacher_epochs=s["teacher_epochs"], teacher_lr=s["teacher_lr"], schedule="cosine", weight_decay=s["weight_decay"],
                  teacher=teacher_path,
                  target_macs=target, round_to=s["round_to"], criteria_batches=10, select_epochs=s["select_epochs"],
                  zero_cost_keep=s["zero_cost_keep"], finetune_lr=s["finetune_lr"], student_epochs=s["budget"],
                  temperature=s["temperature"], alpha=s["alpha"], workdir=s["workdir"] + suffix, seed=0,
                  **({"allocations": tuple(allocations.split("+"))} if allocations else {}))


def machine() -> dict:
    import mskd_tf
    from mskd_tf import report

    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {**results_io.machine(), **report.versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            # mskd_cifar.sh runs a snapshot of one commit's library; otherwise the working tree's.
            "git_commit": os.environ.get("MSKD_LIBRARY_COMMIT") or git("rev-parse", "--short", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "mskd_tf")) and not os.environ.get("MSKD_LIBRARY_COMMIT"),
            "library_path": str(Path(mskd_tf.__file__).parent)}


class Results:
    """The rows, written through results_io after each one, so a rerun resumes at the next."""

    def __init__(self, name: str, s: dict):
        self.name, self.s = name, s
        path = results_io.RESULTS / f"{name}.json"
        # Rows of another capacity pool or KD rate carry it in their names, so the table stays valid when it changes.
        key = {k: v for k, v in s.items() if k not in ("seeds", "other_targets", "min_params_ratio",
                                                       "capacity_reference", "kd_lr")}
        old = json.loads(path.read_text()).get("figures", {}) if path.exists() else {}
        if portable({"width": 1.0, **old.get("settings_key", {})}) == portable(key):  # before --width: width 1
            self.data = {**old, "settings_key": key, "rows": described(old["rows"], s)}
        else:
            self.data = {"settings_key": key, "rows": {}, "targets": {}}
        # A KD row's name carries its learning rate unless it is the default KD rate, which was finetune_lr until
        # the library's Config.kd_lr_scale (rows named then say [lr=<finetune_lr>] now) and is s["kd_lr"] since.
        named_default = self.data.get("kd_lr_default", s["finetune_lr"])
        if named_default != s["kd_lr"]:
            renamed = {}
            for record in self.data["rows"].values():
                row = row_of(record)
                if row.kind != "student" or row.loss == "kd":  # select+ce: the rate of its selection
                    row = dataclasses.replace(row, settings=kd_overrides(s, **{"lr": named_default,
                                                                               **dict(row.settings)}))
                renamed[row_key(row, s)] = {**record, "row": dataclasses.asdict(row)}
            self.data["rows"] = renamed
        self.data["kd_lr_default"] = s["kd_lr"]
        self.data["settings"] = s
        self.new_rows = 0

    def row(self, row: Row):
        """The row's cached record, or None."""
        return self.data["rows"].get(row_key(row, self.s))

    def put(self, row: Row, record: dict, *, finished: bool = True):
        """Cache the row's record; ``finished=False``: more of the row follows (not counted for --max_rows)."""
        self.data["rows"][row_key(row, self.s)] = {**record, "row": dataclasses.asdict(row)}
        self.save()
        if not finished:
            return
        self.new_rows += 1
        if FLAGS.max_rows and self.new_rows >= FLAGS.max_rows:
            print(f"--max_rows={FLAGS.max_rows} reached; rerun to continue", flush=True)
            raise SystemExit(0)

    def save(self):
        results_io.write_results(self.name, self.data)


def portable(key: dict) -> dict:
    """A table's settings key without where the checkout stands: the dataset's archive by file name, so a clone
    elsewhere (another ../shared) keeps the table's rows instead of starting it over."""
    source, _, location = str(key.get("dataset", "")).partition(":")
    return {**key, "dataset": f"{source}:{Path(location).name}"} if location else key


def row_of(record: dict) -> Row:
    """The Row a cached record is the result of."""
    return Row(**{**record["row"], "settings": tuple(map(tuple, record["row"]["settings"]))})


def described(rows: dict, s: dict) -> dict:
    """The results file's rows (name -> record), each record with its Row. A record cached before records carried
    their Row gets it from its name: a one-time migration, saved with the table's next row (--render_only describes
    a file that gets no more rows anew each time)."""
    return {name: record if "row" in record else {**record, "row": dataclasses.asdict(_row_from_name(name, s))}
            for name, record in rows.items()}


def table_of(data: dict) -> dict:
    """A results file's rows as Row -> record, in the order they were cached."""
    return {row_of(record): record for record in described(data["rows"], data["settings"]).values()}


_ROW_NAME = re.compile(r"(?:(?P<kind>select\+ce|select|mskd|zc\+kd)|(?P<loss>ce|kd):(?P<candidate>[\w-]+)"
                       r"(?:@lr(?P<ce_lr>[\d.e+-]+))?)(?P<tags>(?:\[[^\]]+\])*)/s(?P<seed>\d+)(?:@(?P<target>\d+))?")


def _row_from_name(name: str, s: dict) -> Row:
    """The Row of a record cached before records carried their Row, from its name (written by row_key's rules)."""
    match = _ROW_NAME.fullmatch(name)
    if not match:
        raise ValueError(f"cached row {name!r} is named by none of row_key's rules")
    settings = {"lr": float(match["ce_lr"])} if match["ce_lr"] else {}
    for tag in re.findall(r"\[([^\]]+)\]", match["tags"]):  # [alpha=0.1], [min_params_ratio=0.9 x largest]
        setting, value = tag.split("=")
        value, _, reference = value.partition(" x ")
        settings.update({setting: float(value), **({"capacity_reference": reference} if reference else {})})
    kind = match["kind"] or "student"
    return Row(kind, match["candidate"], match["loss"] or ("ce" if kind == "select+ce" else "kd"), int(match["seed"]),
               int(match["target"]) / 100 if match["target"] else s["target_macs"], tuple(sorted(settings.items())))


def guard_the_table(res, s):
    """Refuse to train a new teacher for a table that has rows: its digests would differ and the rows be dropped."""
    wd = Path(pipeline_config(s, s["target_macs"]).workdir)
    if keep_artifacts(s):
        artifacts.restore(wd)
    if res.data.get("rows") and not (wd / "teacher.keras").exists() and not FLAGS.new_teacher:
        raise SystemExit(
            f"error: {results_io.RESULTS / (s['name'] + '.json')} holds {len(res.data['rows'])} rows computed from a "
            f"teacher that is neither in {wd} nor in {artifacts.mirror_of(wd)}; this run would train a new one and "
            "drop them. Restore that work dir, use another --name, or pass --new_teacher to start the table over.")


def guard_the_images(res, s, fingerprint: str):
    """Refuse to add rows computed on other images than the table's: the row digests cover the teacher and the kept
    channels, not the images each sitting loads afresh. A table recorded before this check takes this sitting's."""
    from mskd_tf.data_sources import cache_dir

    recorded = res.data.setdefault("data_fingerprint", fingerprint)
    if recorded != fingerprint:
        raise SystemExit(
            f"error: {s['dataset']} decodes to other images (data fingerprint {fingerprint}) than the "
            f"{len(res.data.get('rows', {}))} rows of {results_io.RESULTS / (s['name'] + '.json')} were computed on "
            f"({recorded}). Restore those images (an archive's copy extracted under {cache_dir()} can be deleted to "
            "extract it afresh), or use another --name.")


def keep_artifacts(s) -> bool:
    return FLAGS.keep_artifacts and not s["quick"]


def run_stages(s, target, teacher_path="", stop_after="candidates", allocations=None) -> Path:
    """The pipeline's stages up to ``stop_after`` in the candidate set's work dir, restored from and mirrored to
    artifacts."""
    from mskd_tf.api import run_pipeline

    cfg = pipeline_config(s, target, teacher_path, allocations)
    wd = Path(cfg.workdir)
    if keep_artifacts(s):
        artifacts.restore(wd)
        if teacher_path and artifacts.given_teacher(wd) and not (wd / "teacher.keras").exists():
            shutil.copy2(teacher_path, wd / "teacher.keras")  # the mirror keeps no copy of a given teacher
    run_pipeline(cfg, stop_after=stop_after)
    if keep_artifacts(s):
        artifacts.save(wd)
    return wd


def stored_candidates(s, target, allocations=None) -> dict:
    """A candidate set's candidates as its rows read them: its work dir's candidates.json, or the artifacts mirror's
    that a run restores it from; {} before the candidates stage has run."""
    wd = Path(pipeline_config(s, target, allocations=allocations).workdir)
    for folder in (wd, artifacts.mirror_of(wd)):
        stored = artifacts.read_json(folder, "candidates.json")
        if stored is not None:
            return {r["criterion"]: r for r in stored["candidates"]}
    return {}


def zero_cost_pick(candidates: dict, s: dict) -> str:
    """zc+kd's candidate: the best zero-cost score in the capacity pool (where MS-KD's selection starts), a tie going
    to fewer MACs, then to the first name, as in the library's select stage at --select_epochs=0."""
    from mskd_tf import selection

    pooled = selection.capacity_pool({c: r["params"] for c, r in candidates.items()}, s["min_params_ratio"])
    return min(pooled, key=lambda c: (-candidates[c]["val_acc_before_finetune"], candidates[c]["macs"], c))


def zero_cost_twins(row: Row, s: dict, candidates_of) -> list[Row]:
    """The rows that are this zc+kd row's very run, so that a cached one is copied, not trained again: its pick's KD
    row; on another candidate set (other allocations), the KD rows of the table's candidates keeping the pick's
    channels (the same network: same teacher, rankings and builder), and the table's zc+kd row if its pick is one
    of them. candidates_of(target, allocations): a candidate set's candidates ({} before they exist: no twins)."""
    target, allocations = candidate_set(row)
    candidates = candidates_of(target, allocations)
    if not candidates:
        return []
    pick = zero_cost_pick(candidates, s)
    if allocations is None:
        return [Row("student", pick, "kd", row.seed, target)]
    table_candidates = candidates_of(target, None)  # a results file's summary of them has no kept channels: none same
    same = [c for c, record in table_candidates.items() if record.get("kept", False) == candidates[pick]["kept"]]
    return [*(Row("student", c, "kd", row.seed, target) for c in same),
            *([Row("zc+kd", None, "kd", row.seed, target)] if same and zero_cost_pick(table_candidates, s) in same
              else [])]


def prepare(s, target, teacher_path="", allocations=None):
    """teacher, rank, candidates through the pipeline's stages; returns the workdir and its digests."""
    wd = run_stages(s, target, teacher_path, allocations=allocations)
    return wd, input_digests(wd, s)


def input_digests(wd: Path, s: dict) -> dict:
    """What every row starts from, by content: the teacher's weights, each candidate's kept channels and the
    zero-cost pick. A teacher or candidate set that differs empties the rows; one rebuilt the same (a fresh clone
    rebuilds the candidates from the committed teacher and rankings; a .keras file's bytes differ at every save)
    keeps them."""
    import keras

    from mskd_tf.keras_utils import weights_digest

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    records = {r["criterion"]: r for r in json.loads((wd / "candidates.json").read_text())["candidates"]}
    return {"teacher_weights": weights_digest(keras.models.load_model(wd / "teacher.keras", compile=False)),
            "zero_cost_pick": zero_cost_pick(records, s),
            **{f"kept:{name}": digest(record["kept"]) for name, record in sorted(records.items())}}


def main(_):
    s = settings()
    if FLAGS.render_only:  # also refreshes the .md and the plot, so the finished rows can be committed mid-table
        figures = json.loads((results_io.RESULTS / f"{s['name']}.json").read_text())["figures"]
        text = render(figures)
        (results_io.RESULTS / f"{s['name']}.md").write_text(text)
        plot_macs(figures, results_io.RESULTS / f"{s['name']}_macs.png")
        print(text, flush=True)
        return

    res = Results(s["name"], s)
    if FLAGS.forget:
        exact = {f[:-1] for f in FLAGS.forget if f.endswith("$")}
        prefixes = tuple(f for f in FLAGS.forget if not f.endswith("$"))
        dropped = [k for k in res.data.get("rows", {}) if k in exact or (prefixes and k.startswith(prefixes))]
        res.data["rows"] = {k: v for k, v in res.data.get("rows", {}).items() if k not in dropped}
        print(f"forgot {len(dropped)} cached rows: {', '.join(dropped) or '-'}", flush=True)
    if FLAGS.plan_only:
        print_plan(res, s)
        return

    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import deploy, distill, flops, selection, training
    from mskd_tf.errors import MskdError

    res.data["machine"] = machine()
    print(json.dumps(s), flush=True)
    splits = data_lib.load(s["dataset"], batch_size=s["batch_size"], train_subset=s["train_subset"] or None, seed=0)
    guard_the_images(res, s, data_lib.fingerprint(splits.arrays))
    val, test = splits.val, splits.test
    per_epoch = training.steps_per_epoch(splits.train)
    budget = training.budget_steps(s["budget"], per_epoch)

    calibration = data_lib.eval_pipeline(splits.arrays["train"], s["batch_size"], cache=False)

    def int8_export(student, row) -> dict:
        """The row's student exported as the export stage ships it (full int8, calibrated on training images), and
        its test accuracy in LiteRT beside the Keras model's; the .tflite stays in the candidate set's work dir."""
        out = Path(pipeline_config(s, row.target).workdir) / "int8" / re.sub(r"[^\w.@=+-]", "_", row_key(row, s))
        exported = deploy.export_all(student, str(out), kinds=("int8",), representative_ds=calibration, test_ds=test,
                                     micro=False, threads=(1,), seed=row.seed)[0]
        return {"int8_test_acc": exported["test_acc"], "int8_bytes": exported["bytes"],
                "int8_agreement": exported["agreement"]}

    def train_for(seed):  # seed 0 is the pipeline's own order; other seeds reshuffle / re-augment the same images
        return data_lib.train_pipeline(splits.arrays["train"], s["batch_size"], augment=True, seed=seed)

    # The decisive target: teacher, rank and candidates by the pipeline (the teacher trains here once).
    guard_the_table(res, s)
    if FLAGS.teacher_only:
        wd = run_stages(s, s["target_macs"], stop_after="teacher")
        print((wd / "teacher.json").read_text(), flush=True)
        return
    wd, digests = prepare(s, s["target_macs"])
    if res.data.get("digests") != digests:
        res.data.update(digests=digests, rows={}, targets={})
    teacher_info = json.loads((wd / "teacher.json").read_text())
    res.data["teacher"] = {k: teacher_info.get(k) for k in ("macs", "params", "val_acc", "test_acc", "batchnorm_repair")}
    res.data["teacher"].update(epochs=s["teacher_epochs"], seconds=json.loads((wd / "stages.json").read_text())
                               ["teacher"]["seconds"], train_images=splits.info.num_train,
                               val_images=splits.info.num_val, test_images=splits.info.num_test)
    res.data["budget_steps"], res.data["steps_per_epoch"] = budget, per_epoch

    inputs = {}  # candidate set -> (work dir, teacher, candidates): what that set's rows start from

    def inputs_of(target, allocations=None):
        """A candidate set's work dir, teacher and candidates; the stages of another set (another MACs target or
        other allocations) run when the plan first reaches it, and if its files changed its cached rows are dropped."""
        key = target, allocations
        if key not in inputs:
            wd_t = wd
            if key != (s["target_macs"], None):
                wd_t, digests_t = prepare(s, target, teacher_path=str(wd / "teacher.keras"), allocations=allocations)
                tag = candidate_set_tag(target, allocations)
                if res.data["targets"].get(tag) != digests_t:
                    res.data["rows"] = {k: r for k, r in res.data["rows"].items() if candidate_set(row_of(r)) != key}
                    res.data["targets"][tag] = digests_t
            inputs[key] = (wd_t, keras.models.load_model(wd_t / "teacher.keras"),
                           stored_candidates(s, target, allocations))
        return inputs[key]

    _, _, candidates = inputs_of(s["target_macs"])
    res.data["candidates"] = {c: {k: r.get(k) for k in ("macs", "params", "val_acc_before_finetune", "ranking",
                                                         "allocation")} for c, r in candidates.items()}
    res.save()

    def train(row, teacher, source, *, extra, steps=budget):
        """Fine-tune the network in ``source`` for ``steps`` under the row's loss and settings; cache the row."""
        kd = row.loss == "kd"
        # A select+ce row's settings are its selection's; its own run is the table's CE run. A candidate set's
        # allocations chose the network, not how it trains.
        own = {} if row.kind == "select+ce" else {k: v for k, v in row.settings
                                                  if k not in (*POOL_SETTINGS, "allocations")}
        lr = own.pop("lr", s["kd_lr"] if kd else s["finetune_lr"])
        loss = {"temperature": s["temperature"], "alpha": s["alpha"], "feature_kd": 0.0, **own}
        keras.utils.set_random_seed(row.seed)
        student = keras.models.load_model(source)
        start = time.perf_counter()
        # Validation after every epoch (~3 s each): from the oracle rows, how early a short run ranks the
        # candidates as B steps do, i.e. which selection horizon could be predictive, at no training cost.
        student, history = distill.distill(teacher, student, train_for(row.seed), val, epochs=steps / per_epoch,
                                           steps=steps, kd=kd, **loss, lr=lr, weight_decay=s["weight_decay"],
                                           seed=row.seed, verbose=2)
        cost = flops.count(student)
        record = {"kd": kd, **({"kd_settings": loss} if kd else {}), "seed": row.seed, "lr": lr,
                  "train_steps": steps, "seconds": round(time.perf_counter() - start, 1),
                  "val_acc": training.accuracy(student, val), "test_acc": training.accuracy(student, test),
                  "macs": int(cost.macs), "params": int(cost.params),
                  "val_curve": [round(float(v), 4) for v in history.get("val_accuracy", [])], **extra}
        record["total_steps"] = record["train_steps"] + record.get("selection_steps", 0)
        print(f"row {row_key(row, s)}: val {100 * record['val_acc']:.2f}%  test {100 * record['test_acc']:.2f}%  "
              f"({record['total_steps']} steps, {record['seconds']:.0f} s)", flush=True)
        res.put(row, record, finished=False)  # cached before the export: a failed export cannot cost the training
        try:
            record.update(int8_export(student, row))
            print(f"row {row_key(row, s)}: int8 test {100 * record['int8_test_acc']:.2f}%", flush=True)
        except MskdError as exc:
            record["int8_error"] = str(exc)
        res.put(row, record)

    def selection_of(row, wd_t, teacher, candidates_t):
        """The library's select stage for a mskd or select+ce row: its select row, computed unless cached (with
        its network on disk); returns that row, the selected network's file and the capacity pool's ratio."""
        ratio = dict(row.settings).get("min_params_ratio", s["min_params_ratio"])
        kd_settings = {"lr": s["kd_lr"], **{k: v for k, v in row.settings if k not in POOL_SETTINGS}}
        # Folder names say the rate when it is not finetune_lr (the default KD rate before Config.kd_lr_scale).
        folder_settings = {k: v for k, v in kd_settings.items() if k != "lr" or v != s["finetune_lr"]}
        out = wd_t / (f"select_s{row.seed}" + (f"_minparams{ratio:g}" if ratio else "")  # ratio 0: the original folders
                      + (f"_{s['capacity_reference']}" if ratio else "")  # "_minparams0.9": x the largest
                      + "".join(f"_{k}{v:g}" for k, v in sorted(folder_settings.items())))
        select_row = dataclasses.replace(row, kind="select", loss="kd")
        if not res.row(select_row) or not (out / "selected.keras").exists():
            start = time.perf_counter()
            payload = selection.select(
                {c: str(wd_t / "candidates" / f"{c}.keras") for c, r in candidates_t.items() if "same_as" not in r},
                lambda: train_for(row.seed), val,
                workdir=str(out), epochs=s["select_epochs"], zero_cost_keep=s["zero_cost_keep"],
                zero_cost_scores={c: r["val_acc_before_finetune"] for c, r in candidates_t.items()},
                candidate_costs=candidates_t,
                min_params_ratio=ratio,
                teacher=teacher, temperature=kd_settings.get("temperature", s["temperature"]),
                alpha=kd_settings.get("alpha", s["alpha"]), lr=kd_settings["lr"],  # hints: distill only
                weight_decay=s["weight_decay"], seed=row.seed)
            res.put(select_row, {
                "seed": row.seed, "seconds": round(time.perf_counter() - start, 1), "min_params_ratio": ratio,
                "capacity_reference": s["capacity_reference"],
                "capacity_kept": (payload["protocol"]["capacity_pool"] or {}).get("kept"),
                "selected": payload["selected"], "total_steps": payload["protocol"]["total_steps"],
                # None: the capacity pool left no more than the rung keeps, so no zero-cost cut
                "zero_cost_kept": (payload["protocol"]["zero_cost"] or {}).get("kept"),
                "rungs": payload["protocol"]["rungs"],
                # issue 14: where the selection's seconds went, over every candidate and rung
                # (the rest of "seconds" is outside the candidates: loading, the pools)
                "time_split": {k: round(v, 1) for k, v in selection.time_split_total(payload).items()}})
            if keep_artifacts(s):
                artifacts.save(wd_t)
        return res.row(select_row), out / "selected.keras", ratio

    def compute(row):
        """Train the row (a zc+kd row whose very run is cached already: a copy of it) and cache it."""
        wd_t, teacher, candidates_t = inputs_of(*candidate_set(row))
        if row.kind == "student":
            train(row, teacher, wd_t / "candidates" / f"{row.candidate}.keras", extra={"criterion": row.candidate})
        elif row.kind == "zc+kd":
            top = zero_cost_pick(candidates_t, s)
            twins = zero_cost_twins(row, s, lambda *key: inputs_of(*key)[2])
            same_run = next((res.row(twin) for twin in twins if res.row(twin)), None)
            if same_run:
                res.put(row, same_run)
            else:
                train(row, teacher, wd_t / "candidates" / f"{top}.keras", extra={"criterion": top})
        else:  # mskd, select+ce: the selection's pick trains for what the selection left of the budget
            chosen, network, ratio = selection_of(row, wd_t, teacher, candidates_t)
            train(row, teacher, network, steps=budget - chosen["total_steps"],
                  extra={"criterion": chosen["selected"]["criterion"], "selection_steps": chosen["total_steps"],
                         "selection_seconds": chosen["seconds"], "min_params_ratio": ratio,
                         "capacity_reference": s["capacity_reference"]})

    def next_row():
        """The plan's first row neither cached nor put off by --later (None: the table is done), each target's
        stages run as the plan reaches it."""
        res.data["oracle_criterion"] = oracle = oracle_criterion(res, candidates, s)
        for row in experiment_plan(s, candidates, oracle):
            inputs_of(*candidate_set(row))
            if not res.row(row) and row_key(row, s) not in FLAGS.later:
                return row
        return None

    while row := next_row():
        compute(row)

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
        print(f"MobileNetV2 protocol (BENCHMARKS.md, written before any row): mskd selects for --select_epochs="
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


def standard_rows(target: float) -> dict:
    """The rows every MACs target has, at seed 0, by their short label."""
    return {"l1 + CE": Row("student", BASELINE, "ce", 0, target), "l1 + KD": Row("student", BASELINE, "kd", 0, target),
            "MS-KD": Row("mskd", None, "kd", 0, target), "zc+kd": Row("zc+kd", None, "kd", 0, target)}


def plot_macs(data: dict, path: Path):
    """Test accuracy against MACs for l1 + CE, l1 + KD and MS-KD at every target (seed 0), teacher marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, table, t = data["settings"], table_of(data), data["teacher"]
    s0 = s["seeds"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    targets = sorted([s["target_macs"], *s["other_targets"]])
    for label, style in (("l1 + CE", "o-"), ("l1 + KD", "s-"), ("MS-KD", "D-")):
        points = []
        for target in targets:
            r = table.get(dataclasses.replace(standard_rows(target)[label], seed=s0))
            if r:
                points.append((r["macs"] / 1e6, 100 * r["test_acc"]))
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.axhline(100 * t["test_acc"], color="k", ls="--", lw=1, label=f"teacher ({t['macs'] / 1e6:.1f}M MACs)")
    ax.set_xlim(0, t["macs"] / 1e6 * 1.05)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{network_name(s)} / CIFAR-10, {s['budget']:g}-epoch budget (seed {s0})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables


def _pct(v):
    return f"{100 * v:.2f}"


def _spread(values):
    if len(values) == 1:
        return f"{_pct(values[0])} (n=1)"
    return f"{_pct(statistics.mean(values))} ± {_pct(statistics.stdev(values))} (n={len(values)})"


def _at_seeds(table, row, seeds) -> list[Row]:
    """The row at each of these seeds that the table has."""
    return [r for r in (dataclasses.replace(row, seed=sd) for sd in seeds) if r in table]


def _paired(table, a, b):
    """'a - b' test accuracy paired by seed over the seeds both rows have (a, b: at any seed): mean (s.e. of the
    mean), or None."""
    diffs = [record["test_acc"] - table[dataclasses.replace(b, seed=row.seed)]["test_acc"]
             for row, record in table.items()
             if row == dataclasses.replace(a, seed=row.seed) and dataclasses.replace(b, seed=row.seed) in table]
    if not diffs:
        return None
    error = f", s.e. {100 * statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f}" if len(diffs) > 1 else ""
    return f"{100 * statistics.mean(diffs):+.2f} (n={len(diffs)}{error})"


def _zero_cost_pairs(table, target) -> str:
    """zc+kd against l1 + KD and MS-KD, paired by seed (the test of zero-cost-only selection)."""
    rows = standard_rows(target)
    pairs = [(label, _paired(table, rows["zc+kd"], rows[label])) for label in ("l1 + KD", "MS-KD")]
    found = [f"{label} {value}" for label, value in pairs if value]
    return ("Zero-cost pick + KD minus, paired by seed (test points): " + "; ".join(found) + ".") if found else ""


def _resumed(select_row) -> bool:
    """A selection stopped by a session's end and resumed: its wall "seconds" timed the last sitting only, while
    its candidates' recorded seconds (time_split, kept in the selection's checkpoints) span every sitting."""
    return sum(select_row.get("time_split", {}).values()) > select_row.get("seconds", 0.0)


def _select_row_seconds(select_row) -> float:
    """A select row's seconds; for a resumed selection the candidates' seconds over all sittings (a lower bound)."""
    return max(select_row.get("seconds", 0.0), sum(select_row.get("time_split", {}).values()))


def _selection_seconds(table, row) -> float:
    """A MS-KD row's selection time, from its select row (rows cached before the select row existed, and select+ce
    rows: their own record of it)."""
    record = table[row]
    if "selection_steps" not in record:
        return 0.0
    selection = dataclasses.replace(row, kind="select")
    if row.kind == "mskd" and selection in table:
        return _select_row_seconds(table[selection])
    return record.get("selection_seconds", 0.0)


def rule_inputs(table, s, oracle) -> tuple[dict, dict]:
    """What the MobileNetV2 protocol's rules read (study_rules.verdicts): test accuracy by seed of the rows they
    compare, and (float, int8) test accuracy by seed of the default's exported students."""
    decisive = standard_rows(s["target_macs"])
    rows = {"default": decisive["zc+kd"], "l1 + KD": decisive["l1 + KD"], "l1 + CE": decisive["l1 + CE"],
            "MS-KD": decisive["MS-KD"],
            "default + sensitivity": dataclasses.replace(decisive["zc+kd"], settings=(("allocations", WITH_SENSITIVITY),))}
    if oracle:
        rows["oracle best + CE"] = Row("student", oracle, "ce", 0, s["target_macs"])
    tests = {label: {r.seed: table[r]["test_acc"] for r in _at_seeds(table, row, study_rules.SEEDS)}
             for label, row in rows.items()}
    int8 = {r.seed: (table[r]["test_acc"], table[r]["int8_test_acc"])
            for r in _at_seeds(table, rows["default"], study_rules.SEEDS) if "int8_test_acc" in table[r]}
    return tests, int8


def render(data: dict) -> str:
    s, table = data["settings"], table_of(data)
    t, m = data.get("teacher", {}), data.get("machine", {})
    budget, per_epoch = data.get("budget_steps"), data.get("steps_per_epoch")
    lines = [f"Run {'--quick' if s['quick'] else '(full protocol)'} finished rows as of {m.get('date')}: "
             f"{m.get('cpu')}, {m.get('cores')} cores, TF {m.get('tensorflow')}, Keras {m.get('keras')}, "
             f"mskd_tf commit {m.get('git_commit')}.",
             f"CIFAR-10: {t.get('train_images')} train / {t.get('val_images')} val / {t.get('test_images')} test "
             f"images. {network_name(s)} teacher: {s['teacher_epochs']} epochs, SGD lr {s['teacher_lr']} cosine, decoupled weight "
             f"decay {s['weight_decay']:g} "
             f"({(t.get('seconds') or 0) / 60:.0f} min). Every student row: B = {s['budget']:g} epochs = {budget} "
             f"optimizer steps of batch {s['batch_size']} ({per_epoch} per epoch), SGD (Nesterov) peak lr "
             f"{s['finetune_lr']} (runs under the KD loss: {s.get('kd_lr', s['finetune_lr']):g}) cosine to 0, the same weight decay; KD T = {s['temperature']:g}, alpha = {s['alpha']:g}. MS-KD: zero-cost "
             f"rung keeps {s['zero_cost_keep']}, then successive halving under the KD loss for {s['select_epochs']:g} "
             f"epochs in all, inside B; capacity pool: candidates with >= "
             f"{s.get('min_params_ratio', 0):g} x the {s.get('capacity_reference', 'largest')} candidate's parameters.",
             ""]
    seeds, decisive = s["seeds"], standard_rows(s["target_macs"])
    lines += ["| row | candidate | MACs (M) | params (k) | steps (selection + training) | wall min | val acc % | "
              "test acc % |",
              "|---|---|---|---|---|---|---|---|",
              f"| teacher | - | {t.get('macs', 0) / 1e6:.2f} | {t.get('params', 0) / 1e3:.1f} | - | "
              f"{(t.get('seconds') or 0) / 60:.0f} | {_pct(t.get('val_acc', 0))} | {_pct(t.get('test_acc', 0))} |"]
    oracle = data.get("oracle_criterion")
    select_ce = Row("select+ce", None, "ce", 0, s["target_macs"])

    def variants(label, row):  # the table's rows like this one with overrides, in the order of their names
        return [(label + ", ".join(setting_tags(v)), dataclasses.replace(row, settings=v)) for v in sorted(
            {r.settings for r in table if r.settings and dataclasses.replace(r, seed=0, settings=()) == row},
            key=bracketed)]

    named = [(f"l1 + CE ({BASELINE})", decisive["l1 + CE"]),
             ("MS-KD with fine-tuned selection (halving + KD, within B; --select_epochs > 0)", decisive["MS-KD"]),
             (f"l1 + KD ({BASELINE}, no selection)", decisive["l1 + KD"]),
             ("ablation: MS-KD selection + CE (no KD)", select_ce),
             *variants("ablation: MS-KD with ", decisive["MS-KD"]),
             *variants("ablation: l1 + KD with ", decisive["l1 + KD"]),
             *variants("ablation: MS-KD selection + CE, ", select_ce),
             ("capacity pool + zero-cost pick + KD for all of B (no selection training; the method of the library's "
              "default --select_epochs=0 since 2026-12-05)", decisive["zc+kd"]),
             *variants("the same on candidates of ", decisive["zc+kd"])]  # the MobileNetV2 protocol's R2 rows
    cands = data.get("candidates", {})
    oracle_rows = [(c, table[r]) for c in cands
                   if (r := Row("student", c, "ce", seeds[0], s["target_macs"])) in table]
    if oracle:
        named.insert(1, (f"oracle best candidate + CE (found with {len(oracle_rows)} x B steps)",
                         Row("student", oracle, "ce", 0, s["target_macs"])))
    for label, row in named:
        found = _at_seeds(table, row, seeds)
        if found:
            first = table[found[0]]
            steps = f"{first.get('selection_steps', 0)} + {first['train_steps']}"
            crit = ", ".join(sorted({table[r].get("criterion", "") for r in found}))
            minutes = statistics.mean(table[r]["seconds"] + _selection_seconds(table, r) for r in found) / 60
            lines.append(f"| {label} | {crit} | {first['macs'] / 1e6:.2f} | {first['params'] / 1e3:.1f} | "
                         f"{steps} | {minutes:.0f} | {_spread([table[r]['val_acc'] for r in found])} | "
                         f"{_spread([table[r]['test_acc'] for r in found])} |")
    for row, r in table.items():
        if row.kind == "student" and row.loss == "ce" and row.candidate == BASELINE and row.settings:
            lines.append(f"| ablation: l1 + CE at peak lr {r['lr']:g} | {r['criterion']} | {r['macs'] / 1e6:.2f} | "
                         f"{r['params'] / 1e3:.1f} | 0 + {r['train_steps']} | {r['seconds'] / 60:.0f} | "
                         f"{_pct(r['val_acc'])} (n=1) | {_pct(r['test_acc'])} (n=1) |")
    ms, bl = (_at_seeds(table, decisive[label], seeds) for label in ("MS-KD", "l1 + CE"))
    if ms and bl:
        a, b = statistics.mean(table[r]["test_acc"] for r in ms), statistics.mean(table[r]["test_acc"] for r in bl)
        lines += ["", f"**MS-KD (fine-tuned selection) - l1 + CE: {100 * (a - b):+.2f} points** test accuracy (n = {len(ms)} and {len(bl)} "
                      f"seeds; bar: >= +1.00 at n = 3); MS-KD - teacher: {100 * (a - t.get('test_acc', 0)):+.2f} "
                      "points (bar: >= -1.50)."]
    if pairs := _zero_cost_pairs(table, s["target_macs"]):
        lines += ["", pairs]
    with_sensitivity = dataclasses.replace(decisive["zc+kd"], settings=(("allocations", WITH_SENSITIVITY),))
    if gain := _paired(table, with_sensitivity, decisive["zc+kd"]):
        lines += ["", f"Zero-cost pick + KD on candidates with the sensitivity allocation minus without it, paired by "
                      f"seed (test points): {gain}."]
    if follows_mobilenet_protocol(s):
        tests, int8 = rule_inputs(table, s, oracle)
        lines += ["", "**The decision rules as written before the rows (BENCHMARKS.md), on the rows so far** (test "
                      "accuracy, points, paired by seed):", ""]
        lines += [f"- {line}" for line in study_rules.verdicts(tests, teacher_test=t.get("test_acc", 0), int8=int8)]
    timed = {seed_and_target(row, s): r for row, r in table.items()
             if row.kind == "select" and not row.settings and r.get("time_split") and r.get("seconds")
             and not _resumed(r)}
    if timed:  # issue 14: a selection's share of seconds not spent training (load, pools, setup, trace, score, save)
        lines += ["", "MS-KD's selection, wall seconds and the share not spent training (issue 14; only a run with "
                      "nothing else on the machine is a speed figure): " + "; ".join(
                          f"{k} {r['seconds']:.0f} s, {100 * (1 - r['time_split']['train'] / r['seconds']):.0f}%"
                          f" (score {r['time_split']['score']:.0f}, trace {r['time_split']['trace']:.0f} s)"
                          for k, r in sorted(timed.items())) + "."]
    if oracle_rows:
        lines += ["", f"**Every candidate + CE (seed {seeds[0]}, B steps each)**", "",
                  "| candidate | MACs (M) | params (k) | val acc before fine-tune (BN-recalibrated) % | val acc % | "
                  "test acc % |", "|---|---|---|---|---|---|"]
        for c, r in oracle_rows:
            lines.append(f"| {c} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e3:.1f} | "
                         f"{_pct(cands[c]['val_acc_before_finetune'])} | {_pct(r['val_acc'])} | {_pct(r['test_acc'])} |")
        if len(oracle_rows) >= 3:
            before = [cands[c]["val_acc_before_finetune"] for c, _ in oracle_rows]
            after = [r["val_acc"] for _, r in oracle_rows]
            lines.append(f"\nSpearman rank correlation, validation accuracy before fine-tuning vs after B steps of CE, "
                         f"over these {len(oracle_rows)} candidates: {results_io.spearman(before, after):+.2f} (how well the "
                         "zero-cost rung can rank them); parameter count vs after B steps: "
                         f"{results_io.spearman([r['params'] for _, r in oracle_rows], after):+.2f}.")
            by_allocation = {}  # uniform candidates share their widths: what is left between them is the criterion
            for c, r in oracle_rows:
                by_allocation.setdefault(cands[c].get("allocation") or "?", []).append(r)
            lines.append("Per layer allocation, mean ± std over its candidates (val / test %): " + "; ".join(
                f"{allocation} {_spread([r['val_acc'] for r in rs])} / {_spread([r['test_acc'] for r in rs])}"
                for allocation, rs in sorted(by_allocation.items())) + ".")
            with_curves = [r for _, r in oracle_rows if r.get("val_curve")]  # rows cached before curves have none
            if len(with_curves) >= 3:
                final = [r["val_acc"] for r in with_curves]
                ranks = [f"{e + 1} epoch{'s' if e else ''} {results_io.spearman([r['val_curve'][e] for r in with_curves], final):+.2f}"
                         for e in (0, 1, 3, 7) if all(len(r["val_curve"]) > e for r in with_curves)]
                lines.append(f"Validation accuracy after k epochs of the B-step cosine run vs after B steps (Spearman, "
                             f"the {len(with_curves)} rows with curves): " + ", ".join(ranks)
                             + " (how long a selection rung must be to rank them).")
    for row, r in table.items():
        if row.kind != "select":
            continue
        pool = f"capacity pool kept {', '.join(r['capacity_kept'])}; " if r.get("capacity_kept") else ""
        zero_cost = (f"zero-cost rung kept {', '.join(r['zero_cost_kept'])}" if r.get("zero_cost_kept")
                     else "no zero-cost cut (the pool left no more than the rung keeps)")
        lines.append(f"\n{row_key(row, s)}: {pool}{zero_cost}; chose "
                     f"{r['selected']['criterion']} ({r['selected']['reason']}); {r['total_steps']} steps, "
                     f"{_select_row_seconds(r):.0f} s" + (" (resumed in a later session: its candidates' seconds over "
                                                          "both sittings)" if _resumed(r) else "") + ".")
    for target in s.get("other_targets", []):
        all_seeds = sorted({row.seed for row in table if row.target == target})
        rows_t = standard_rows(target)
        found = [(label, [table[r] for r in _at_seeds(table, rows_t[short], all_seeds)]) for label, short in
                 (("l1 + CE", "l1 + CE"), ("l1 + KD", "l1 + KD"), ("MS-KD", "MS-KD"),
                  ("zero-cost pick + KD (no selection training)", "zc+kd"))]
        found = [(label, rs) for label, rs in found if rs]
        if found:
            lines += ["", f"**{round(100 * target)}% of the teacher's MACs (seeds {', '.join(map(str, all_seeds))})**",
                      "", "| row | candidate | MACs (M) | params (k) | val acc % | test acc % |", "|---|---|---|---|---|---|"]
            lines += [f"| {label} | {', '.join(sorted({r.get('criterion', '') for r in rs}))} | {rs[0]['macs'] / 1e6:.2f} | "
                      f"{rs[0]['params'] / 1e3:.1f} | {_spread([r['val_acc'] for r in rs])} | "
                      f"{_spread([r['test_acc'] for r in rs])} |" for label, rs in found]
            if pairs := _zero_cost_pairs(table, target):
                lines += ["", pairs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
