"""report.json, report.md and PNG plots from the stages' artifacts.

The report only gathers what the stages measured and wrote; it computes no
figure of its own, so every number in it traces back to one stage's artifact.
"""

from __future__ import annotations

import platform
from pathlib import Path


def _read(wd, name):
    path = wd / name
    if not path.exists():
        return None
    return wd.read_json(name)


def versions() -> dict:
    import keras
    import tensorflow as tf

    import mskd_tf

    return {"mskd_tf": mskd_tf.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor()}".strip()}


def build(ctx) -> dict:
    """Assemble report.json from whatever stages have finished."""
    wd = ctx.wd
    teacher = _read(wd, "teacher.json") or {}
    candidates = (_read(wd, "candidates.json") or {}).get("candidates", [])
    selection = _read(wd, "selection.json") or {}
    for row in candidates:  # join selection results onto the candidate rows
        chosen = next((s for s in selection.get("candidates", []) if s.get("criterion") == row["criterion"]), {})
        row.update({k: chosen[k] for k in ("val_acc", "seconds", "curve", "budget_epochs", "params_kept")
                    if k in chosen})
    distill = _read(wd, "distill.json") or {}
    export = _read(wd, "export.json") or {}
    return {
        "teacher": {k: teacher.get(k) for k in ("macs", "params", "val_acc", "test_acc")},
        "candidates": candidates,
        "jaccard": (_read(wd, "candidates.json") or {}).get("jaccard"),
        "selected": selection.get("selected"),
        "student": distill or None,
        "exports": export.get("exports", []),
        "micro": export.get("micro"),
        "timings": {stage: rec.get("seconds") for stage, rec in wd.state.items()},
        "config": ctx.cfg.to_dict(),
        "versions": versions(),
        "history": {"teacher": teacher.get("history"), "select": [c.get("curve") for c in candidates],
                    **{f"distill_{run}": values.get("history")
                       for run, values in (distill.get("runs") or {}).items()}},
    }


def _fmt_pct(v):
    return "" if v is None else f"{100 * v:.2f}"


def _fmt_m(v, digits=2):
    return "" if v is None else f"{v / 1e6:.{digits}f}"


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _teacher_training(rep: dict) -> str:
    """The epochs this run trained the teacher for, or where a teacher it did not train came from."""
    history = (rep.get("history") or {}).get("teacher") or {}
    if history.get("loss"):  # every epoch, across interruptions
        return f"{len(history['loss'])} epochs"
    given = (rep.get("config") or {}).get("teacher")
    return f"given (--teacher={given}), not trained here" if given else "given (compress(model)), not trained here"


def summary_table(rep: dict) -> str:
    """The end-of-run table: model, MACs, params, accuracies, and the training each row had."""
    if not rep:
        return "(no report yet)"
    cfg = rep.get("config") or {}
    chosen = (rep.get("selected") or {}).get("criterion")
    rows = []
    t = rep.get("teacher") or {}
    rows.append(("teacher", _fmt_m(t.get("macs")), _fmt_m(t.get("params"), 3), _fmt_pct(t.get("val_acc")),
                 _fmt_pct(t.get("test_acc")), _teacher_training(rep)))
    for c in rep.get("candidates", []):
        budget = c.get("budget_epochs")
        if budget:
            acc, note = c.get("val_acc"), f"fine-tuned {budget:.3g} epochs in selection"
        else:  # never fine-tuned: its accuracy before any step, and which filter stopped it (or chose it)
            acc = c.get("val_acc_before_finetune")
            if c.get("params_kept") is False:
                note = "no step (under the capacity pool)"
            elif c["criterion"] == chosen:
                note = "no step (the zero-cost pick)"
            else:
                note = "no step (zero-cost rung)"
        rows.append((f"candidate {c['criterion']}" + (" (selected)" if c["criterion"] == chosen else ""),
                     _fmt_m(c.get("macs")), _fmt_m(c.get("params"), 3), _fmt_pct(acc), "", note))
    s = rep.get("student") or {}
    if s:
        steps = (f"{s['distill_steps']} steps after {s['selection_steps']} selection steps"
                 if "distill_steps" in s else f"{cfg.get('student_epochs')} epochs")
        paired = s.get("kd_vs_ce")
        for run, values in (s.get("runs") or {}).items():
            name, training = STUDENT_RUNS[run]
            note = f"{steps}, {training}"
            if paired and s.get("shipped") == run:  # why this run ships: the paired comparison on validation
                note += f"; vs the other run on validation: {paired['verdict']} (p = {paired['p_value']:.3g})"
            rows.append((name + (" (shipped)" if s.get("shipped") == run else ""), _fmt_m(s.get("macs")),
                         _fmt_m(s.get("params"), 3), _fmt_pct(values.get("val_acc")), _fmt_pct(values.get("test_acc")),
                         note))
    return _table(("model", "MMACs", "Mparams", "val acc %", "test acc %", "training"), rows)


# distill.json's runs: name in the table, the training it had
STUDENT_RUNS = {"kd": ("student (KD)", "distillation"), "ce": ("student (CE only)", "cross-entropy")}


def candidates_table(rows) -> str:
    """Criterion, MACs, params, the measured int8 arena and flash size when device targets were planned to,
    per-layer widths, accuracy before fine-tuning (from candidates.json rows)."""
    device = any("arena_bytes" in r for r in rows)
    kb = lambda value: f"{value / 1024:.1f}" if value is not None else ""  # noqa: E731
    return _table(("criterion", "MMACs", "Mparams", "MACs ratio",
                   *(("arena KB", "flash KB", "LiteRT ms") if device else ()), "widths", "val acc before fine-tune %"),
                  [(r["criterion"] + (f" (= {r['same_as']})" if r.get("same_as") else ""), _fmt_m(r["macs"]),
                    _fmt_m(r["params"], 3), f"{r['macs_ratio']:.3f}",
                    *((kb(r.get("arena_bytes")), kb(r.get("flash_bytes")),
                       _fmt_ms(r.get("latency_ms"), r.get("litert_kernels")))
                      if device else ()),
                    " ".join(str(w) for w in (r.get("widths") or {}).values()), _fmt_pct(r.get("val_acc_before_finetune")))
                   for r in rows])


def overlap_table(matrix) -> str:
    """The Jaccard overlap of kept channels between criteria, ``{a: {b: overlap}}``."""
    names = list(matrix)
    return _table(("", *names), [(a, *(f"{matrix[a][b]:.2f}" for b in names)) for a in names])


def _fmt_ms(value, kernels=None) -> str:
    """A LiteRT time; ``(builtin)`` marks one measured without XNNPACK, which refused that model."""
    if value is None:
        return ""
    return f"{value:.3f}" + (" (builtin)" if kernels == "builtin" else "")


def exports_table(rows) -> str:
    def ms(row, threads):
        value = (row.get("latency_ms") or {}).get(threads, (row.get("latency_ms") or {}).get(str(threads)))
        return _fmt_ms(value, row.get("litert_kernels"))

    return _table(
        ("kind", "bytes", "test acc %", "Keras acc %", "agreement %", "ms/img 1 thr", "ms/img 2 thr"),
        [(r["kind"], r.get("bytes"), _fmt_pct(r.get("test_acc")), _fmt_pct(r.get("keras_acc")),
          _fmt_pct(r.get("agreement")), ms(r, 1), ms(r, 2)) for r in rows])


def markdown(rep: dict) -> str:
    parts = ["# MS-KD report", "", "## Summary", "", summary_table(rep), ""]
    if rep.get("selected"):
        sel = rep["selected"]
        parts += [f"Selected criterion: **{sel.get('criterion')}**. {sel.get('reason', '')}", ""]
    if rep.get("candidates"):
        parts += ["## Candidates", "", candidates_table(rep["candidates"]), ""]
        if rep.get("jaccard"):
            parts += ["Jaccard overlap of kept channels between criteria:", "", overlap_table(rep["jaccard"]), ""]
    if rep.get("exports"):
        parts += ["## TFLite exports", "", exports_table(rep["exports"]), ""]
    if rep.get("micro"):
        m = rep["micro"]
        parts += ["## TFLite Micro", "", f"Arena: {m.get('arena_bytes')} bytes; latency {m.get('latency_ms')} ms.", ""]
    parts += ["## Stage seconds", "", _table(("stage", "seconds"), sorted(rep.get("timings", {}).items())), ""]
    parts += ["## Versions", "", _table(("package", "version"), sorted(rep.get("versions", {}).items())), ""]
    return "\n".join(parts)


def candidate_styles(cands) -> dict:
    """One matplotlib style per candidate, the same in every plot: colour by ranking criterion (tab10 / tab20
    in criteria order), marker and line style by layer allocation."""
    import matplotlib

    rankings = list(dict.fromkeys(c.get("ranking", c["criterion"]) for c in cands))
    palette = matplotlib.colormaps["tab10" if len(rankings) <= 10 else "tab20"]
    markers = {"global": ("o", "-"), "uniform": ("s", "--")}
    styles = {}
    for c in cands:
        marker, line = markers.get(c.get("allocation"), ("o", "-"))
        styles[c["criterion"]] = {"color": palette(rankings.index(c.get("ranking", c["criterion"])) % palette.N),
                                  "marker": marker, "linestyle": line}
    return styles


def plots(rep: dict, wd) -> list[Path]:
    """accuracy-vs-MACs (the Pareto picture), per-layer widths, and training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    t = rep.get("teacher") or {}
    cands = rep.get("candidates") or []
    s = rep.get("student") or {}
    styles = candidate_styles(cands)
    chosen = (rep.get("selected") or {}).get("criterion")
    if t.get("macs"):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        teacher_acc = 100 * (t.get("val_acc") or t.get("test_acc") or 0)
        ax.scatter([t["macs"] / 1e6], [teacher_acc], marker="*", s=200, color="black", label="teacher", zorder=4)
        target = (rep.get("config") or {}).get("target_macs")
        if target:
            ax.axvline(target * t["macs"] / 1e6, color="grey", ls=":", lw=1,
                       label=f"MACs target ({target:.0%} of the teacher)")
        for c in cands:
            style = styles[c["criterion"]]
            x = [c["macs"] / 1e6]
            if c.get("val_acc_before_finetune") is not None:  # hollow: before any step (the zero-cost rung)
                ax.scatter(x, [100 * c["val_acc_before_finetune"]], marker=style["marker"], s=30, facecolors="none",
                           edgecolors=style["color"], zorder=2)
            if c.get("val_acc") is not None:  # filled: after its selection fine-tuning
                ax.scatter(x, [100 * c["val_acc"]], color=style["color"], marker=style["marker"], s=30, zorder=2)
            if c["criterion"] == chosen and c.get("val_acc") is not None:
                # a ring around the selected one, so the student marker cannot hide it
                ax.scatter(x, [100 * c["val_acc"]], s=220, facecolors="none", edgecolors="red", linewidths=1.5,
                           label=f"selected: {chosen}", zorder=3)
        # The legend keys colour to the criterion and marker to the allocation, not one entry per candidate.
        for ranking, color in dict((c.get("ranking", c["criterion"]), styles[c["criterion"]]["color"])
                                   for c in cands).items():
            ax.scatter([], [], color=color, marker="o", s=30, label=ranking)
        for allocation, marker in dict((c["allocation"], styles[c["criterion"]]["marker"])
                                       for c in cands if c.get("allocation")).items():
            ax.scatter([], [], facecolors="none", edgecolors="grey", marker=marker, s=30, label=f"{allocation} allocation")
        for run, values in (s.get("runs") or {}).items():
            if values.get("val_acc") is None:
                continue
            shipped = s.get("shipped") == run
            ax.scatter([s["macs"] / 1e6], [100 * values["val_acc"]], marker="D", s=70 if shipped else 40,
                       color="red" if shipped else "none", edgecolors="red", zorder=5,
                       label=STUDENT_RUNS[run][0] + (", shipped" if shipped else ""))
        ax.set_xlim(0, 1.08 * t["macs"] / 1e6)
        ax.set_xlabel("MACs (M)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("candidates: hollow before any training step, filled after selection", fontsize=9)
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        made.append(_save(fig, wd / "plot_accuracy_vs_macs.png"))
    widths = [c for c in cands if c.get("widths")]
    if widths:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        layers = list(widths[0]["widths"])
        teacher_widths = widths[0].get("teacher_widths")
        if teacher_widths:
            ax.plot([teacher_widths.get(n) for n in layers], "k-", lw=2, label="teacher")
        for c in widths:
            style = styles[c["criterion"]]
            ax.plot([c["widths"].get(n) for n in layers], color=style["color"], ls=style["linestyle"],
                    lw=2.5 if c["criterion"] == chosen else 1,
                    label=c["criterion"] + (" (selected)" if c["criterion"] == chosen else ""))
        ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("layer")
        ax.set_ylabel("kept channels")
        ax.set_title("per-layer widths of each candidate")
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        made.append(_save(fig, wd / "plot_widths.png"))
    hist = rep.get("history") or {}
    curves = [(c["criterion"], c.get("curve")) for c in cands if c.get("curve")]
    trainings = [(label, h) for label, h in (("teacher", hist.get("teacher")),
                                             *((f"student, {training}", hist.get(f"distill_{run}"))
                                               for run, (_, training) in STUDENT_RUNS.items()))
                 if h and h.get("val_accuracy")]
    if curves or trainings:
        # The selection panel only when selection trained (the default zero-cost pick trains nothing there).
        fig, axes = plt.subplots(1, 2 if curves and trainings else 1, figsize=(11 if curves and trainings else 6, 4.5),
                                 sharey=True, squeeze=False)
        axes = list(axes[0])
        if curves:
            left = axes[0]
            for name, curve in curves:
                style = styles[name]
                left.plot([p[0] for p in curve], [100 * p[1] for p in curve], color=style["color"],
                          ls=style["linestyle"], marker=style["marker"], ms=3, lw=2.5 if name == chosen else 1,
                          label=name + (" (selected)" if name == chosen else ""))
            left.set_title("selection (successive halving)")
        if trainings:
            right = axes[-1]
            for label, h in trainings:
                right.plot(range(1, len(h["val_accuracy"]) + 1), [100 * v for v in h["val_accuracy"]], marker=".",
                           label=label)
            right.set_title("teacher and student training")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=6)
        axes[0].set_ylabel("validation accuracy (%)")
        fig.tight_layout()
        made.append(_save(fig, wd / "plot_curves.png"))
    return made


def front_table(front: list[dict], teacher: dict) -> str:
    """The students of a --targets run beside the teacher: accuracy and every measured cost."""

    def num(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}"

    lines = [("teacher", _fmt_m(teacher.get("macs")), _fmt_m(teacher.get("params"), 3), "100",
              _fmt_pct(teacher.get("val_acc")), _fmt_pct(teacher.get("test_acc")), "", "", "", "", "")]
    for r in front:
        lines.append((r["item"], _fmt_m(r["macs"]), _fmt_m(r["params"], 3),
                      num(r["macs_ratio"] and 100 * r["macs_ratio"]), _fmt_pct(r["val_acc"]),
                      _fmt_pct(r["test_acc"]), _fmt_pct(r["int8_test_acc"]), num(r["arena_kb"]),
                      num(r["flash_kb"]), num(r["latency_ms"], 3),
                      "" if r["targets_met"] is None else "yes" if r["targets_met"] else "NO"))
    return _table(("student", "MACs (M)", "params (M)", "MACs %", "val acc %", "test acc %", "int8 test acc %",
                          "TFLM arena KB", "int8 flash KB", "LiteRT ms (1 thread)", "targets met"), lines)


def plot_front(front: list[dict], teacher: dict, path: Path):
    """Test accuracy against each cost the students were measured in: MACs, and the TFLM arena and int8 flash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = [("macs", "MACs (M)", 1e-6), ("arena_kb", "TFLM arena (KB)", 1.0), ("flash_kb", "int8 flash (KB)", 1.0)]
    costs = [c for c in costs if any(r.get(c[0]) is not None for r in front)]
    done = [r for r in front if r.get("test_acc") is not None]
    if not costs or not done:
        return None
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.8), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], costs):
        points = sorted((r[key] * scale, 100 * r["test_acc"], r["item"]) for r in done if r.get(key) is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue", label="students")
        for x, y, item in points:
            ax.annotate(item, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if key == "macs" and teacher.get("macs") and teacher.get("test_acc") is not None:
            ax.scatter([teacher["macs"] * scale], [100 * teacher["test_acc"]], marker="*", s=150, color="black",
                       label="teacher")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle("one student per target: accuracy against cost", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
