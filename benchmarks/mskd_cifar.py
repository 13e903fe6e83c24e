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
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import artifacts
import results_io
from mskd_cifar_report import plot_macs, render
from mskd_cifar_rows import (ORACLE_MAX_NETWORKS, POOL_SETTINGS, Row, candidate_set, candidate_set_tag, described,
                             experiment_plan, follows_mobilenet_protocol, kd_overrides, mobilenet_oracle,
                             oracle_criterion, row_key, row_of, setting_tags, zero_cost_pick, zero_cost_twins)
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
    from mskd_tf.keras_utils import weights_digest

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

    def train_for(seed, first_epoch=0):  # seed 0 is the pipeline's own order; others reshuffle / re-augment
        return data_lib.train_pipeline(splits.arrays["train"], s["batch_size"], augment=True, seed=seed,
                                       first_epoch=first_epoch)

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
        # A row trains for most of an hour: its epoch backup lets the next sitting resume it where this one ends.
        # Named by the row and the weights it starts from, so a changed start never resumes an old backup.
        backup = Path(s["workdir"]) / "row_backups" / hashlib.sha256(
            f"{row_key(row, s)}:{weights_digest(student)}".encode()).hexdigest()[:16]
        done = training.epochs_backed_up(backup)
        spent = backup / "seconds.json"  # after each epoch's backup: a kill in between leaves that epoch uncounted
        earlier = json.loads(spent.read_text())["seconds"] if done and spent.exists() else 0.0
        if done:
            print(f"row {row_key(row, s)}: resuming after epoch {done} from {backup}", flush=True)
        start = time.perf_counter()
        backup.mkdir(parents=True, exist_ok=True)
        callbacks = [keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=False),
                     keras.callbacks.CSVLogger(str(backup / "history.csv"), append=done > 0),
                     keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: spent.write_text(
                         json.dumps({"seconds": earlier + time.perf_counter() - start})))]
        # Validation after every epoch (~3 s each): from the oracle rows, how early a short run ranks the
        # candidates as B steps do, i.e. which selection horizon could be predictive, at no training cost.
        student, history = distill.distill(teacher, student, train_for(row.seed, done), val,
                                           epochs=steps / per_epoch, steps=steps, kd=kd, **loss, lr=lr,
                                           weight_decay=s["weight_decay"], seed=row.seed, callbacks=callbacks,
                                           verbose=2)
        if done:  # this sitting saw only the epochs after the backup; the CSV has them all
            history = training.history_from_csv(backup / "history.csv") or history
        cost = flops.count(student)
        record = {"kd": kd, **({"kd_settings": loss} if kd else {}), "seed": row.seed, "lr": lr,
                  "train_steps": steps, "seconds": round(earlier + time.perf_counter() - start, 1),
                  **({"resumed_after_epoch": done} if done else {}),
                  "val_acc": training.accuracy(student, val), "test_acc": training.accuracy(student, test),
                  "macs": int(cost.macs), "params": int(cost.params),
                  "val_curve": [round(float(v), 4) for v in history.get("val_accuracy", [])], **extra}
        record["total_steps"] = record["train_steps"] + record.get("selection_steps", 0)
        print(f"row {row_key(row, s)}: val {100 * record['val_acc']:.2f}%  test {100 * record['test_acc']:.2f}%  "
              f"({record['total_steps']} steps, {record['seconds']:.0f} s)", flush=True)
        res.put(row, record, finished=False)  # cached before the export: a failed export cannot cost the training
        shutil.rmtree(backup, ignore_errors=True)
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
