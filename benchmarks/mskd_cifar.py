"""MS-KD vs single-criterion prune + fine-tune on full CIFAR-10, at one training budget (issue 13).

    benchmarks/mskd_cifar.sh                  # the whole table, resumable; -> benchmarks/results/mskd_cifar.{json,md}
    benchmarks/mskd_cifar.sh --max_rows=3     # stop after three newly finished rows (one sitting)
    benchmarks/mskd_cifar.sh --render_only    # print the table of the rows finished so far
    benchmarks/mskd_cifar.sh --quick          # a ~10-minute smoke version on 5k images (its own files)
    benchmarks/mskd_cifar.sh --model=mobilenet_v2 --width=0.5 --teacher_epochs=80 --teacher_only  # its teacher only

Protocol
--------
* Data: CIFAR-10 from ``../shared/data`` (45k train / 5k validation carved with seed 0 / the 10k test set).
* Teacher: ``--model`` at ``--width`` (ResNet-20 by default) trained once by the pipeline's own teacher stage (``--teacher_epochs``, SGD, cosine);
  ranks and candidates by the pipeline's own rank and candidates stages (every criterion x the global and
  uniform allocations, BatchNorm-recalibrated, at ``--target_macs``). Every row starts from these files;
  their digests are stored with the rows, and a changed file empties the table. They are mirrored into
  ``benchmarks/artifacts/`` (committed with the rows) and restored from there into a fresh clone, so a table
  is built over several sessions against the same files (``benchmarks/artifacts.py``).
* Budget: every student row gets the same ``--budget`` epochs of optimizer steps (batch 128), counted in
  steps and printed per row. **MS-KD's selection steps are inside the budget**: selection spends
  ``--select_epochs`` over all candidates, the winner keeps its fine-tuned weights, and distillation
  trains what is left. Same optimizer, schedule (cosine to 0) and data for every row; the peak learning rate is
  ``--finetune_lr`` for CE and ``--finetune_lr`` x the library's ``Config.kd_lr_scale`` under the KD loss, as in
  the pipeline (rows of another KD rate say so: ``kd:l1-uniform[lr=0.05]``).
* Rows, in the order they are computed (a sitting ends after any of them; a rerun resumes):
  seed 0's decisive rows: ``ce:l1-uniform`` (l1 + CE with a uniform per-layer ratio: Li et al. /
  Torch-Pruning's default), ``mskd`` (the library's select + distill), ``select+ce`` (MS-KD's selection, then
  CE: the KD ablation), ``kd:l1-uniform`` (l1 + KD, no selection); seeds 1 and 2 of ``ce:l1-uniform`` and seed
  1 of ``ce:l2-uniform`` (one row's seed noise); seeds 1 and 2 of the decisive rows; ``zc+kd`` (the capacity
  pool's zero-cost top + KD for the whole budget: what the selection's training steps buy; also at the
  ``--zc_kd_seeds``, and at those seeds on every other target); every candidate + CE
  (the oracle table, seed 0, best zero-cost score first); the ``--other_targets`` (l1 + CE, l1 + KD, MS-KD at
  seed 0; l1 + KD and MS-KD also at the ``--other_target_seeds``); the oracle-best + CE at seeds 1 and 2; then
  the ablations: l1 + KD with one ``--kd_ablation`` setting changed each (``kd:l1-uniform[alpha=0.1]``); MS-KD and l1 + KD at every seed under each ``--mskd_kd_ablation``
  setting (``mskd[alpha=0.1]``: selection and distillation both under it); l1 + CE at the ``--lr_ablation``
  learning rates (is the baseline tuned fairly?); MS-KD with the ``--pool_ablation`` capacity pools
  (``mskd[min_params_ratio=0]`` = selection among all candidates, as before the pool existed).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import artifacts
import results_io
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
                  "selection before the capacity pool existed.")
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
flags.DEFINE_list("other_target_seeds", [], "Seeds beyond the first for l1 + KD and MS-KD at the --other_targets "
                  "(after their seed-0 rows): is a difference between them there more than one row's noise?")
flags.DEFINE_list("lr_ablation", ["0.02", "0.1"], "Other peak learning rates for l1 + CE (seed 0): is the "
                  "baseline's learning rate a fair one?")
flags.DEFINE_list("kd_ablation", ["alpha=0.1", "temperature=2", "feature_kd=1"],
                  "l1 + KD rows with one KD setting changed (seed 0), key=value of distill.distill, or lr=<peak learning rate>.")
flags.DEFINE_list("mskd_kd_ablation", [],
                  "KD settings (key=value, as --kd_ablation) under which MS-KD (selection and distillation) and l1 + KD "
                  "are recomputed at every seed: the 3-seed test of a KD setting that won its --kd_ablation row.")
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
flags.DEFINE_bool("keep_artifacts", True, "Mirror the teacher, rankings, candidates and selected networks into "
                  "benchmarks/artifacts/ as they are made and restore them into an empty work dir (a fresh clone): "
                  "commit that folder with the rows and the next session resumes the same table. Off with --quick.")
flags.DEFINE_bool("new_teacher", False, "Allow training a new teacher for a table whose rows came from another "
                  "(it empties the table; without this flag such a run stops with an error).")
flags.DEFINE_bool("render_only", False, "Only print the table of the finished rows (no training).")
flags.DEFINE_string("name", None, "Results name under benchmarks/results (default mskd_cifar[_quick]).")

BASELINE = "l1-uniform"  # what most users do: L1 filter norms, the same ratio in every layer


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


def pipeline_config(s, target, teacher_path=""):
    from mskd_tf.config import Config

    suffix = "" if target == s["target_macs"] else f"_t{round(100 * target)}"
    return Config(dataset=s["dataset"], model=s["model"], width=s.get("width", 1.0), train_subset=s["train_subset"], batch_size=s["batch_size"],
                  epochs=s["teacher_epochs"], lr=s["teacher_lr"], schedule="cosine", weight_decay=s["weight_decay"],
                  teacher=teacher_path,
                  target_macs=target, round_to=s["round_to"], calibration_batches=10, select_epochs=s["select_epochs"],
                  zero_cost_keep=s["zero_cost_keep"], finetune_lr=s["finetune_lr"], distill_epochs=s["budget"],
                  temperature=s["temperature"], alpha=s["alpha"], workdir=s["workdir"] + suffix, seed=0)


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
        self.name = name
        path = results_io.RESULTS / f"{name}.json"
        # Rows of another capacity pool carry it in their names, so the table stays valid when it changes.
        key = {k: v for k, v in s.items() if k not in ("seeds", "other_targets", "min_params_ratio",
                                                       "capacity_reference", "kd_lr")}
        old = json.loads(path.read_text()).get("figures", {}) if path.exists() else {}
        self.data = old if old.get("settings_key") == key else {"settings_key": key, "rows": {}, "targets": {}}
        # MS-KD rows computed before the capacity pool existed selected among all candidates (ratio 0).
        for name in [n for n, r in self.data["rows"].items()
                     if n.split("/")[0] in ("select", "mskd", "select+ce") and "min_params_ratio" not in r]:
            row = self.data["rows"].pop(name)
            prefix, rest = name.split("/", 1)
            self.data["rows"][f"{prefix}{pool_variant(0.0, s)}/{rest}"] = {**row, "min_params_ratio": 0.0}
        # MS-KD rows whose pool was a fraction of the largest candidate's parameters keep that in their names.
        for name in [n for n, r in self.data["rows"].items()
                     if n.split("/")[0] in ("select", "mskd", "select+ce") and r.get("min_params_ratio")
                     and "capacity_reference" not in r]:
            row = self.data["rows"].pop(name)
            prefix, rest = name.split("/", 1)
            variant = pool_variant(row["min_params_ratio"], s, reference="largest")
            self.data["rows"][f"{prefix}{variant}/{rest}"] = {**row, "capacity_reference": "largest"}
        # A KD row's name carries its learning rate unless it is the default KD rate, which was finetune_lr until
        # the library's Config.kd_lr_scale (rows named then say [lr=<finetune_lr>] now) and is s["kd_lr"] since.
        named_default = self.data.get("kd_lr_default", s["finetune_lr"])
        if named_default != s["kd_lr"]:
            renamed = {}
            for name, row in self.data["rows"].items():
                prefix, rest = name.split("/", 1)
                if prefix.startswith(("select", "mskd", "zc+kd")) or (prefix.startswith("kd:") and row.get("kd")):
                    lr = _tag_value(prefix, "lr")
                    name = with_kd_lr(name, named_default if lr is None else lr, s)
                renamed[name] = row
            self.data["rows"] = renamed
        self.data["kd_lr_default"] = s["kd_lr"]
        self.data["settings"] = s
        self.new_rows = 0

    def row(self, name):
        return self.data["rows"].get(name)

    def put(self, name, value):
        self.data["rows"][name] = value
        self.new_rows += 1
        self.save()
        if FLAGS.max_rows and self.new_rows >= FLAGS.max_rows:
            print(f"--max_rows={FLAGS.max_rows} reached; rerun to continue", flush=True)
            raise SystemExit(0)

    def save(self):
        results_io.write_results(self.name, self.data)


def pool_variant(ratio: float, s: dict, reference: str = "median") -> str:
    """The row-name suffix of MS-KD rows selected with this capacity pool ('' = the default)."""
    if ratio and reference != s["capacity_reference"]:
        return f"[min_params_ratio={ratio:g} x {reference}]"
    return "" if ratio == s["min_params_ratio"] else f"[min_params_ratio={ratio:g}]"


def _tag_value(prefix: str, key: str):
    found = re.search(rf"\[{key}=([^\]]+)\]", prefix)
    return float(found[1]) if found else None


def with_kd_lr(name: str, lr: float, s: dict) -> str:
    """A KD row's (or selection's) name with its learning rate tag: none at the default KD rate s["kd_lr"].

    The tags after the capacity pool's stay sorted by key, as mskd_rows writes them."""
    prefix, slash, rest = name.partition("/")
    tags = re.findall(r"\[([^\]]+)\]", prefix)
    base = prefix[:prefix.index("[")] if tags else prefix
    pool = [t for t in tags if t.startswith("min_params_ratio=")]
    settings = sorted([t for t in tags if not t.startswith(("min_params_ratio=", "lr="))]
                      + ([f"lr={lr:g}"] if abs(lr - s["kd_lr"]) > 1e-12 else []), key=lambda t: t.split("=")[0])
    return base + "".join(f"[{t}]" for t in pool + settings) + slash + rest


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


def keep_artifacts(s) -> bool:
    return FLAGS.keep_artifacts and not s["quick"]


def run_stages(s, target, teacher_path="", stop_after="candidates") -> Path:
    """The pipeline's stages up to ``stop_after`` in the target's work dir, restored from and mirrored to artifacts."""
    from mskd_tf.api import run_pipeline

    cfg = pipeline_config(s, target, teacher_path)
    wd = Path(cfg.workdir)
    if keep_artifacts(s):
        artifacts.restore(wd)
    run_pipeline(cfg, stop_after=stop_after)
    if keep_artifacts(s):
        artifacts.save(wd)
    return wd


def prepare(s, target, teacher_path=""):
    """teacher, rank, candidates through the pipeline's stages; returns the workdir and its digests."""
    wd = run_stages(s, target, teacher_path)
    # The files every row starts from, by content: a rebuilt teacher or candidate invalidates the rows.
    files = ["teacher.keras", "rankings.json", "candidates.json", *sorted(
        str(p.relative_to(wd)) for p in (wd / "candidates").glob("*.keras"))]
    return wd, {name: hashlib.sha256((wd / name).read_bytes()).hexdigest()[:16] for name in files}


def main(_):
    s = settings()
    if FLAGS.render_only:  # also refreshes the .md and the plot, so the finished rows can be committed mid-table
        figures = json.loads((results_io.RESULTS / f"{s['name']}.json").read_text())["figures"]
        text = render(figures)
        (results_io.RESULTS / f"{s['name']}.md").write_text(text)
        plot_macs(figures, results_io.RESULTS / f"{s['name']}_macs.png")
        print(text, flush=True)
        return

    import keras

    from mskd_tf import data as data_lib
    from mskd_tf import distill, flops, selection, training

    res = Results(s["name"], s)
    if FLAGS.forget:
        exact = {f[:-1] for f in FLAGS.forget if f.endswith("$")}
        prefixes = tuple(f for f in FLAGS.forget if not f.endswith("$"))
        dropped = [k for k in res.data.get("rows", {}) if k in exact or (prefixes and k.startswith(prefixes))]
        res.data["rows"] = {k: v for k, v in res.data.get("rows", {}).items() if k not in dropped}
        print(f"forgot {len(dropped)} cached rows: {', '.join(dropped) or '-'}", flush=True)
    res.data["machine"] = machine()
    print(json.dumps(s), flush=True)
    splits = data_lib.load(s["dataset"], batch_size=s["batch_size"], train_subset=s["train_subset"] or None, seed=0)
    val, test = splits.val, splits.test
    per_epoch = training.steps_per_epoch(splits.train)
    budget = training.budget_steps(s["budget"], per_epoch)

    def train_for(seed):  # seed 0 is the pipeline's own order; other seeds reshuffle / re-augment the same images
        return data_lib.train_pipeline(splits.arrays["train"], s["batch_size"], augment=True, seed=seed)

    def target_rows(target, wd):
        """The rows of one MACs target, each computed once and cached."""
        tag = "" if target == s["target_macs"] else f"@{round(100 * target)}"
        teacher = keras.models.load_model(wd / "teacher.keras")
        candidates = {r["criterion"]: r for r in json.loads((wd / "candidates.json").read_text())["candidates"]}
        path = lambda c: wd / "candidates" / f"{c}.keras"  # noqa: E731

        def student_row(name, source, *, kd, seed, steps=budget, extra=None, lr=None, kd_settings=None):
            kd_settings = dict(kd_settings or {})
            lr = kd_settings.pop("lr", lr)  # a KD run's learning rate is one of its settings (lr=...)
            lr = lr or (s["kd_lr"] if kd else s["finetune_lr"])
            name = (with_kd_lr(name, lr, s) if kd else name) + tag
            loss = {"temperature": s["temperature"], "alpha": s["alpha"], "feature_kd": 0.0, **kd_settings}
            if res.row(name) or name in FLAGS.later:
                return res.row(name)
            keras.utils.set_random_seed(seed)
            student = keras.models.load_model(source)
            start = time.perf_counter()
            # Validation after every epoch (~3 s each): from the oracle rows, how early a short run ranks the
            # candidates as B steps do, i.e. which selection horizon could be predictive, at no training cost.
            student, history = distill.distill(teacher, student, train_for(seed), val, epochs=steps / per_epoch,
                                         steps=steps, kd=kd, **loss,
                                         lr=lr, weight_decay=s["weight_decay"], seed=seed,
                                         verbose=2)
            cost = flops.count(student)
            row = {"kd": kd, **({"kd_settings": loss} if kd else {}), "seed": seed, "lr": lr,
                   "train_steps": steps, "seconds": round(time.perf_counter() - start, 1),
                   "val_acc": training.accuracy(student, val), "test_acc": training.accuracy(student, test),
                   "macs": int(cost.macs), "params": int(cost.params),
                   "val_curve": [round(float(v), 4) for v in history.get("val_accuracy", [])], **(extra or {})}
            row["total_steps"] = row["train_steps"] + row.get("selection_steps", 0)
            print(f"row {name}: val {100 * row['val_acc']:.2f}%  test {100 * row['test_acc']:.2f}%  "
                  f"({row['total_steps']} steps, {row['seconds']:.0f} s)", flush=True)
            res.put(name, row)
            return row

        def mskd_rows(seed, with_ce, ratio=s["min_params_ratio"], kd_settings=None):
            """The library's select stage, then its distill stage's KD run (and its CE run as the ablation)."""
            kd_settings = {"lr": s["kd_lr"], **(kd_settings or {})}
            variant = with_kd_lr(pool_variant(ratio, s) + "".join(
                f"[{k}={v:g}]" for k, v in sorted(kd_settings.items()) if k != "lr"), kd_settings["lr"], s)
            # Folder names say the rate when it is not finetune_lr (the default KD rate before Config.kd_lr_scale).
            folder_settings = {k: v for k, v in kd_settings.items() if k != "lr" or v != s["finetune_lr"]}
            out = wd / (f"select_s{seed}" + (f"_minparams{ratio:g}" if ratio else "")  # ratio 0: the original folders
                        + (f"_{s['capacity_reference']}" if ratio else "")  # "_minparams0.9": x the largest
                        + "".join(f"_{k}{v:g}" for k, v in sorted(folder_settings.items())))
            key = f"select{variant}/s{seed}{tag}"
            if not res.row(key) or not (out / "selected.keras").exists():
                start = time.perf_counter()
                payload = selection.select(
                    {c: str(path(c)) for c in candidates}, lambda: train_for(seed), val, workdir=str(out),
                    epochs=s["select_epochs"], zero_cost_keep=s["zero_cost_keep"],
                    zero_cost_scores={c: r["val_acc_before_finetune"] for c, r in candidates.items()},
                    candidate_costs=candidates,
                    min_params_ratio=ratio,
                    teacher=teacher, temperature=kd_settings.get("temperature", s["temperature"]),
                    alpha=kd_settings.get("alpha", s["alpha"]), lr=kd_settings["lr"],  # hints: distill only
                    weight_decay=s["weight_decay"], seed=seed)
                res.put(key, {"seed": seed, "seconds": round(time.perf_counter() - start, 1), "min_params_ratio": ratio,
                              "capacity_reference": s["capacity_reference"],
                              "capacity_kept": (payload["protocol"]["capacity_pool"] or {}).get("kept"),
                              "selected": payload["selected"], "total_steps": payload["protocol"]["total_steps"],
                              # None: the capacity pool left no more than the rung keeps, so no zero-cost cut
                              "zero_cost_kept": (payload["protocol"]["zero_cost"] or {}).get("kept"),
                              "rungs": payload["protocol"]["rungs"],
                              # issue 14: where the selection's seconds went, over every candidate and rung
                              # (the rest of "seconds" is outside the candidates: loading, the pools)
                              "time_split": {k: round(v, 1) for k, v in
                                             selection.time_split_total(payload).items()}})
                if keep_artifacts(s):
                    artifacts.save(wd)
            chosen = res.row(key)
            spent = chosen["total_steps"]
            extra = {"criterion": chosen["selected"]["criterion"], "selection_steps": spent,
                     "selection_seconds": chosen["seconds"], "min_params_ratio": ratio,
                     "capacity_reference": s["capacity_reference"]}
            student_row(f"mskd{variant}/s{seed}", out / "selected.keras", kd=True, seed=seed, steps=budget - spent,
                        extra=extra, kd_settings=kd_settings)
            if with_ce:
                student_row(f"select+ce{variant}/s{seed}", out / "selected.keras", kd=False, seed=seed, steps=budget - spent,
                            extra=extra)

        def zc_kd_row(seed):
            """The capacity pool's zero-cost top + KD for all of B (zero-cost-only selection; no halving steps)."""
            pooled = selection.capacity_pool({c: candidates[c]["params"] for c in candidates}, s["min_params_ratio"])
            top = max(pooled, key=lambda c: candidates[c]["val_acc_before_finetune"])
            same_run = res.row(f"kd:{top}/s{seed}{tag}")
            if same_run and not res.row(f"zc+kd/s{seed}{tag}"):
                res.put(f"zc+kd/s{seed}{tag}", same_run)
            return student_row(f"zc+kd/s{seed}", path(top), kd=True, seed=seed, extra={"criterion": top})

        return student_row, mskd_rows, zc_kd_row, candidates, path

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
    student_row, mskd_rows, zc_kd_row, candidates, path = target_rows(s["target_macs"], wd)
    res.data["candidates"] = {c: {k: r.get(k) for k in ("macs", "params", "val_acc_before_finetune", "ranking",
                                                         "allocation")} for c, r in candidates.items()}
    res.save()

    s0 = s["seeds"][0]

    def decisive(seed):
        """l1 + CE, MS-KD and l1 + KD; at seed 0 also selection + CE, which splits MS-KD's gain."""
        student_row(f"ce:{BASELINE}/s{seed}", path(BASELINE), kd=False, seed=seed, extra={"criterion": BASELINE})
        mskd_rows(seed, with_ce=seed == s0)
        student_row(f"kd:{BASELINE}/s{seed}", path(BASELINE), kd=True, seed=seed, extra={"criterion": BASELINE})

    def other_targets():
        for target in s["other_targets"]:
            wd_t, digests_t = prepare(s, target, teacher_path=str(wd / "teacher.keras"))
            tag = f"@{round(100 * target)}"
            if res.data["targets"].get(tag) != digests_t:  # rebuilt candidates: that target's rows are stale
                res.data["rows"] = {k: v for k, v in res.data["rows"].items() if not k.endswith(tag)}
                res.data["targets"][tag] = digests_t
            row_t, mskd_t, zc_kd_t, _, path_t = target_rows(target, wd_t)
            row_t(f"ce:{BASELINE}/s{s0}", path_t(BASELINE), kd=False, seed=s0, extra={"criterion": BASELINE})
            for seed in [s0, *(int(x) for x in FLAGS.other_target_seeds if int(x) != s0)]:
                row_t(f"kd:{BASELINE}/s{seed}", path_t(BASELINE), kd=True, seed=seed, extra={"criterion": BASELINE})
                mskd_t(seed, with_ce=False)
            for seed in FLAGS.zc_kd_seeds:
                zc_kd_t(int(seed))

    def ablations():
        # The ablations, most useful first: the KD loss is the one lever left on bar 1 (the oracle best + CE is level
        # with l1 + CE, so selection cannot add there; KD adds +0.5-0.7); then the baseline's lr; then the pool.
        for variant in FLAGS.kd_ablation:  # the KD loss itself: which settings help l1 + KD
            key, value = variant.split("=")
            student_row(f"kd:{BASELINE}[{variant}]/s{s0}", path(BASELINE), kd=True, seed=s0,
                        kd_settings={key: float(value)}, extra={"criterion": BASELINE})
        for variant in FLAGS.mskd_kd_ablation:  # a winning KD setting, tested as the decisive rows are: 3 seeds
            key, value = variant.split("=")
            for seed in s["seeds"]:
                student_row(f"kd:{BASELINE}[{variant}]/s{seed}", path(BASELINE), kd=True, seed=seed,
                            kd_settings={key: float(value)}, extra={"criterion": BASELINE})
                mskd_rows(seed, with_ce=False, kd_settings={key: float(value)})
        for lr in FLAGS.lr_ablation:  # is the baseline's learning rate a fair one?
            student_row(f"ce:{BASELINE}@lr{lr}/s{s0}", path(BASELINE), kd=False, seed=s0, lr=float(lr),
                        extra={"criterion": BASELINE})
        for ratio in FLAGS.pool_ablation:  # what the capacity pool gave
            if float(ratio) != s["min_params_ratio"]:
                mskd_rows(s0, with_ce=True, ratio=float(ratio))

    # Order, so that a partial table already answers the most: seed 0's decisive rows; the 18-row oracle
    # table (seed 0's selection + CE lost 1.12 points to l1 + CE: which candidates win after B steps, and
    # how early a run ranks them so, the evidence a better selection needs); the other MACs targets (does
    # KD's gain grow with the teacher-student gap?); then the other seeds; then the ablations.
    for name in FLAGS.first:
        match = re.fullmatch(r"(ce|kd):([\w-]+)(?:\[lr=(\d+(?:\.\d+)?)\])?/s(\d+)", name)
        if not match or match[2] not in candidates or (match[3] and match[1] == "ce"):
            raise SystemExit(f"--first={name!r}: expected ce:<candidate>/s<seed> or kd:<candidate>[lr=<rate>]/s<seed> "
                             f"with a candidate of this table ({', '.join(sorted(candidates))}).")
        student_row(name, path(match[2]), kd=match[1] == "kd", seed=int(match[4]), extra={"criterion": match[2]},
                    kd_settings={"lr": float(match[3])} if match[3] else None)
    decisive(s0)
    if FLAGS.ablations_first:
        ablations()
    # The seed noise of one row, before the rest of the oracle: the candidates end within ~1.3 points of each other
    # and l2-uniform (l1-uniform's widths; uniform widths no longer depend on the ranking) ended 1.08 below it;
    # whether any selection can beat the default criterion depends on that spread exceeding the noise.
    # l2-uniform's seed 1 separates kept channels from noise.
    for seed in s["seeds"][1:]:
        student_row(f"ce:{BASELINE}/s{seed}", path(BASELINE), kd=False, seed=seed, extra={"criterion": BASELINE})
    if len(s["seeds"]) > 1 and "l2-uniform" in candidates:
        seed = s["seeds"][1]
        student_row(f"ce:l2-uniform/s{seed}", path("l2-uniform"), kd=False, seed=seed, extra={"criterion": "l2-uniform"})
    # The decisive rows' other seeds before the rest of the oracle: the bars are on 3-seed means, and the
    # remaining oracle rows then test the capacity pool on candidates it was not derived from.
    for seed in s["seeds"][1:]:
        decisive(seed)
    # What the selection's training buys: the capacity pool's zero-cost top + KD for the whole budget (no halving
    # steps). At seed 0 that is MS-KD's own pick, so the row isolates the 528 selection steps.
    for seed in [s0, *(int(x) for x in FLAGS.zc_kd_seeds if int(x) != s0)]:
        zc_kd_row(seed)
    # The oracle table, in the order a selection meets the candidates (best zero-cost score first), so a
    # partial table already scores the picks of the selection rules (benchmarks/selection_signals.py).
    for c in sorted(candidates, key=lambda c: -candidates[c]["val_acc_before_finetune"]):
        student_row(f"ce:{c}/s{s0}", path(c), kd=False, seed=s0, extra={"criterion": c})
    oracle_rows = {c: res.row(f"ce:{c}/s{s0}") for c in candidates}
    oracle = None if None in oracle_rows.values() else max(candidates, key=lambda c: oracle_rows[c]["val_acc"])
    res.data["oracle_criterion"] = oracle  # None while --later leaves oracle rows out
    other_targets()
    for seed in s["seeds"][1:] if oracle else []:
        student_row(f"ce:{oracle}/s{seed}", path(oracle), kd=False, seed=seed, extra={"criterion": oracle})
    if not FLAGS.ablations_first:
        ablations()

    text = render(res.data)
    (results_io.RESULTS / f"{s['name']}.md").write_text(text)
    plot_macs(res.data, results_io.RESULTS / f"{s['name']}_macs.png")
    print("\n" + text, flush=True)


def plot_macs(data: dict, path: Path):
    """Test accuracy against MACs for l1 + CE, l1 + KD and MS-KD at every target (seed 0), teacher marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows, t = data["settings"], data["rows"], data["teacher"]
    s0 = s["seeds"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    targets = sorted([s["target_macs"], *s["other_targets"]])
    for label, prefix, style in (("l1 + CE", f"ce:{BASELINE}", "o-"), ("l1 + KD", f"kd:{BASELINE}", "s-"),
                                 ("MS-KD", "mskd", "D-")):
        points = []
        for target in targets:
            tag = "" if target == s["target_macs"] else f"@{round(100 * target)}"
            r = rows.get(f"{prefix}/s{s0}{tag}")
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


def _paired(rows, a, b, tag=""):
    """'a - b' test accuracy paired by seed over the seeds both prefixes have: mean (s.e. of the mean), or None."""
    seeds = [m[1] for m in (re.fullmatch(rf"{re.escape(a)}/s(\d+){re.escape(tag)}", k) for k in rows) if m]
    diffs = [rows[f"{a}/s{sd}{tag}"]["test_acc"] - rows[f"{b}/s{sd}{tag}"]["test_acc"] for sd in seeds
             if f"{b}/s{sd}{tag}" in rows]
    if not diffs:
        return None
    error = f", s.e. {100 * statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f}" if len(diffs) > 1 else ""
    return f"{100 * statistics.mean(diffs):+.2f} (n={len(diffs)}{error})"


def _zero_cost_pairs(rows, tag="") -> str:
    """zc+kd against l1 + KD and MS-KD, paired by seed (the test of zero-cost-only selection)."""
    pairs = [(label, _paired(rows, "zc+kd", prefix, tag)) for label, prefix in
             (("l1 + KD", f"kd:{BASELINE}"), ("MS-KD", "mskd"))]
    found = [f"{label} {value}" for label, value in pairs if value]
    return ("Zero-cost pick + KD minus, paired by seed (test points): " + "; ".join(found) + ".") if found else ""


def _resumed(select_row) -> bool:
    """A selection stopped by a session's end and resumed: its wall "seconds" timed the last sitting only, while
    its candidates' recorded seconds (time_split, kept in the selection's checkpoints) span every sitting."""
    return sum(select_row.get("time_split", {}).values()) > select_row.get("seconds", 0.0)


def _select_row_seconds(select_row) -> float:
    """A select row's seconds; for a resumed selection the candidates' seconds over all sittings (a lower bound)."""
    return max(select_row.get("seconds", 0.0), sum(select_row.get("time_split", {}).values()))


def _selection_seconds(rows, name) -> float:
    """A MS-KD row's selection time, from its select row (rows cached before the select row existed: their own)."""
    row = rows[name]
    if "selection_steps" not in row:
        return 0.0
    selection = "select" + name[len("mskd"):] if name.startswith("mskd") else ""
    if selection in rows:
        return _select_row_seconds(rows[selection])
    return row.get("selection_seconds", 0.0)


def _rows(rows, prefix, seeds, tag=""):
    return [rows[f"{prefix}/s{sd}{tag}"] for sd in seeds if f"{prefix}/s{sd}{tag}" in rows]


def render(data: dict) -> str:
    s, rows = data["settings"], data["rows"]
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
    seeds = s["seeds"]
    lines += ["| row | candidate | MACs (M) | params (k) | steps (selection + training) | wall min | val acc % | "
              "test acc % |",
              "|---|---|---|---|---|---|---|---|",
              f"| teacher | - | {t.get('macs', 0) / 1e6:.2f} | {t.get('params', 0) / 1e3:.1f} | - | "
              f"{(t.get('seconds') or 0) / 60:.0f} | {_pct(t.get('val_acc', 0))} | {_pct(t.get('test_acc', 0))} |"]
    oracle = data.get("oracle_criterion")
    named = [(f"l1 + CE ({BASELINE})", f"ce:{BASELINE}"),
             ("MS-KD with fine-tuned selection (halving + KD, within B; --select_epochs > 0)", "mskd"),
             (f"l1 + KD ({BASELINE}, no selection)", f"kd:{BASELINE}"),
             ("ablation: MS-KD selection + CE (no KD)", "select+ce"),
             *[(f"ablation: MS-KD with {v[1:-1].replace('][', ', ')}", f"mskd{v}") for v in sorted(
                 {k[len("mskd"):k.index("/")] for k in rows if k.startswith("mskd[")})],
             *[(f"ablation: l1 + KD with {v[1:-1].replace('][', ', ')}", f"kd:{BASELINE}{v}") for v in sorted(
                 {k[len(f"kd:{BASELINE}"):k.index("/")] for k in rows
                  if k.startswith(f"kd:{BASELINE}[") and "@" not in k.split("/")[-1]})],
             *[(f"ablation: MS-KD selection + CE, {v[1:-1].replace('][', ', ')}", f"select+ce{v}") for v in sorted(
                 {k[len("select+ce"):k.index("/")] for k in rows if k.startswith("select+ce[")})],
             ("capacity pool + zero-cost pick + KD for all of B (no selection training; the method of the library's "
              "default --select_epochs=0 since 2026-12-05)", "zc+kd")]
    if oracle:
        named.insert(1, (f"oracle best candidate + CE (found with {len(data.get('candidates', {}))} x B steps)",
                         f"ce:{oracle}"))
    for label, prefix in named:
        found = _rows(rows, prefix, seeds)
        if found:
            steps = f"{found[0].get('selection_steps', 0)} + {found[0]['train_steps']}"
            crit = ", ".join(sorted({r.get("criterion", "") for r in found}))
            minutes = statistics.mean(r["seconds"] + _selection_seconds(rows, f"{prefix}/s{r['seed']}") for r in found) / 60
            lines.append(f"| {label} | {crit} | {found[0]['macs'] / 1e6:.2f} | {found[0]['params'] / 1e3:.1f} | "
                         f"{steps} | {minutes:.0f} | {_spread([r['val_acc'] for r in found])} | "
                         f"{_spread([r['test_acc'] for r in found])} |")
    for key, r in rows.items():
        if key.startswith(f"ce:{BASELINE}@lr"):
            lines.append(f"| ablation: l1 + CE at peak lr {r['lr']:g} | {r['criterion']} | {r['macs'] / 1e6:.2f} | "
                         f"{r['params'] / 1e3:.1f} | 0 + {r['train_steps']} | {r['seconds'] / 60:.0f} | "
                         f"{_pct(r['val_acc'])} (n=1) | {_pct(r['test_acc'])} (n=1) |")
    ms, bl = _rows(rows, "mskd", seeds), _rows(rows, f"ce:{BASELINE}", seeds)
    if ms and bl:
        a, b = statistics.mean(r["test_acc"] for r in ms), statistics.mean(r["test_acc"] for r in bl)
        lines += ["", f"**MS-KD (fine-tuned selection) - l1 + CE: {100 * (a - b):+.2f} points** test accuracy (n = {len(ms)} and {len(bl)} "
                      f"seeds; bar: >= +1.00 at n = 3); MS-KD - teacher: {100 * (a - t.get('test_acc', 0)):+.2f} "
                      "points (bar: >= -1.50)."]
    if pairs := _zero_cost_pairs(rows):
        lines += ["", pairs]
    timed = {k: r for k, r in rows.items()
             if k.startswith("select/") and r.get("time_split") and r.get("seconds") and not _resumed(r)}
    if timed:  # issue 14: a selection's share of seconds not spent training (load, pools, setup, trace, score, save)
        lines += ["", "MS-KD's selection, wall seconds and the share not spent training (issue 14; only a run with "
                      "nothing else on the machine is a speed figure): " + "; ".join(
                          f"{k.split('/', 1)[1]} {r['seconds']:.0f} s, {100 * (1 - r['time_split']['train'] / r['seconds']):.0f}%"
                          f" (score {r['time_split']['score']:.0f}, trace {r['time_split']['trace']:.0f} s)"
                          for k, r in sorted(timed.items())) + "."]
    cands = data.get("candidates", {})
    oracle_rows = [(c, rows[f"ce:{c}/s{seeds[0]}"]) for c in cands if f"ce:{c}/s{seeds[0]}" in rows]
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
    selections = [(k, r) for k, r in rows.items() if k.startswith("select") and not k.startswith("select+ce")]
    for k, r in selections:
        pool = f"capacity pool kept {', '.join(r['capacity_kept'])}; " if r.get("capacity_kept") else ""
        zero_cost = (f"zero-cost rung kept {', '.join(r['zero_cost_kept'])}" if r.get("zero_cost_kept")
                     else "no zero-cost cut (the pool left no more than the rung keeps)")
        lines.append(f"\n{k}: {pool}{zero_cost}; chose "
                     f"{r['selected']['criterion']} ({r['selected']['reason']}); {r['total_steps']} steps, "
                     f"{_select_row_seconds(r):.0f} s" + (" (resumed in a later session: its candidates' seconds over "
                                                          "both sittings)" if _resumed(r) else "") + ".")
    for target in s.get("other_targets", []):
        tag = f"@{round(100 * target)}"
        all_seeds = sorted({int(k.split("/s")[1][:-len(tag)]) for k in rows if k.endswith(tag) and "/s" in k})
        found = [(label, [rows[f"{prefix}/s{sd}{tag}"] for sd in all_seeds if f"{prefix}/s{sd}{tag}" in rows])
                 for label, prefix in (("l1 + CE", f"ce:{BASELINE}"), ("l1 + KD", f"kd:{BASELINE}"), ("MS-KD", "mskd"),
                                       ("zero-cost pick + KD (no selection training)", "zc+kd"))]
        found = [(label, rs) for label, rs in found if rs]
        if found:
            lines += ["", f"**{round(100 * target)}% of the teacher's MACs (seeds {', '.join(map(str, all_seeds))})**",
                      "", "| row | candidate | MACs (M) | params (k) | val acc % | test acc % |", "|---|---|---|---|---|---|"]
            lines += [f"| {label} | {', '.join(sorted({r.get('criterion', '') for r in rs}))} | {rs[0]['macs'] / 1e6:.2f} | "
                      f"{rs[0]['params'] / 1e3:.1f} | {_spread([r['val_acc'] for r in rs])} | "
                      f"{_spread([r['test_acc'] for r in rs])} |" for label, rs in found]
            if pairs := _zero_cost_pairs(rows, tag):
                lines += ["", pairs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
