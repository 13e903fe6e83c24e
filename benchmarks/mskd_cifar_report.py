"""The CIFAR-10 study's results table and plot (benchmarks/mskd_cifar.py writes them after each row, and with
--render_only): every row by seed, the paired differences, the oracle table, and for the MobileNetV2 protocol its
decision rules as written (mskd_cifar_rules.py)."""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import mskd_cifar_rules
import results_io
from mskd_cifar_rows import (BASELINE, WITH_SENSITIVITY, Row, follows_mobilenet_protocol, network_name, row_key,
                             seed_and_target, setting_tags, bracketed, standard_rows, table_of)


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
    def by_seed(row):
        return {r.seed: record["test_acc"] for r, record in table.items() if r == dataclasses.replace(row, seed=r.seed)}

    tests_a = by_seed(a)
    difference = mskd_cifar_rules.paired(tests_a, by_seed(b), seeds=sorted(tests_a))
    return str(difference) if difference else None


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
    """What the MobileNetV2 protocol's rules read (mskd_cifar_rules.verdicts): test accuracy by seed of the rows they
    compare, and (float, int8) test accuracy by seed of the default's exported students."""
    decisive = standard_rows(s["target_macs"])
    rows = {"default": decisive["zc+kd"], "l1 + KD": decisive["l1 + KD"], "l1 + CE": decisive["l1 + CE"],
            "MS-KD": decisive["MS-KD"],
            "default + sensitivity": dataclasses.replace(decisive["zc+kd"], settings=(("allocations", WITH_SENSITIVITY),))}
    if oracle:
        rows["oracle best + CE"] = Row("student", oracle, "ce", 0, s["target_macs"])
    tests = {label: {r.seed: table[r]["test_acc"] for r in _at_seeds(table, row, mskd_cifar_rules.SEEDS)}
             for label, row in rows.items()}
    int8 = {r.seed: (table[r]["test_acc"], table[r]["int8_test_acc"])
            for r in _at_seeds(table, rows["default"], mskd_cifar_rules.SEEDS) if "int8_test_acc" in table[r]}
    return tests, int8


# The ResNet-20 table that decision rules R2 and R3 read beside the MobileNetV2 rows (the 120-epoch teacher's).
RESNET20_TABLE = "mskd_cifar_t120"


def resnet20_rule_inputs() -> dict:
    """The ResNet-20 table's test accuracies by seed of the rows R2 and R3 compare ({} before it exists)."""
    import json

    path = results_io.RESULTS / f"{RESNET20_TABLE}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())["figures"]
    return rule_inputs(table_of(data), data["settings"], None)[0]


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
        lines += [f"- {line}" for line in mskd_cifar_rules.verdicts(tests, teacher_test=t.get("test_acc", 0), int8=int8,
                                                                  resnet20=resnet20_rule_inputs())]
    timed = {seed_and_target(row, s): r for row, r in table.items()
             if row.kind == "select" and not row.settings and r.get("time_split") and r.get("seconds")
             and not _resumed(r)}
    if timed:  # a selection's share of seconds not spent training (load, pools, setup, trace, score, save)
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
