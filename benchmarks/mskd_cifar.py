"""Accuracy benchmark on CIFAR-10: MS-KD vs single-criterion pruning + fine-tune (issue 9).

One command reruns everything; ``--quick`` is a ~15-minute variant::

    .venv/bin/python benchmarks/mskd_cifar.py --quick     # -> benchmarks/results/mskd_cifar_quick.{json,md}
    .venv/bin/python benchmarks/mskd_cifar.py             # -> benchmarks/results/mskd_cifar.{json,md}

Protocol (every row: same data, same student budget of ``--budget`` epochs, same
optimizer and learning rate):

1. the teacher (ResNet-20, trained once per run by the pipeline's own stages,
   which also rank channels and build one clone per criterion at ``--target_macs``);
2. ``ce:<criterion>``: every criterion's clone fine-tuned with plain cross-entropy;
3. ``mskd``: selection among all clones (successive halving, ``--select_epochs``
   per candidate), then distillation of the chosen clone;
4. ablations: ``best+kd`` (the best single criterion, chosen by validation
   accuracy of the ``ce:`` rows, distilled without selection) and ``select+ce``
   (the selected clone fine-tuned with cross-entropy instead of KD).

The decisive rows (``ce:<best>``, ``mskd``, ``best+kd``, ``select+ce``) are rerun
for every seed in ``--seeds``; a seed changes the student phase only (data order,
augmentation, selection and training randomness), never the teacher or the split.
Finished rows are cached in the results JSON, so an interrupted run resumes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small schedule (~15 min on 2 cores): smaller subset, 1 seed, shorter training.")
flags.DEFINE_string("dataset", f"folder:{results_io.SHARED_CIFAR10}", "mskd_tf.data source string.")
flags.DEFINE_string("model", "resnet20", "Teacher architecture.")
flags.DEFINE_integer("train_subset", None, "Training images (default 10000, quick 4000).")
flags.DEFINE_integer("teacher_epochs", None, "Teacher epochs (default 12, quick 6).")
flags.DEFINE_integer("budget", None, "Student budget in epochs for every CE / KD row (default 2, quick 1).")
flags.DEFINE_float("select_epochs", None, "Selection budget per candidate in epochs (default 1, quick 0.5).")
flags.DEFINE_list("seeds", None, "Seeds of the decisive rows (default 0,1,2, quick 0).")
flags.DEFINE_float("target_macs", 0.5, "Fraction of the teacher's MACs every candidate keeps.")
flags.DEFINE_float("finetune_lr", 0.02, "Peak learning rate of every student phase.")
flags.DEFINE_integer("test_images_tflite", None, "Test images for LiteRT accuracy (default all, quick 2000).")
flags.DEFINE_string("workdir", None, "Artifacts (default runs/bench_mskd_cifar[_quick]).")
flags.DEFINE_string("name", None, "Results name under benchmarks/results (default mskd_cifar[_quick]).")
flags.DEFINE_bool("render_only", False, "Only print the tables of the rows already in the results JSON (no training).")

DEFAULTS = {  # full, quick
    "train_subset": (10000, 4000),
    "teacher_epochs": (12, 6),
    "budget": (2, 1),
    "select_epochs": (1.0, 0.5),
    "seeds": (["0", "1", "2"], ["0"]),
    "test_images_tflite": (None, 2000),
}


def settings() -> dict:
    quick = FLAGS.quick
    s = {k: (getattr(FLAGS, k) if getattr(FLAGS, k) is not None else v[int(quick)]) for k, v in DEFAULTS.items()}
    s["seeds"] = [int(x) for x in s["seeds"]]
    s.update(quick=quick, dataset=FLAGS.dataset, model=FLAGS.model, target_macs=FLAGS.target_macs,
             finetune_lr=FLAGS.finetune_lr, batch_size=128, teacher_lr=0.1, temperature=4.0, alpha=0.5)
    s["name"] = FLAGS.name or ("mskd_cifar_quick" if quick else "mskd_cifar")
    s["workdir"] = FLAGS.workdir or f"runs/bench_{s['name']}"
    return s


def machine() -> dict:
    """results_io's machine fields plus the library's versions and the commit it came from."""
    import mskd_tf
    from mskd_tf import report

    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {**results_io.machine(), **report.versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            # mskd_cifar.sh runs a snapshot of this commit's library; otherwise the working tree's.
            "git_commit": os.environ.get("MSKD_LIBRARY_COMMIT") or git("rev-parse", "--short", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "mskd_tf")),
            "library_path": str(Path(mskd_tf.__file__).parent)}


class Results:
    """The figures, written through results_io after every finished row so a rerun resumes."""

    def __init__(self, name: str, s: dict):
        self.name = name
        path = results_io.RESULTS / f"{name}.json"
        # Rows are only reusable under identical settings (seeds may be added or dropped).
        key = {k: v for k, v in s.items() if k != "seeds"}
        old = json.loads(path.read_text()).get("figures", {}) if path.exists() else {}
        self.data = old if old.get("settings_key") == key else {"settings_key": key, "rows": {}}
        self.data["settings"] = s

    def row(self, name):
        return self.data["rows"].get(name)

    def put(self, name, value):
        self.data["rows"][name] = value
        self.save()

    def save(self):
        results_io.write_results(self.name, self.data)


def main(_):
    import keras
    import numpy as np

    from mskd_tf import data as data_lib
    from mskd_tf import deploy, distill, flops, selection
    from mskd_tf.api import run_pipeline
    from mskd_tf.config import ALL_CRITERIA, Config
    from mskd_tf.stages import evaluate
    from mskd_tf.training import configure_runtime

    s = settings()
    if FLAGS.render_only:  # e.g. to look at a run that is still going, or was cut short
        print(render(json.loads((results_io.RESULTS / f"{s['name']}.json").read_text())["figures"]), flush=True)
        return
    configure_runtime()
    wd = Path(s["workdir"])
    res = Results(s["name"], s)
    res.data["machine"] = machine()
    print(json.dumps(s), flush=True)

    # 1. teacher, rank, candidates: the pipeline's own stages (cached in the workdir).
    cfg = Config(dataset=s["dataset"], model=s["model"], train_subset=s["train_subset"], batch_size=s["batch_size"],
                 epochs=s["teacher_epochs"], lr=s["teacher_lr"], schedule="cosine", target_macs=s["target_macs"],
                 calibration_batches=10, select_epochs=s["select_epochs"], finetune_lr=s["finetune_lr"],
                 distill_epochs=s["budget"], workdir=str(wd), seed=0)
    if prefix_done(cfg):
        # run_pipeline(stop_after=...) only stops after a stage it ran: with candidates already done it
        # would go on to select / distill / export (reported as a bug), so read the artifacts here.
        print("teacher, rank, candidates: done already in the workdir, reusing them", flush=True)
        state = json.loads((wd / "stages.json").read_text())
        pipeline_seconds = {k: state[k]["seconds"] for k in ("teacher", "rank", "candidates")}
        teacher_info = json.loads((wd / "teacher.json").read_text())
        candidate_rows = json.loads((wd / "candidates.json").read_text())["candidates"]
    else:
        pipeline = run_pipeline(cfg, stop_after="candidates")
        pipeline_seconds, teacher_info, candidate_rows = pipeline.timings, pipeline.teacher, pipeline.candidates
    # Rows are only valid for these exact candidates (a library change can rebuild them).
    digest = json.loads((wd / "stages.json").read_text())["candidates"]["digest"]
    if res.data.get("candidates_digest") != digest:
        res.data.update(candidates_digest=digest, rows={}, deployment={})
        res.data.pop("teacher_predict_seconds", None)
    res.data["pipeline_seconds"] = dict(pipeline_seconds)
    candidates = {row["criterion"]: row for row in candidate_rows}
    criteria_names = [c for c in ALL_CRITERIA if c in candidates]

    splits = data_lib.load(s["dataset"], batch_size=s["batch_size"], train_subset=s["train_subset"], seed=0)
    val, test = splits.val, splits.test
    teacher = keras.models.load_model(wd / "teacher.keras")
    res.data["teacher"] = {"macs": teacher_info["macs"], "params": teacher_info["params"],
                           "val_acc": teacher_info["val_acc"], "test_acc": teacher_info["test_acc"],
                           "epochs": s["teacher_epochs"], "train_images": splits.info.num_train,
                           "val_images": splits.info.num_val, "test_images": splits.info.num_test}
    res.save()

    def train_for(seed):
        # Seed 0 is the pipeline's own training order; other seeds reshuffle / re-augment the same images.
        return data_lib.train_pipeline(splits.arrays["train"], s["batch_size"], augment=True, seed=seed)

    def saved(name):
        return wd / "rows" / (name.replace("/", "_").replace(":", "_") + ".keras")

    def student_row(name, source_path, *, kd, seed, save=False, extra=None):
        cached = res.row(name)
        if cached and (not save or saved(name).exists()):
            return cached
        keras.utils.set_random_seed(seed)
        student = keras.models.load_model(source_path)
        start = time.perf_counter()
        # No per-epoch validation: every row is scored once at the end on val and test.
        student, _ = distill.distill(teacher, student, train_for(seed), None, epochs=s["budget"], kd=kd,
                                     temperature=s["temperature"], alpha=s["alpha"], lr=s["finetune_lr"],
                                     seed=seed, verbose=2)
        seconds = time.perf_counter() - start
        cost = flops.count(student)
        row = {"kd": kd, "seed": seed, "seconds": round(seconds, 2), "val_acc": evaluate(student, val),
               "test_acc": evaluate(student, test), "macs": int(cost.macs), "params": int(cost.params),
               **(extra or {})}
        if save:
            saved(name).parent.mkdir(exist_ok=True)
            student.save(saved(name))
        print(f"row {name}: val {100 * row['val_acc']:.2f}%  test {100 * row['test_acc']:.2f}%  "
              f"({row['seconds']:.0f} s)", flush=True)
        res.put(name, row)
        return row

    def select_row(seed):
        name = f"select/s{seed}"
        out_dir = wd / f"select_s{seed}"
        cached = res.row(name)
        if cached and (out_dir / "selected.keras").exists():
            return cached
        paths = {c: str(wd / "candidates" / f"{c}.keras") for c in criteria_names}
        start = time.perf_counter()
        payload = selection.select(paths, train_for(seed), val, workdir=str(out_dir), epochs=s["select_epochs"],
                                   successive_halving=True, lr=s["finetune_lr"], seed=seed)
        row = {"seed": seed, "seconds": round(time.perf_counter() - start, 2), "selected": payload["selected"],
               "cost_in_full_budgets": payload["protocol"]["cost_in_full_budgets"],
               "candidates": [{k: c.get(k) for k in ("criterion", "val_acc", "budget_epochs", "seconds")}
                              for c in payload["candidates"]]}
        print(f"row {name}: chose {row['selected']['criterion']} in {row['seconds']:.0f} s", flush=True)
        res.put(name, row)
        return row

    def cand(c):
        return wd / "candidates" / f"{c}.keras"

    # 2. every criterion + cross-entropy, seed 0; the best one (by validation accuracy) is the baseline.
    for c in criteria_names:
        student_row(f"ce:{c}/s0", cand(c), kd=False, seed=0, save=True, extra={"criterion": c})
    best = max(criteria_names, key=lambda c: res.row(f"ce:{c}/s0")["val_acc"])
    res.data["best_criterion"] = best
    print(f"best single criterion by validation accuracy: {best}", flush=True)

    # 3-4. the decisive rows, for every seed.
    for seed in s["seeds"]:
        first = seed == s["seeds"][0]
        student_row(f"ce:{best}/s{seed}", cand(best), kd=False, seed=seed, save=first, extra={"criterion": best})
        student_row(f"best+kd/s{seed}", cand(best), kd=True, seed=seed, extra={"criterion": best})
        chosen = select_row(seed)
        selected = wd / f"select_s{seed}" / "selected.keras"
        crit = chosen["selected"]["criterion"]
        student_row(f"mskd/s{seed}", selected, kd=True, seed=seed, save=first, extra={"criterion": crit})
        student_row(f"select+ce/s{seed}", selected, kd=False, seed=seed, extra={"criterion": crit})

    # Teacher forward pass over one training epoch: the denominator of the KD overhead ratio.
    if "teacher_predict_seconds" not in res.data:
        calib = data_lib.eval_pipeline(splits.arrays["train"], s["batch_size"])
        teacher.predict(calib.take(2), verbose=0)  # tracing
        start = time.perf_counter()
        teacher.predict(calib, verbose=0)
        res.data["teacher_predict_seconds"] = round(time.perf_counter() - start, 2)
        res.save()

    # Cost and deployment: teacher, MS-KD student, best baseline (first seed).
    s0 = s["seeds"][0]
    models = {"teacher": wd / "teacher.keras", "mskd": saved(f"mskd/s{s0}"), "best_baseline": saved(f"ce:{best}/s{s0}")}
    # The folder test split is sorted by class, and export_all (LiteRT subset, TFLM images) reads the first
    # images: shuffle it (seeded) so that any prefix covers every class.
    export_test = "seeded shuffle of the test split"
    if res.data.get("deployment_test") != export_test:
        res.data.update(deployment={}, deployment_test=export_test)
    deployment = res.data["deployment"]
    order = np.random.default_rng(0).permutation(len(splits.arrays["test"]))[: s["test_images_tflite"]]
    shuffled_test = data_lib.eval_pipeline(
        data_lib.Arrays(splits.arrays["test"].x[order], splits.arrays["test"].y[order]), 2 * s["batch_size"])
    calibration = data_lib.eval_pipeline(splits.arrays["train"], s["batch_size"])
    for label, path in models.items():
        if label in deployment:
            continue
        model = keras.models.load_model(path)
        start = time.perf_counter()
        rows = deploy.export_all(model, str(wd / "export" / label), kinds=("int8",), representative_ds=calibration,
                                 test_ds=shuffled_test, micro=True, seed=0)
        r = rows[0]
        cost = flops.count(model)
        deployment[label] = {"macs": int(cost.macs), "params": int(cost.params), "int8_bytes": r["bytes"],
                             "int8_test_acc": r["test_acc"], "keras_acc_same_images": r["keras_acc"],
                             "latency_ms": r["latency_ms"], "micro_arena_bytes": r["micro"]["arena_bytes"],
                             "micro_latency_ms": r["micro"]["latency_ms"], "micro_acc": r["micro"]["acc"],
                             "micro_images": r["micro"]["images"],
                             "export_seconds": round(time.perf_counter() - start, 2)}
        res.save()

    text = render(res.data)
    (results_io.RESULTS / f"{s['name']}.md").write_text(text)
    print("\n" + text, flush=True)


def prefix_done(cfg) -> bool:
    """Whether teacher, rank and candidates are finished for ``cfg`` (the runner's own digest rule)."""
    from mskd_tf import stages
    from mskd_tf.api import STAGE_INPUTS
    from mskd_tf.workdir import Workdir

    wd, digest = Workdir(cfg.workdir), ""
    for stage in ("teacher", "rank", "candidates"):
        inputs = json.loads(json.dumps({n: getattr(cfg, n) for n in STAGE_INPUTS[stage]}))
        digest = stages.chain_digest(digest, inputs)
        if not wd.stage_status(stage, digest, inputs, stages.ARTIFACTS[stage])[0]:
            return False
    return True


# ----------------------------------------------------------------------------- tables


def _pct(v):
    return f"{100 * v:.2f}"


def _spread(values):
    """'mean ± sample std (n)' in percent; one value prints as itself."""
    if len(values) == 1:
        return f"{_pct(values[0])} (n=1)"
    return f"{_pct(statistics.mean(values))} ± {_pct(statistics.stdev(values))} (n={len(values)})"


def summarize(data: dict) -> dict:
    """Per decisive row: test / val accuracies over seeds, and the verdict figures."""
    rows = data["rows"]
    best = data["best_criterion"]
    seeds = data["settings"]["seeds"]
    out = {}
    for label, key in (("best single criterion + CE", f"ce:{best}"), ("MS-KD (select + KD)", "mskd"),
                       ("ablation: best criterion + KD, no selection", "best+kd"),
                       ("ablation: selection + CE, no KD", "select+ce")):
        found = [rows[f"{key}/s{sd}"] for sd in seeds if f"{key}/s{sd}" in rows]
        out[key] = {"label": label, "test": [r["test_acc"] for r in found], "val": [r["val_acc"] for r in found],
                    "criteria": [r.get("criterion") for r in found], "macs": found[0]["macs"] if found else None,
                    "params": found[0]["params"] if found else None}
    return out


def render(data: dict) -> str:
    s, t, rows, m = data["settings"], data["teacher"], data["rows"], data["machine"]
    best = data.get("best_criterion")
    lines = [f"Run `{'--quick' if s['quick'] else '(full)'}` on {m['date']}: {m['cpu']}, {m['cores']} cores, "
             f"TF {m['tensorflow']}, Keras {m['keras']}, Python {m['python']}, mskd_tf {m['mskd_tf']} "
             f"(commit {m['git_commit']}{', library modified' if m['library_dirty'] else ''}).",
             f"CIFAR-10 (JPEG folder copy): {t['train_images']} train images (subset), {t['val_images']} val, "
             f"{t['test_images']} test; {s['model']} teacher trained once ({s['teacher_epochs']} epochs, SGD "
             f"lr {s['teacher_lr']} cosine); target {s['target_macs']:.0%} of the teacher's MACs; every student row: "
             f"{s['budget']} epoch(s), SGD lr {s['finetune_lr']} cosine, batch {s['batch_size']}; KD T={s['temperature']}, "
             f"alpha={s['alpha']}; selection: successive halving, {s['select_epochs']} epoch(s) per candidate "
             f"(spent on top of the student budget); seeds {s['seeds']}.", ""]

    lines += ["**Single criterion + cross-entropy fine-tune (seed 0)**", "",
              "| criterion | MACs (M) | params (k) | val acc % | test acc % | seconds |", "|---|---|---|---|---|---|"]
    for key in [k for k in rows if k.startswith("ce:") and k.endswith("/s0")]:  # criteria order
        r = rows[key]
        mark = " (best by val)" if r["criterion"] == best else ""
        lines.append(f"| {r['criterion']}{mark} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e3:.1f} | "
                     f"{_pct(r['val_acc'])} | {_pct(r['test_acc'])} | {r['seconds']:.0f} |")

    if best is None:  # the single-criterion rows are still running
        return "\n".join(lines) + "\n"
    summary = summarize(data)
    lines += ["", "**Decisive rows (test accuracy %, mean ± std over seeds)**", "",
              "| row | criterion | MACs (M) | params (k) | val acc % | test acc % |", "|---|---|---|---|---|---|",
              f"| teacher | - | {t['macs'] / 1e6:.2f} | {t['params'] / 1e3:.1f} | {_pct(t['val_acc'])} | "
              f"{_pct(t['test_acc'])} (n=1) |"]
    for key, r in summary.items():
        if r["test"]:
            lines.append(f"| {r['label']} | {', '.join(sorted(set(r['criteria'])))} | {r['macs'] / 1e6:.2f} | "
                         f"{r['params'] / 1e3:.1f} | {_spread(r['val'])} | {_spread(r['test'])} |")
    selections = [rows[k] for k in sorted(rows) if k.startswith("select/")]
    if selections:
        lines += ["", "Selection chose: " + ", ".join(f"seed {r['seed']}: {r['selected']['criterion']}"
                                                      for r in selections) + "."]
    ms, bl = summary["mskd"]["test"], summary[f"ce:{best}"]["test"]
    if ms and bl:
        diff = 100 * (statistics.mean(ms) - statistics.mean(bl))
        spread = max(_sd(ms), _sd(bl))
        if diff > 0 and diff > spread:
            verdict = "MS-KD beats the best single criterion + fine-tune"
        elif diff > 0:
            verdict = "MS-KD is ahead of the best single criterion + fine-tune, but by less than the seed spread"
        else:
            verdict = "MS-KD does NOT beat the best single criterion + fine-tune"
        lines += ["", f"**Claim check:** {verdict} at equal MACs: {statistics.mean(ms) * 100:.2f}% vs "
                      f"{statistics.mean(bl) * 100:.2f}% test accuracy (difference {diff:+.2f} points, largest "
                      f"seed std {spread:.2f} points, n={len(ms)} and {len(bl)} seeds)."]
        effects = []
        for what, a, b in (("KD after selection (MS-KD - selection + CE)", "mskd", "select+ce"),
                           ("KD without selection (best + KD - best + CE)", "best+kd", f"ce:{best}"),
                           ("selection incl. its extra fine-tuning steps (MS-KD - best + KD)", "mskd", "best+kd")):
            if summary[a]["test"] and summary[b]["test"]:
                gap = 100 * (statistics.mean(summary[a]["test"]) - statistics.mean(summary[b]["test"]))
                effects.append(f"{what}: {gap:+.2f} points")
        if effects:
            lines += ["", "Effects (mean test accuracy differences): " + "; ".join(effects) + "."]

    dep = data.get("deployment", {})
    if dep:
        lines += ["", "**Cost and deployment (int8 post-training quantization, first seed)**", "",
                  "| model | MACs (M) | params (k) | int8 .tflite bytes | float Keras acc % | int8 acc % (LiteRT) "
                  "| LiteRT ms 1 thr | LiteRT ms 2 thr | TFLM arena bytes | TFLM ms | TFLM acc % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, d in dep.items():
            lat = {str(k): v for k, v in d["latency_ms"].items()}
            lines.append(f"| {label} | {d['macs'] / 1e6:.2f} | {d['params'] / 1e3:.1f} | {d['int8_bytes']} | "
                         f"{_pct(d['keras_acc_same_images'])} | {_pct(d['int8_test_acc'])} | {lat.get('1')} | {lat.get('2')} | "
                         f"{d['micro_arena_bytes']} | {d['micro_latency_ms']} | {_pct(d['micro_acc'])} |")
        n = s["test_images_tflite"] or t["test_images"]
        lines.append(f"\nLiteRT int8 accuracy on {n} test images (seeded shuffle of the test split); TFLM "
                     f"accuracy / latency over the first {next(iter(dep.values()))['micro_images']} of them "
                     "(median ms per image).")

    ps = data.get("pipeline_seconds", {})
    s0 = s["seeds"][0]
    sel, kd, ce = rows.get(f"select/s{s0}"), rows.get(f"mskd/s{s0}"), rows.get(f"select+ce/s{s0}")
    if sel and kd and ce:
        budget_epochs = s["budget"]
        predict = data.get("teacher_predict_seconds")
        lines += ["", "**Pipeline seconds per stage (seed 0)**", "",
                  "| teacher | rank | candidates | select | distill (KD) | export (student) |", "|---|---|---|---|---|---|",
                  f"| {ps.get('teacher', 0):.0f} | {ps.get('rank', 0):.1f} | {ps.get('candidates', 0):.1f} | "
                  f"{sel['seconds']:.0f} | {kd['seconds']:.0f} | {dep.get('mskd', {}).get('export_seconds', 0):.0f} |",
                  ""]
        if predict:
            ratio = kd["seconds"] / (ce["seconds"] + budget_epochs * predict)
            lines.append(f"- KD overhead: KD {kd['seconds']:.0f} s vs CE {ce['seconds']:.0f} s on the same student "
                         f"({kd['seconds'] / ce['seconds']:.2f}x); KD / (CE + {budget_epochs} teacher predict epochs "
                         f"of {predict:.1f} s) = {ratio:.2f} (target <= 1.10). Timed on a shared machine, includes "
                         "the first-epoch tracing.")
        lines.append(f"- Selection cost: {sel['cost_in_full_budgets']} full per-candidate fine-tunes "
                     f"(target <= 2 with halving); {sel['seconds']:.0f} s = "
                     f"{sel['seconds'] / kd['seconds']:.2f}x the distill stage.")
    return "\n".join(lines) + "\n"


def _sd(values):
    return 100 * statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    app.run(main)
