"""Several targets in one run: one student per target, sharing the teacher, its rankings and the data.

``--targets=macs=0.3,macs=0.7`` (or ``arena_kb=64+flash_kb=128``: ``+`` joins targets of one student) makes one
student per item. The teacher and rank stages run once in ``--workdir``; each item's run lives in
``<workdir>/targets/<item>/`` and starts from a copy of their files and stage records, which the stage runner
reuses as its own (their digests do not depend on the targets). ``front.json``, ``front.md`` and
``plot_front.png`` in ``--workdir`` put the shipped students side by side, each with its accuracy and its
measured costs, so a user picks one; they are rewritten as each item finishes, naming the items still to run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from mskd_tf.config import Config, parse_target_item
from mskd_tf.workdir import Workdir

SHARED_STAGES = ("teacher", "rank")
SHARED_FILES = {"teacher": ("teacher.keras", "teacher.json", "logs/teacher/history.csv"), "rank": ("rankings.json",)}
FOLDER = "targets"


def item_configs(cfg: Config) -> list[tuple[str, Config]]:
    """``[(item, its run's config)]``: the run's config with the item's targets, in its own work dir."""
    return [(item, dataclasses.replace(cfg, targets=(), workdir=str(Path(cfg.workdir) / FOLDER / item),
                                       **parse_target_item(item)))
            for item in cfg.targets]


def share(base: Workdir, run: Workdir) -> bool:
    """Give ``run`` the base work dir's finished shared stages (files and records) where its own differ; returns
    whether anything was copied (the run's later stages then start from other files)."""
    copied = False
    for stage in SHARED_STAGES:
        record = base.state.get(stage)
        if record is None:
            break  # the later shared stages depend on this one
        if run.state.get(stage) == record and (run / SHARED_FILES[stage][0]).exists():  # its artifact
            continue
        for name in SHARED_FILES[stage]:
            if (base / name).exists():
                (run / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base / name, run / name)
        run.adopt(stage, record)
        copied = True
    return copied


def rows(items: list[str], workdirs: list[Path]) -> list[dict]:
    """One row per item: its shipped student's accuracy and its measured costs, from its run's records."""
    out = []
    for item, wd in zip(items, workdirs):
        read = lambda name: json.loads((wd / name).read_text()) if (wd / name).exists() else {}  # noqa: E731
        teacher, student, export = read("teacher.json"), read("distill.json"), read("export.json")
        int8 = next((r for r in export.get("exports", []) if r["kind"] in ("int8_qat", "int8")), {})
        micro = export.get("micro") or {}
        checked = [c["met"] for c in export.get("targets", {}).values() if c["met"] is not None]
        row = {"item": item, "workdir": str(wd), "macs": student.get("macs"), "params": student.get("params"),
               "macs_ratio": (student["macs"] / teacher["macs"]) if student.get("macs") and teacher.get("macs") else None,
               "val_acc": student.get("val_acc"), "test_acc": student.get("test_acc"), "shipped": student.get("shipped"),
               "int8_test_acc": int8.get("test_acc"), "flash_kb": int8["bytes"] / 1024 if int8.get("bytes") else None,
               "arena_kb": micro["arena_bytes"] / 1024 if micro.get("arena_bytes") else None,
               "latency_ms": (int8.get("latency_ms") or {}).get("1"),
               # the measured targets (arena, flash, latency, parameters); a MACs target is met by construction
               "targets_met": all(checked) if checked else None}
        out.append(row)
    return out


def write(wd: Workdir, front: list[dict], pending: list[str] = ()) -> None:
    """front.json, front.md and plot_front.png in the base work dir: the finished items' students, and the
    ``pending`` items still to run."""
    from mskd_tf import report

    teacher = wd.read_json("teacher.json") if (wd / "teacher.json").exists() else {}
    wd.write_json("front.json", {"teacher": {k: teacher.get(k) for k in ("macs", "params", "val_acc", "test_acc")},
                                 "students": front, "pending": list(pending)})
    text = report.front_table(front, teacher)
    still = f"\n\nStill to run: {', '.join(pending)} (rerun the same command to continue)." if pending else ""
    with wd.atomic("front.md") as tmp:
        tmp.write_text("# One student per target\n\nEach student's own report is in its work dir "
                       f"({FOLDER}/<item>/report.md).\n\n" + text + still + "\n")
    print("\n" + text, flush=True)
    report.plot_front(front, teacher, wd.path / "plot_front.png")
