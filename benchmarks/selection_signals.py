"""Which cheap signal ranks the candidates the way B steps of training do? (issue 13's selection evidence)

    benchmarks/selection_signals.sh                    # every signal, resumable -> benchmarks/results/selection_signals.json
    benchmarks/selection_signals.sh --render_only      # the correlations against the oracle rows finished so far
    benchmarks/selection_signals.sh --table=mskd_cifar_t120 --workdir=runs/bench_mskd_cifar_t120 --proxy_steps=
                                                       # zero-cost signals of the 120-epoch teacher's candidates
                                                       # -> benchmarks/results/selection_signals_mskd_cifar_t120.json

The MS-KD benchmark (``benchmarks/mskd_cifar.sh``) found that the default selection (zero-cost rung, then
0.56 epochs of constant-lr successive halving) picks a candidate that ends 1.12 points below l1-uniform after
B steps. Its oracle table trains every candidate for B steps; this script measures, on the same 18 candidate
files (``runs/bench_mskd_cifar/candidates``), the signals a selection could afford, and prints the Spearman
rank correlation of each with the oracle's final validation accuracy:

* zero-cost (one validation pass of the BatchNorm-recalibrated candidate): accuracy, cross-entropy, KL to
  the teacher at the KD temperature, agreement with the teacher's top-1; parameter count.
* short annealed runs: ``--proxy_steps`` optimizer steps of the KD loss with the learning rate decayed
  (cosine) to 0 within the run, validation accuracy at the end. The library's rungs keep the learning rate
  constant instead, so a score is taken mid-descent (the oracle's per-epoch curves show how noisy that is).

Every finished candidate x signal is cached, so a rerun resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import results_io
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_mskd_cifar", "The MS-KD benchmark's workdir (teacher, candidates).")
flags.DEFINE_string("table", "mskd_cifar", "The MS-KD benchmark's results name (benchmarks/results/<table>.json) whose "
                    "oracle rows (ce:<candidate>/s0) and select/s0 row score the signals; --workdir must be its workdir.")
flags.DEFINE_list("proxy_steps", ["132", "352"], "Lengths of the annealed KD runs, in optimizer steps "
                  "(132 = what each of 4 finalists gets of a 1.5-epoch selection; 352 = one epoch).")
flags.DEFINE_float("lr", 0.05, "Peak learning rate of the annealed runs (the benchmark's finetune_lr).")
flags.DEFINE_float("weight_decay", 5e-3, "As the benchmark.")
flags.DEFINE_float("temperature", 4.0, "KD temperature (as the benchmark).")
flags.DEFINE_float("alpha", 0.5, "KD label weight (as the benchmark).")
flags.DEFINE_bool("render_only", False, "Only print the correlations of the cached signals.")


def results_name(table: str) -> str:
    """The signals of one table's candidates (the first table's file keeps its original name)."""
    return "selection_signals" if table == "mskd_cifar" else f"selection_signals_{table}"


def render(signals: dict, table: str) -> str:
    """Spearman of every signal with the oracle's final validation (and test) accuracy."""
    table_path = results_io.RESULTS / f"{table}.json"
    if not table_path.exists():
        raise SystemExit(f"--table={table}: {table_path} does not exist; name a table benchmarks/mskd_cifar.sh wrote "
                         "(its --name, e.g. mskd_cifar_t120).")
    oracle = json.loads(table_path.read_text())["figures"]["rows"]
    finals = {c: oracle[f"ce:{c}/s0"] for c in signals if f"ce:{c}/s0" in oracle}
    if len(finals) < 3:
        return f"{len(finals)} oracle rows finished: too few to correlate."
    names = sorted(finals)
    keys = sorted({k for c in names for k in signals[c]})
    # Higher must mean better for every signal: losses and divergences enter negated.
    sign = {"val_loss": -1, "kl_to_teacher": -1}
    lines = [f"Spearman with the oracle's accuracy after B steps of CE, over {len(names)} candidates "
             f"({', '.join(names)}):", "", "| signal | vs final val | vs final test | n |", "|---|---|---|---|"]
    for key in keys:
        have = [c for c in names if signals[c].get(key) is not None]
        if len(have) < 3:
            continue
        values = [sign.get(key, 1) * signals[c][key] for c in have]
        lines.append(f"| {key} | {results_io.spearman(values, [finals[c]['val_acc'] for c in have]):+.2f} | "
                     f"{results_io.spearman(values, [finals[c]['test_acc'] for c in have]):+.2f} | {len(have)} |")
    curves = [c for c in names if finals[c].get("val_curve")]
    for epoch in (1, 2, 4, 8):
        if len(curves) >= 3:
            lines.append(f"| oracle run's own val acc after epoch {epoch} (lr still high) | "
                         f"{results_io.spearman([finals[c]['val_curve'][epoch - 1] for c in curves], [finals[c]['val_acc'] for c in curves]):+.2f}"
                         f" | {results_io.spearman([finals[c]['val_curve'][epoch - 1] for c in curves], [finals[c]['test_acc'] for c in curves]):+.2f}"
                         f" | {len(curves)} |")
    library_pick = oracle.get("select/s0", {}).get("selected", {}).get("criterion")
    lines += ["", *policies(signals, finals, library_pick)]
    lines += ["", "| candidate | final val | final test | " + " | ".join(keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for c in sorted(names, key=lambda c: -finals[c]["val_acc"]):
        cells = [f"{signals[c][k]:.4g}" if signals[c].get(k) is not None else "-" for k in keys]
        lines.append(f"| {c} | {100 * finals[c]['val_acc']:.2f} | {100 * finals[c]['test_acc']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def policies(signals: dict, finals: dict, library_pick: str | None) -> list[str]:
    """What each selection rule would pick from the 18 candidates, and where its pick ends after B steps of CE.

    Offline: a rule's pick is scored by that candidate's oracle row, so rules are compared without a row each.
    Steps are what the rule spends of B (528 = the benchmark's 1.5-epoch selection budget). ``library_pick``: what the
    table's select/s0 run chose (the library's selection as committed when that row ran).
    """
    from mskd_tf import selection  # the library's own capacity pool, so the rule is the one the library applies

    everyone = sorted(signals)
    zero_cost_top4 = sorted(everyone, key=lambda c: -signals[c]["zero_cost_acc"])[:4]
    best = lambda pool, key: max(pool, key=lambda c: signals[c].get(key, float("-inf")))  # noqa: E731

    def annealed(pool):  # None (the rule is left out) when --proxy_steps did not measure 132 steps on the pool
        return best(pool, "annealed_kd_132") if all("annealed_kd_132" in signals[c] for c in pool) else None

    rules = [("no selection: l1-uniform (the usual default)", "l1-uniform", 0),
             ("zero-cost top-1 (BN-recalibrated accuracy)", best(everyone, "zero_cost_acc"), 0),
             ("lowest KL to the teacher (zero-cost)", min(everyone, key=lambda c: signals[c]["kl_to_teacher"]), 0),
             ("most parameters (zero-cost)", best(everyone, "params"), 0),
             ("library default: capacity pool, zero-cost keeps 4, successive halving (the table's select/s0 run)",
              library_pick or "-", 528),
             ("zero-cost keeps 4, then 132 annealed KD steps each", annealed(zero_cost_top4), 528)]
    # The capacity pool the library applies by default: candidates with >= 0.9 x the median parameter count (at
    # equal MACs), then the same cheap rules inside it.
    pool = sorted(selection.capacity_pool({c: signals[c]["params"] for c in everyone}, 0.9))
    pool_top4 = sorted(pool, key=lambda c: -signals[c]["zero_cost_acc"])[:4]
    rules += [(f"capacity pool ({len(pool)} with >= 0.9 x the median parameters), zero-cost top-1",
               best(pool, "zero_cost_acc"), 0),
              ("capacity pool, zero-cost keeps 4, then 132 annealed KD steps each", annealed(pool_top4), 528)]
    for steps in (132, 352):
        if all(f"annealed_kd_{steps}" in signals[c] for c in everyone):
            rules.append((f"every candidate {steps} annealed KD steps (over budget)",
                          best(everyone, f"annealed_kd_{steps}"), steps * len(everyone)))
    top = max(finals.values(), key=lambda r: r["val_acc"]) if finals else None
    lines = ["Selection rules scored offline by the oracle row of their pick (val / test after B steps of CE; "
             "regret = oracle-best val - pick's val, over the rows finished):", "",
             "| rule | steps of B | pick | final val | final test | regret (val points) |", "|---|---|---|---|---|---|"]
    for rule, pick, steps in ((rule, pick, steps) for rule, pick, steps in rules if pick is not None):
        row = finals.get(pick)
        cells = (f"{100 * row['val_acc']:.2f} | {100 * row['test_acc']:.2f} | {100 * (top['val_acc'] - row['val_acc']):.2f}"
                 if row else "- | - | (no oracle row yet)")
        lines.append(f"| {rule} | {steps} | {pick} | {cells} |")
    return lines


def main(_):
    out_name = results_name(FLAGS.table)
    path = results_io.RESULTS / f"{out_name}.json"
    signals = json.loads(path.read_text())["figures"]["signals"] if path.exists() else {}
    if FLAGS.render_only:
        print(render(signals, FLAGS.table))
        return

    import keras
    import numpy as np
    import tensorflow as tf

    from mskd_tf import data as data_lib
    from mskd_tf import batchnorm, distill, flops, training

    wd = Path(FLAGS.workdir)
    teacher = keras.models.load_model(wd / "teacher.keras")
    candidates = {r["criterion"]: r for r in json.loads((wd / "candidates.json").read_text())["candidates"]}
    splits = data_lib.load(f"folder:{results_io.SHARED_CIFAR10}", batch_size=128, seed=0)
    val = splits.val
    teacher_logits = np.concatenate([teacher(x, training=False).numpy() for x, _ in val])
    labels = np.concatenate([y.numpy() for _, y in val])
    t = FLAGS.temperature

    def save():
        results_io.write_results(out_name, {"workdir": str(wd), "settings": {
            "proxy_steps": FLAGS.proxy_steps, "lr": FLAGS.lr, "weight_decay": FLAGS.weight_decay,
            "temperature": t, "alpha": FLAGS.alpha}, "signals": signals})

    for name, record in candidates.items():
        got = signals.setdefault(name, {})
        if "kl_to_teacher" not in got:
            model = keras.models.load_model(wd / "candidates" / f"{name}.keras")
            # The candidates stage already recalibrated BatchNorm; the stored accuracy is its validation score.
            logits = np.concatenate([model(x, training=False).numpy() for x, _ in val])
            log_p = tf.nn.log_softmax(logits).numpy()
            p_t, log_p_t = tf.nn.softmax(teacher_logits / t).numpy(), tf.nn.log_softmax(teacher_logits / t).numpy()
            log_p_s = tf.nn.log_softmax(logits / t).numpy()
            got.update(zero_cost_acc=record["val_acc_before_finetune"],
                       val_loss=float(-log_p[np.arange(len(labels)), labels].mean()),
                       kl_to_teacher=float((p_t * (log_p_t - log_p_s)).sum(axis=1).mean() * t * t),
                       teacher_agreement=float((logits.argmax(1) == teacher_logits.argmax(1)).mean()),
                       params=int(flops.count(model).params))
            save()
    for steps in (int(s) for s in FLAGS.proxy_steps):
        for name in candidates:
            key = f"annealed_kd_{steps}"
            if key in signals[name]:
                continue
            keras.utils.set_random_seed(0)
            student = keras.models.load_model(wd / "candidates" / f"{name}.keras")
            start = time.perf_counter()
            train = data_lib.train_pipeline(splits.arrays["train"], 128, augment=True, seed=0)
            student, _ = distill.distill(teacher, student, train, None, epochs=steps / training.steps_per_epoch(train),
                                         steps=steps, kd=True, temperature=t, alpha=FLAGS.alpha, lr=FLAGS.lr,
                                         weight_decay=FLAGS.weight_decay, seed=0, verbose=0)
            # Score as the selection does: on a copy with BatchNorm re-estimated on training batches.
            batchnorm.recalibrate_batchnorm(student, data_lib.train_pipeline(
                splits.arrays["train"], 128, augment=False, seed=0), 20)
            signals[name][key] = training.accuracy(student, val)
            print(f"{name}: {key} = {signals[name][key]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            save()
    print(render(signals, FLAGS.table))


if __name__ == "__main__":
    app.run(main)
